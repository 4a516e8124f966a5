"""Run what the rebuild plan asks for, as Dagster runs, several at a time.

``edge-quant run`` is a launcher, not an executor: every stage is the same job,
partition and asset selection the UI would launch, executed in process
(``execute_in_process``) on the instance in ``DAGSTER_HOME``. What it adds is
parallelism across partitions without a daemon, on ``jobs`` lanes:

- conversions run in the launching process, one after another: it is the only
  process that imports torch + litert-torch (5-7 s, 1.1 GB), and an export is the
  step whose memory grows with the model;
- ``jobs - 1`` worker processes import Dagster and the code location once and take
  everything else: the recipe resolutions during the export, then the (model,
  recipe) runs, which need no torch, as soon as their conversion and recipe are done.
"""

import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from edge_quant_pipeline.defs.automation import CONVERT_JOB, QUANTIZE_JOB, RESOLVE_JOB
from edge_quant_pipeline.defs.checkpoint import fail_runs_of_dead_processes, process_tags
from edge_quant_pipeline.defs.rebuild import DueReports, rebuild_plan, reports_due
from edge_quant_pipeline.defs.resources import ArtifactStore, PipelineConfig
from edge_quant_pipeline.staleness import RebuildPlan
from edge_quant_pipeline.toolchain import quiet_third_party_noise

REPORT_JOB, ALL_MODELS_REPORT_JOB = "report", "report_all_models"
# `--convert-only`: the assets from checkpoint to quantized .tflite, nothing after them.
CONVERSION_ASSETS = ("checkpoint", "float_tflite", "quant_recipe", "quantized_tflite")
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass(frozen=True)
class PlannedRun:
    job: str
    model: str | None = None
    recipe: str | None = None
    after: tuple["PlannedRun", ...] = ()  # runs that must have finished first
    needs_success: bool = True  # skip this run when one of `after` failed

    @property
    def partition_key(self) -> str | None:
        if self.model and self.recipe:
            return dg.MultiPartitionKey({"model": self.model, "recipe": self.recipe})
        return self.model or self.recipe

    @property
    def label(self) -> str:
        return str(self.partition_key or "")


@dataclass(frozen=True)
class RunOutcome:
    run: PlannedRun
    seconds: float
    failures: list[str]  # failed steps and checks, one line each; empty when the run succeeded


@dataclass
class LaunchSummary:
    outcomes: list[RunOutcome] = field(default_factory=list)
    skipped: list[PlannedRun] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes if o.failures) + len(self.skipped)


def plan_runs(plan: RebuildPlan, models: list[str], recipes: list[str], reports: DueReports | None) -> list[PlannedRun]:
    """The runs for ``plan``, each with the runs it waits for; conversions first, the long ones.

    ``reports`` None: no reports (``--convert-only``).
    """
    converts = {m: PlannedRun(CONVERT_JOB, model=m) for m in plan.convert}
    resolves = {r: PlannedRun(RESOLVE_JOB, recipe=r) for r in plan.resolve}
    pairs = {
        (m, r): PlannedRun(
            QUANTIZE_JOB, model=m, recipe=r, after=tuple(run for run in (converts.get(m), resolves.get(r)) if run)
        )
        for m, r in plan.affected_pairs(models, recipes)
    }
    runs = [*converts.values(), *resolves.values(), *pairs.values()]
    if reports is None:
        return runs
    # Reports list failures too: they wait for their pairs without needing them to succeed.
    model_reports = [
        PlannedRun(
            REPORT_JOB,
            model=m,
            after=tuple(run for (model, _), run in pairs.items() if model == m),
            needs_success=False,
        )
        for m in models
        if m in reports.models or any(model == m for model, _ in pairs)
    ]
    if model_reports or reports.all_models:
        model_reports.append(PlannedRun(ALL_MODELS_REPORT_JOB, after=tuple(model_reports), needs_success=False))
    return runs + model_reports


# --- a lane: this process or a worker process ------------------------------------------------------

_lane: dict[str, Any] = {}


def _start_lane(instance_ref, pipeline_fields: dict[str, Any], conversion_only: bool, worker: bool) -> None:
    quiet_third_party_noise()
    from edge_quant_pipeline.definitions import build_definitions

    if worker:  # its (model, recipe) runs need the quantizer: import it now, while the export keeps them waiting
        import ai_edge_quantizer.quantizer  # noqa: F401

    # Resources do not pickle (their config schema does not): rebuilt here from their fields.
    pipeline = PipelineConfig(
        **{**pipeline_fields, "artifact_store": ArtifactStore(**pipeline_fields["artifact_store"])}
    )
    _lane.update(
        defs=build_definitions(pipeline),
        instance=dg.DagsterInstance.from_ref(instance_ref),
        conversion_only=conversion_only,
    )


def execute(run: PlannedRun) -> RunOutcome:
    """One Dagster run, in this process, as the UI would launch it."""
    started = time.perf_counter()
    job = _lane["defs"].resolve_job_def(run.job)
    selection = None
    if _lane["conversion_only"]:
        selection = [key for key in job.asset_layer.executable_asset_keys if key.path[-1] in CONVERSION_ASSETS]
    result = job.execute_in_process(
        partition_key=run.partition_key,
        instance=_lane["instance"],
        raise_on_error=False,
        run_config=RUN_CONFIG,
        asset_selection=selection,
        tags=process_tags(),  # so that a later run can tell this one died if this process is killed
    )
    failures = [f"check {c.check_name}: {c.description}" for c in result.get_asset_check_evaluations() if not c.passed]
    failures += [
        e.step_failure_data.error.message.strip().splitlines()[0] for e in result.all_events if e.is_step_failure
    ]
    if result.success is False and not failures:
        failures.append("the run failed; see it in the Dagster UI")
    return RunOutcome(run=run, seconds=time.perf_counter() - started, failures=failures)


