"""Where a quantized model departs from the float one: per-tensor SNR over one prefill.

ai-edge-quantizer's model validator runs the float and the quantized ``.tflite``
side by side on the same inputs, keeps every intermediate tensor and compares
them by name. Error accumulates along the network, so a tensor's SNR includes
everything upstream of it; the place where SNR drops first is where a recipe
hurts most.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.convert import ExportSettings
from edge_quant_pipeline.evaluate import empty_kv_cache
from edge_quant_pipeline.weights import component_of


@dataclass(frozen=True)
class TensorError:
    component: str
    block: int | None
    op: str  # the last segment of the tensor's module path, e.g. Linear_w2
    snr_db: float
    tensor: str


def short_op_name(tensor: str) -> str:
    return tensor.rsplit("/", 1)[-1].split(";")[0].rsplit(".", 1)[-1]


def tensor_errors(
    float_tflite: Path, candidate: Path, prompt: np.ndarray, settings: ExportSettings, num_threads: int
) -> list[TensorError]:
    """Every intermediate tensor of the prefill signature with a nonzero float signal, worst first."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import model_validator
    from ai_edge_quantizer.utils.validation_utils import ValidationErrorMetric

    runner = Interpreter(model_path=str(float_tflite)).get_signature_runner(settings.prefill_signature)
    inputs = {
        **empty_kv_cache(runner),
        "tokens": prompt[None].astype(np.int32),
        "input_pos": np.arange(len(prompt), dtype=np.int32),
    }
    result = model_validator.compare_model(
        float_tflite.read_bytes(),
        candidate.read_bytes(),
        {settings.prefill_signature: [inputs]},
        error_metrics=[ValidationErrorMetric.SNR],
        num_threads=num_threads,
    ).get_signature_comparison_result(settings.prefill_signature)
    errors = []
    for tensor, metrics in {**result.intermediate_tensors, **result.output_tensors}.items():
        snr = metrics["snr"]
        if snr > 0 and math.isfinite(snr):  # 0: the float tensor is all zeros; inf: identical
            component, block = component_of(tensor)
            errors.append(TensorError(component, block, short_op_name(tensor), 10 * math.log10(snr), tensor))
    return sorted(errors, key=lambda e: e.snr_db)


def layer_summary(errors: list[TensorError]) -> list[TensorError]:
    """The worst tensor of each (component, block), worst layer first."""
    worst: dict[tuple[str, int | None], TensorError] = {}
    for error in errors:  # already sorted worst first
        worst.setdefault((error.component, error.block), error)
    return list(worst.values())
