"""Steps that hold a model start only when their estimated peak fits in the machine's memory."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg

from edge_quant_pipeline import settings
from edge_quant_pipeline.checkpoints import Checkpoint, count_parameters, model_id_for, validate_checkpoint
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.footprint import ModelSize, input_hessian_bytes, step_mb
from edge_quant_pipeline.memory import MemoryLedger, PeakMemory
from edge_quant_pipeline.quantize.recipes import CalibrationNeed, Recipe


def model_size(checkpoint: Checkpoint, pipeline: PipelineConfig, float_tflite_bytes: int | None = None) -> ModelSize:
    """``float_tflite_bytes``: the export's size once it exists (4 bytes per parameter before)."""
    return ModelSize(
        parameters=checkpoint.parameters,
        layers=checkpoint.num_layers,
        vocab_size=checkpoint.vocab_size,
        checkpoint_bytes=checkpoint.weight_bytes,
        float_tflite_bytes=float_tflite_bytes or 4 * checkpoint.parameters,
        window_tokens=pipeline.kv_cache_len,
    )


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
    return replace(model_size(unhashed, pipeline), calibration_bytes=input_hessian_bytes(hf_config))


@dataclass
class StepUsage:
    """What a step took, measured: its process's peak RSS (the kernel's mark), or that of a child process doing
    its work if larger (``child_peak_rss_mb``, reported by the child), and its CPU time, all threads."""

    estimate_mb: float
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0
    child_peak_rss_mb: float = 0.0

    def metadata(self) -> dict[str, float]:
        return {
            "step_peak_rss_mb": self.peak_rss_mb,
            "step_estimated_peak_mb": self.estimate_mb,
            "step_cpu_s": self.cpu_s,
        }


@contextmanager
def admitted(
    context: dg.AssetExecutionContext,
    size: ModelSize,
    recipe: Recipe | None = None,
    calibration: CalibrationNeed | None = None,
) -> Iterator[StepUsage]:
    """Reserve this step's estimated peak (for ``recipe``'s run, if it is one; computing ``calibration``, for the
    calibration step) on the machine's ledger, waiting while other steps hold the memory, and measure what it
    takes; a step that could never fit raises ``NotEnoughMemoryError`` before any work."""
    step = context.assets_def.key.path[-1]
    usage = StepUsage(estimate_mb=step_mb(step, size, recipe, calibration))
    label = f"{step} [{context.partition_key}]"
    with MemoryLedger(settings.memory_ledger()).reserved(usage.estimate_mb, label, context.log.info):
        cpu = time.process_time()
        with PeakMemory() as peak:
            yield usage
        usage.peak_rss_mb, usage.cpu_s = max(peak.mb, usage.child_peak_rss_mb), time.process_time() - cpu
