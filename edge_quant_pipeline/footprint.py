"""How much memory each step of the graph needs for a model of a given size.

Estimates of each step's peak RSS (its whole process: Python, Dagster, the libraries it imports and the
work), from the model's size, calibrated by measurement on a 2-core, 24 GB machine with litert-torch 0.10,
ai-edge-quantizer 0.10 and ai-edge-litert 2.3 (``benchmarks/bench_scale.py`` prints each estimate beside the
peak it measured). They err on the high side: a step is admitted only when its estimate fits
(``memory.reserve``), and ``edge-quant run`` starts no more runs than fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_quant_pipeline.memory import MB

# A process that imported Dagster, torch, TensorFlow and litert-torch (a conversion run), and one that
# imported Dagster, ai-edge-litert and ai-edge-quantizer (every other run).
TORCH_PROCESS_MB = 1400
LITERT_PROCESS_MB = 450
# litert-torch's export (torch.export of two signatures, then MLIR lowering) above the process, which grows
# with the parameters and, graph node by node, with the layers: measured 6.6 GB for 494M parameters in 24
# layers, 2.6 GB for 135M parameters in 30 layers.
EXPORT_BYTES_PER_PARAMETER = 12
EXPORT_MB_PER_LAYER = 45
# ai-edge-quantizer holds the model it parses (weights copied out of the mapped file) and the one it
# writes: 1.8x the float file measured for fp16 (the largest output), 0.4x for int8.
QUANTIZE_FLOAT_FILES = 2.0
# The runtime maps its XNNPACK weight cache (about the file's size) and touches the file's own pages for
# what it does not pack: 1.25x the file measured for a float model. Error localisation runs the float file
# without XNNPACK (about 1x) beside one prefill's activations.
RUNTIME_FILES = 1.4
# Logits of one window held at once by evaluation: the candidate's, the reference's, float64 blocks.
WINDOW_LOGIT_COPIES = 4


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    layers: int
    vocab_size: int
    checkpoint_bytes: int  # the weight files as stored (bfloat16 for most checkpoints people ship)
    float_tflite_bytes: int  # the float32 export, once it exists; 4 bytes per parameter before
    window_tokens: int  # kv_cache_len: the positions of one evaluation window

    @property
    def window_logit_bytes(self) -> int:
        return self.window_tokens * self.vocab_size * 4


def export_mb(size: ModelSize) -> float:
    return TORCH_PROCESS_MB + EXPORT_BYTES_PER_PARAMETER * size.parameters / MB + EXPORT_MB_PER_LAYER * size.layers


def float_reference_mb(size: ModelSize) -> float:
    """The float32 model, the checkpoint's tensors while they load, and a window of logits."""
    model = 4 * size.parameters + size.checkpoint_bytes + 3 * size.window_logit_bytes
    return TORCH_PROCESS_MB + model / MB


def quantize_mb(size: ModelSize) -> float:
    return LITERT_PROCESS_MB + QUANTIZE_FLOAT_FILES * size.float_tflite_bytes / MB


def evaluation_mb(size: ModelSize) -> float:
    """For any recipe: no quantized file is larger than the float one."""
    runtime = RUNTIME_FILES * size.float_tflite_bytes + WINDOW_LOGIT_COPIES * size.window_logit_bytes
    return LITERT_PROCESS_MB + runtime / MB


STEP_ESTIMATES = {
    "float_tflite": export_mb,
    "float_reference": float_reference_mb,
    "quantized_tflite": quantize_mb,
    "evaluation": evaluation_mb,
}


def step_mb(step: str, size: ModelSize) -> float:
    """The estimated peak of a step's process; steps that hold no model need the bare process."""
    estimate = STEP_ESTIMATES.get(step)
    return estimate(size) if estimate else LITERT_PROCESS_MB


def steps_mb(steps: list[str], size: ModelSize) -> float:
    """A run executes its steps one after the other in one process: the largest of them."""
    return max(step_mb(step, size) for step in steps)
