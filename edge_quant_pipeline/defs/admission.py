"""Steps that hold a model start only when their estimated peak fits in the machine's memory; what they wait for
(memory, the timing lock) is in their log, and how long in their metadata."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg

from edge_quant_pipeline import deployment_settings
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
    waited_s: float = 0.0  # for memory in the ledger and for the machine's timing lock

    def metadata(self) -> dict[str, float]:
        return {
            "step_peak_rss_mb": self.peak_rss_mb,
            "step_estimated_peak_mb": self.estimate_mb,
            "step_cpu_s": self.cpu_s,
            "step_waited_s": self.waited_s,
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
    started = time.monotonic()
    with (
        _domain_log_in(context, usage),
        MemoryLedger(deployment_settings.memory_ledger()).reserved(usage.estimate_mb, label, context.log.info),
    ):
        usage.waited_s += time.monotonic() - started
        cpu = time.process_time()
        with PeakMemory() as peak:
            yield usage
        usage.peak_rss_mb, usage.cpu_s = max(peak.mb, usage.child_peak_rss_mb), time.process_time() - cpu


class _StepLog(logging.Handler):
    """The domain modules' log lines (a wait for the timing lock, say) in the step's log, their waits in ``usage``."""

    def __init__(self, context: dg.AssetExecutionContext, usage: StepUsage):
        super().__init__(logging.INFO)
        self.context, self.usage = context, usage

    def emit(self, record: logging.LogRecord) -> None:
        self.context.log.info(record.getMessage())
        self.usage.waited_s += getattr(record, "waited_s", 0.0)


@contextmanager
def _domain_log_in(context: dg.AssetExecutionContext, usage: StepUsage) -> Iterator[None]:
    package = logging.getLogger("edge_quant_pipeline")
    handler, level = _StepLog(context, usage), package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