# --- the launcher -----------------------------------------------------------------------------------


def _print_outcome(outcome: RunOutcome) -> None:
    line = f"  {outcome.run.job:<26} {outcome.run.label:<42} {outcome.seconds:6.1f}s"
    if not outcome.failures:
        print(f"{line}  ok", flush=True)
    else:
        print(f"{line}  FAILED" + "".join(f"\n      {reason}" for reason in outcome.failures), flush=True)


class _Lanes:
    """Where runs execute: a thread of this process, and ``jobs - 1`` worker processes.

    Conversions run only in this process, one after another: it is the one that
    imports torch (the pool workers never do), and an export is the step whose
    memory grows with the model. Every other run goes to whichever lane is free.
    """

    def __init__(self, instance: dg.DagsterInstance, pipeline: PipelineConfig, jobs: int, conversion_only: bool):
        lane_args = (instance.get_ref(), pipeline.model_dump(), conversion_only)
        # Workers start importing now, while this process works on its first run.
        # spawn, not fork: a fork would copy this process's threads (TensorFlow, torch) mid-flight.
        self.pool = (
            ProcessPoolExecutor(
                jobs - 1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_lane,
                initargs=(*lane_args, True),
            )
            if jobs > 1
            else None
        )
        _start_lane(*lane_args, worker=False)
        self.local = ThreadPoolExecutor(1)
        self.free_workers, self.local_free = jobs - 1, True
        self.on_local: Future | None = None

    def submit(self, ready: list[PlannedRun]) -> dict[Future, PlannedRun]:
        """Start as many of ``ready`` as there are free lanes; returns the started ones."""
        started = {}
        if self.local_free and ready:
            run = next((r for r in ready if r.job == CONVERT_JOB), ready[0])
            self.on_local = self.local.submit(execute, run)
            self.local_free = False
            started[self.on_local] = run
        for run in [r for r in ready if r.job != CONVERT_JOB and r not in started.values()][: self.free_workers]:
            try:
                started[self.pool.submit(execute, run)] = run
            except BrokenProcessPool:  # a worker died (killed, out of memory): the pool is gone, go on here alone
                self.pool.shutdown(wait=False)
                self.pool, self.free_workers = None, 0
                break
            self.free_workers -= 1
        return started

    def release(self, future: Future) -> None:
        if future is self.on_local:
            self.local_free = True
        elif self.pool:
            self.free_workers += 1

    def close(self) -> None:
        self.local.shutdown()
        if self.pool:
            self.pool.shutdown()


def launch(
    runs: list[PlannedRun],
    instance: dg.DagsterInstance,
    pipeline: PipelineConfig,
    jobs: int,
    conversion_only: bool = False,
) -> LaunchSummary:
    """Run ``runs`` in dependency order, ``jobs`` at a time, printing a line per finished run."""
    summary = LaunchSummary()
    if not runs:
        return summary
    finished: dict[PlannedRun, bool] = {}  # run -> succeeded
    pending, running = list(runs), {}
    lanes = _Lanes(instance, pipeline, jobs, conversion_only)
    try:
        while pending or running:
            ready = []
            for run in [r for r in pending if all(dep in finished for dep in r.after)]:
                failed = [dep for dep in run.after if not finished[dep]]
                if run.needs_success and failed:
                    pending.remove(run)
                    finished[run] = False
                    summary.skipped.append(run)
                    print(f"  {run.job:<26} {run.label:<42}         skipped: {failed[0].job} failed", flush=True)
                else:
                    ready.append(run)
            started = lanes.submit(ready)
            pending = [r for r in pending if r not in started.values()]
            running.update(started)
            if not running:
                raise RuntimeError(f"runs wait for runs that were never planned: {[r.label for r in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                lanes.release(future)
                outcome = _outcome(future, running.pop(future))
                finished[outcome.run] = not outcome.failures
                summary.outcomes.append(outcome)
                _print_outcome(outcome)
    finally:
        lanes.close()
    return summary


def _outcome(future: Future, run: PlannedRun) -> RunOutcome:
    try:
        return future.result()
    except Exception as error:  # the worker died (killed, out of memory) or could not load the code location
        return RunOutcome(run, 0.0, [f"worker process failed: {type(error).__name__}: {error}"])


def materialize(
    instance: dg.DagsterInstance,
    pipeline: PipelineConfig,
    models: list[str],
    recipes: list[str],
    rebuild_all: bool = False,
    jobs: int = 1,
    conversion_only: bool = False,
) -> LaunchSummary:
    """Rebuild what is out of date (everything with ``rebuild_all``), then the reports that it changed.

    The same plan the nightly schedules follow; here the runs are launched right
    away instead of leaving the cascade to the automation daemon.
    """
    for run_id in fail_runs_of_dead_processes(instance):
        print(f"Run {run_id} was left STARTED by a process that is gone (killed?); marked it failed.")
    instance.add_dynamic_partitions("model", [m for m in models if not instance.has_dynamic_partition("model", m)])
    plan = rebuild_plan(instance, pipeline, models, recipes, rebuild_all=rebuild_all)
    reports = None if conversion_only else reports_due(instance, models, rebuild_all)
    if plan.empty:
        print("Everything is up to date: nothing to convert or quantize.")
    runs = plan_runs(plan, models, recipes, reports)
    return launch(runs, instance, pipeline, jobs, conversion_only)
