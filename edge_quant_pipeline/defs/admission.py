"""Steps that hold a model start only when their estimated peak fits in the machine's memory."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg

from edge_quant_pipeline import settings
from edge_quant_pipeline.footprint import ModelSize, step_mb
from edge_quant_pipeline.memory import MemoryLedger, PeakMemory
from edge_quant_pipeline.quantize.catalog import CalibrationNeed
from edge_quant_pipeline.quantize.recipes import Recipe


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
