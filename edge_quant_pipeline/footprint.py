"""How much memory each step of the graph needs for a model of a given size.

Estimates of each step's peak RSS (its whole process: Python, Dagster, the libraries it imports and the
work), from the model's size, calibrated by measurement on a 2-core, 24 GB machine with litert-torch 0.10,
ai-edge-quantizer 0.10 and ai-edge-litert 2.3 (``benchmarks/bench_scale.py`` prints each estimate beside the
peak it measured). They err on the high side: a step is admitted only when its estimate fits
(``memory.reserve``), and ``edge-quant run`` starts no more runs than fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edge_quant_pipeline.checkpoints.validate import (
    Checkpoint,
    CheckpointError,
    count_parameters,
    language_config,
    model_id_for,
    validate_checkpoint,
)
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.export.architectures import SUPPORTED_MODEL_TYPES
from edge_quant_pipeline.export.exporters import EXPORT_HF_MODEL_TYPES
from edge_quant_pipeline.graph import BY_ASSET, QUANTIZE_JOB, assets_of
from edge_quant_pipeline.memory import MB, never_fits
from edge_quant_pipeline.quantize.catalog import CalibrationNeed
from edge_quant_pipeline.quantize.recipes import Recipe
from edge_quant_pipeline.settings import AUTO, EXPORT_HF, GENERATIVE_API

# A process that imported Dagster, torch, TensorFlow and litert-torch (a conversion run), and one that
# imported Dagster, ai-edge-litert and ai-edge-quantizer (every other run).
TORCH_PROCESS_MB = 1400
LITERT_PROCESS_MB = 450
# litert-torch's export above the process (lightweight conversion: the weights go to MLIR as views of the torch
# tensors), which grows with the parameters and, graph node by node, with the layers; its peak is the float32
# model, the checkpoint mapped and released as it loads (export/load.py). Measured (benchmarks/bench_export.py):
# 4.6 bytes per parameter for the Llama 3.2 1B shape (6.48 GB), 4.8 for the Llama 3.2 3B shape (15.40 GB), 4.7 for
# the Qwen3-4B shape (18.89 GB), 2.61 GB above the imports for 494M parameters in 24 layers, 1.48 GB for 135M in 30.
EXPORT_BYTES_PER_PARAMETER = 5.0
EXPORT_MB_PER_LAYER = 25
FLOAT_REFERENCE_BYTES_PER_PARAMETER = 4.7
# transformers' own model (export_hf's checkpoints), loaded by from_pretrained: 9.06 GB measured for an OLMo 2 1B
# shape (1.49B parameters, 16 layers), 5.2 bytes per parameter above the process; 5.4 to err on the high side, as
# every estimate here does (one measurement, one family).
TRANSFORMERS_REFERENCE_BYTES_PER_PARAMETER = 5.4
FLOAT_REFERENCE_MB_PER_LAYER = 25
# ai-edge-quantizer holds the model it parses (weights copied out of the mapped file) and the one it
# writes, with some overhead per tensor: with fp16 weights (the largest output) 1.9 GB measured for a 0.5 GB
# float file in 30 layers and 4.0 GB for a 1.9 GB one in 24; with int8 or int4 weights 1.1 and 1.4-1.7 GB, and
# 6.8 (int8) and 7.5 GB (int4 blocks of 32) for the Llama 3.2 3B shape's 12.0 GB float file, 5.1 and 6.4 GB for
# Gemma 4 E2B's 9.1 GB one: blocks of int4 cost more (their scales, and the quantizer's temporaries per block).
QUANTIZE_FP16_FILES, QUANTIZE_BLOCK_FILES, QUANTIZE_FILES = 2.0, 0.7, 0.55
QUANTIZE_MB_PER_LAYER = 20
# The runtime maps its XNNPACK weight cache (about the float weights' size) and the file's own pages for what
# it does not pack: 1.4-1.6x the float file measured for the float recipe. Weights stored quantized but
# computed in float (int8 weight-only, fp16) are also dequantized into float32 buffers, per signature: the
# runtime alone took 7.95 GB for a weight-only int8 0.5B model (4.0x its 1.98 GB float file), and LiteRT-LM 10.7 GB
# for such a bundle of the same shape (5.2x, measured 2026-12-07 in `edge-quant run`'s process tree). A recipe with
# integer compute runs its own, smaller file (4.2 GB for the Llama 3.2 3B shape's int8 file); error
# localisation, after the session, maps the float file without XNNPACK, the largest part of such a step: 14.07 GB
# for the Llama 3.2 3B shape's 12.0 GB float file (1.17x it, the process included).
RUNTIME_FILES = 1.6
DEQUANTIZING_RUNTIME_FILES = 5.4
LOCALIZING_FILES = 1.2
# Calibration runs the float file in TFLite's own kernels (no XNNPACK) with every intermediate kept: its step
# peaked at 3.52 GB for the SmolLM2-135M shape's 0.54 GB file with 0.40 GB of Hessians, in the conversion run's
# process (torch imported): about 2.2x the file beyond the process, the Hessians and a window of logits.
CALIBRATION_RUNTIME_FILES = 2.5
# Logits of one window held at once by evaluation: the candidate's, the reference's, float64 blocks.
WINDOW_LOGIT_COPIES = 4
# A quantized file holds more than its quantized weights (norms, RoPE tables, per-channel scales): the Llama 3.2 3B
# shape's int8 file is 0.27 of its 12.0 GB float file, where int8 weights alone would be 0.25.
UNQUANTIZED_SHARE = 0.05


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    layers: int
    vocab_size: int
    checkpoint_bytes: int  # the weight files as stored (bfloat16 for most checkpoints people ship)
    float_tflite_bytes: int  # the float32 export, once it exists; 4 bytes per parameter before
    window_tokens: int  # kv_cache_len: the positions of one evaluation window
    calibration_bytes: int = 0  # the input Hessians of its layers (quantize/calibration.py), once known
    exporter: str = GENERATIVE_API  # export_hf's float model is transformers' own, loaded whole
    proven_family: bool = True  # False: its export is proven against transformers in the export's step
    # Of ``parameters``, a per-layer embedding table (Gemma 4 E2B: 2.35B), held in the checkpoint's dtype by the
    # export and the float reference (export/load.py) and written to an embedder file of its own, streamed
    table_parameters: int = 0

    @property
    def dense_parameters(self) -> int:
        """What the steps hold in float32: all but the table."""
        return self.parameters - self.table_parameters

    @property
    def table_bytes(self) -> int:
        """The table as the checkpoint stores it."""
        return self.table_parameters * self.checkpoint_bytes // max(self.parameters, 1)

    @property
    def window_logit_bytes(self) -> int:
        return self.window_tokens * self.vocab_size * 4


def input_hessian_bytes(hf_config: dict) -> int:
    """What GPTQ's calibration keeps, float32, known from config.json before any export: per block the Hessians of
    the attention's input, of its output projection's input, of the feed-forward's input and of its down
    projection's input, then the LM head's input. Once the float file exists, its own count replaces this
    (``quantize.calibration.hessian_bytes``). 0 for a config without these fields."""
    text = hf_config.get("text_config") or hf_config
    try:
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        heads, intermediate = int(text["num_attention_heads"]), int(text["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return 0
    attention = heads * int(text.get("head_dim") or hidden // heads)
    return 4 * (layers * (2 * hidden**2 + attention**2 + intermediate**2) + hidden**2)


def model_size(checkpoint: Checkpoint, pipeline: PipelineConfig, float_tflite_bytes: int | None = None) -> ModelSize:
    """``float_tflite_bytes``: the export's size once it exists (4 bytes per parameter but the table's before)."""
    table = per_layer_table_parameters(checkpoint.hf_config)
    return ModelSize(
        parameters=checkpoint.parameters,
        layers=checkpoint.num_layers,
        vocab_size=checkpoint.vocab_size,
        checkpoint_bytes=checkpoint.weight_bytes,
        float_tflite_bytes=float_tflite_bytes or 4 * (checkpoint.parameters - table),
        window_tokens=pipeline.export_settings.kv_cache_len,
        exporter=checkpoint.exporter,
        proven_family=checkpoint.proven_family,
        table_parameters=table,
    )


def per_layer_table_parameters(hf_config: dict) -> int:
    """Gemma 4's per-layer embedding table (vocabulary x blocks x width), 0 for a model without one."""
    text = language_config(hf_config)
    width = text.get("hidden_size_per_layer_input") or 0
    return int(text.get("vocab_size_per_layer_input") or 0) * int(text.get("num_hidden_layers") or 0) * int(width)


def folder_model_size(checkpoint_dir: Path, pipeline: PipelineConfig) -> ModelSize:
    """The same from the folder, without hashing it (what ``edge-quant run`` plans with), its input Hessians
    estimated from config.json, so that a calibration that could never fit is refused before the export."""
    hf_config = validate_checkpoint(checkpoint_dir)
    unhashed = Checkpoint(
        model_id_for(checkpoint_dir),
        checkpoint_dir,
        "",
        hf_config,
        parameters=count_parameters(checkpoint_dir, hf_config),
    )
    # As the checkpoint step will plan it, without importing transformers here: a family the rebuild lacks goes to
    # export_hf, and one neither list names through export_hf's generic path, its export proven in the export's step.
    # (A config the rebuild refuses, going to export_hf, is planned as the rebuild's.)
    model_type, pinned = hf_config.get("model_type"), pipeline.export.exporter
    exporter = pinned if pinned != AUTO else GENERATIVE_API if model_type in SUPPORTED_MODEL_TYPES else EXPORT_HF
    proven = EXPORT_HF_MODEL_TYPES if exporter == EXPORT_HF else (*SUPPORTED_MODEL_TYPES, *EXPORT_HF_MODEL_TYPES)
    return replace(
        model_size(unhashed, pipeline),
        calibration_bytes=input_hessian_bytes(hf_config),
        exporter=exporter,
        proven_family=model_type in proven,
    )


def export_mb(size: ModelSize) -> float:
    """The export; for a family no test here covers, then the proof of it in the same process: transformers' float
    model, freed, then the float file in the runtime (evaluate/export_proof.py)."""
    model = EXPORT_BYTES_PER_PARAMETER * size.dense_parameters + size.table_bytes
    export = TORCH_PROCESS_MB + model / MB + EXPORT_MB_PER_LAYER * size.layers
    if size.proven_family:
        return export
    runtime = TORCH_PROCESS_MB + RUNTIME_FILES * size.float_tflite_bytes / MB
    return max(export, float_reference_mb(size), runtime)


def float_reference_mb(size: ModelSize) -> float:
    """The float32 model (the checkpoint mapped and released as it loads, export/load.py), PyTorch's working
    memory through the layers, and a window of logits. Measured (docs/real-sizes.md): 15.83 GB for the Llama 3.2 3B
    shape (3.21B parameters, 28 layers), 6.88 GB for the Llama 3.2 1B shape, 3.98 GB for Qwen2.5-0.5B."""
    per_parameter = FLOAT_REFERENCE_BYTES_PER_PARAMETER
    if size.exporter == EXPORT_HF:
        per_parameter = TRANSFORMERS_REFERENCE_BYTES_PER_PARAMETER
    model = per_parameter * size.dense_parameters + size.table_bytes + 3 * size.window_logit_bytes
    return TORCH_PROCESS_MB + model / MB + FLOAT_REFERENCE_MB_PER_LAYER * size.layers


def calibration_mb(size: ModelSize, need: CalibrationNeed | None = None) -> float:
    """The float file run without XNNPACK, every intermediate of one call kept, and for GPTQ the running X^T X of
    each layer's input and one more while a call's product is added; in the conversion run's process, which
    imported torch. ``need`` None: the most (Hessians). Nothing to compute: the process alone."""
    if need is CalibrationNeed.NONE:
        return TORCH_PROCESS_MB
    hessians = 2 * size.calibration_bytes if need in (None, CalibrationNeed.HESSIANS) else 0
    runtime = CALIBRATION_RUNTIME_FILES * size.float_tflite_bytes + WINDOW_LOGIT_COPIES * size.window_logit_bytes
    return TORCH_PROCESS_MB + (runtime + hessians) / MB


def quantize_mb(size: ModelSize, recipe: Recipe | None = None) -> float:
    """``recipe`` None: any (the largest). A GPTQ recipe also holds the calibration's Hessians (ranges are small).
    Embedders are quantized before the model, a slice of 256 MB of rows at a time (quantize/lookup.py)."""
    if recipe is None or recipe.writes_fp16:
        files = QUANTIZE_FP16_FILES
    elif any(q.scheme.block_size for q in recipe.quantizations_used()):
        files = QUANTIZE_BLOCK_FILES
    else:
        files = QUANTIZE_FILES
    calibration = size.calibration_bytes if recipe is None or recipe.needs_hessians else 0
    return (
        LITERT_PROCESS_MB + (files * size.float_tflite_bytes + calibration) / MB + QUANTIZE_MB_PER_LAYER * size.layers
    )


def quantize_disk_bytes(float_tflite_bytes: int, recipe: Recipe) -> int:
    """What quantizing with ``recipe`` writes to the work folder: its file and, at evaluation, its bundle; for the
    float recipe, whose file is a link of the float file, the bundle only."""
    if recipe.is_float:
        return float_tflite_bytes
    return int(min(1.0, 2 * (recipe.stored_share + UNQUANTIZED_SHARE)) * float_tflite_bytes)


def evaluation_mb(size: ModelSize, recipe: Recipe | None = None) -> float:
    """``recipe`` None: any (the largest). The float recipe's runtime holds the float file; a recipe with integer
    compute holds less than error localisation, which maps the float file after it."""
    if recipe is None or recipe.dequantizes:
        files = DEQUANTIZING_RUNTIME_FILES
    else:
        files = RUNTIME_FILES if not recipe.schemes_used() else LOCALIZING_FILES
    runtime = files * size.float_tflite_bytes + WINDOW_LOGIT_COPIES * size.window_logit_bytes
    return LITERT_PROCESS_MB + runtime / MB


def float_baseline_mb(size: ModelSize) -> float:
    """The float bundle in LiteRT-LM, in its own process."""
    return LITERT_PROCESS_MB + RUNTIME_FILES * size.float_tflite_bytes / MB


def search_mb(size: ModelSize, recipe: Recipe | None = None) -> float:
    """A search quantizes and scores one candidate at a time; a recipe without a budget does nothing here."""
    if recipe is None or recipe.search is not None:
        return max(quantize_mb(size, recipe), evaluation_mb(size, recipe))
    return LITERT_PROCESS_MB


def step_mb(
    step: str, size: ModelSize, recipe: Recipe | None = None, calibration: CalibrationNeed | None = None
) -> float:
    """The estimated peak of a step's process (an asset's name, its estimate named by ``graph.py``) for a recipe's
    run (None: any recipe), the calibration step computing ``calibration`` (None: the most); steps that hold no
    model need the bare process."""
    estimates = {
        "export": lambda: export_mb(size),
        "float_reference": lambda: float_reference_mb(size),
        "float_baseline": lambda: float_baseline_mb(size),
        "calibration": lambda: calibration_mb(size, calibration),
        "search": lambda: search_mb(size, recipe),
        "quantize": lambda: quantize_mb(size, recipe),
        "evaluation": lambda: evaluation_mb(size, recipe),
    }
    key = BY_ASSET[step].memory
    return estimates[key]() if key else LITERT_PROCESS_MB


def steps_mb(
    steps: list[str], size: ModelSize, recipe: Recipe | None = None, calibration: CalibrationNeed | None = None
) -> float:
    """A run executes its steps one after the other in one process: the largest of them, but for those that record
    why they could not fit and let the run go on (``graph.Stage.skipped_when_too_big``); the bare process when
    no other is left."""
    sized = [step_mb(step, size, recipe, calibration) for step in steps if not BY_ASSET[step].skipped_when_too_big]
    return max(sized, default=LITERT_PROCESS_MB)


def planned_model_size(checkpoint_dir: Path, pipeline: PipelineConfig) -> ModelSize | None:
    """``folder_model_size``, or None when the folder cannot say (its run fails at its checkpoint step, with the
    reason)."""
    try:
        return folder_model_size(checkpoint_dir, pipeline)
    except (CheckpointError, OSError):
        return None


def pair_never_fits(size: ModelSize, recipe: Recipe, calibration: CalibrationNeed) -> str | None:
    """Why a (model, recipe) run could never start on this machine, as `edge-quant run` refuses it before its
    launch; None when it could."""
    return never_fits(steps_mb(list(assets_of(QUANTIZE_JOB)), size, recipe, calibration))
