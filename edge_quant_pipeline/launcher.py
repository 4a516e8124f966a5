"""Run what the rebuild plan asks for, as Dagster runs, several at a time, each in a process of its own.

``edge-quant run`` is a launcher, not an executor: every stage is the same job, partition and asset selection
the UI would launch, executed in process (``execute_in_process``) on the instance in ``DAGSTER_HOME``. What it
adds is parallelism across partitions without a daemon, sized by memory:

- runs execute in worker processes, at most ``jobs`` at a time, started ahead of their runs (importing Dagster
  and the code location takes a few seconds). A worker exits after a conversion, so torch, TensorFlow and the
  model are gone before anything evaluates, and after any run that left it holding more memory than it did
  when it started; no run inherits what another left behind;
- a run starts only when its estimated peak (``footprint.py``) fits in the memory available, beside what the
  running ones may still add; a run that could never fit fails at once, saying how much it needs;
- a worker that dies (the kernel's out-of-memory killer, a person) fails its own run, named, with the signal
  and the memory it had reached; the launcher marks that Dagster run failed and goes on. The kernel is told to
  prefer workers over the launcher when it must kill, so the summary is printed; Ctrl-C or SIGTERM stop the
  workers and print what was done.
"""

import multiprocessing
import os
import signal
import time
import uuid
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository

from edge_quant_pipeline import settings
from edge_quant_pipeline.checkpoints import CheckpointError, find_checkpoints
from edge_quant_pipeline.defs.admission import folder_model_size
from edge_quant_pipeline.defs.automation import CONVERT_JOB, QUANTIZE_JOB, RESOLVE_JOB
from edge_quant_pipeline.defs.checkpoint import fail_runs_of_dead_processes, process_tags
from edge_quant_pipeline.defs.executor import DISTRIBUTED_EXECUTORS
from edge_quant_pipeline.defs.partitions import sync_recipe_partitions
from edge_quant_pipeline.defs.rebuild import DueReports, rebuild_plan, reports_due
from edge_quant_pipeline.defs.resources import ArtifactStore, PipelineConfig
from edge_quant_pipeline.footprint import LITERT_PROCESS_MB, ModelSize, steps_mb
from edge_quant_pipeline.memory import Admission, Reservation, admission, machine_memory, rss_mb
from edge_quant_pipeline.run_view import RunView
from edge_quant_pipeline.staleness import RebuildPlan, as_selection
from edge_quant_pipeline.toolchain import quiet_third_party_noise

REPORT_JOB, ALL_MODELS_REPORT_JOB = "report", "report_all_models"
# `--convert-only`: the assets from checkpoint to quantized .tflite, nothing after them.
CONVERSION_ASSETS = ("checkpoint", "float_tflite", "calibration", "quant_recipe", "resolved_recipe", "quantized_tflite")
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# The kernel's out-of-memory killer picks the process with the highest score: a worker, never the launcher.
WORKER_OOM_SCORE_ADJ = 500
POLL_SECONDS = 0.5
READY = "ready"  # what a worker sends once it has loaded the code location
# A worker whose memory after a run exceeds what it held when ready by more than this is replaced.
WORKER_GROWTH_MB = 256
# A run that only orchestrates (its steps on Celery workers): Dagster and the code location, no model (188 MB
# measured once loaded, before its run).
ORCHESTRATOR_MB = 400


@dataclass(frozen=True)
class PlannedRun:
    job: str
    model: str | None = None
    recipe: str | None = None
    after: tuple["PlannedRun", ...] = ()  # runs that must have finished first
    needs_success: bool = True  # skip this run when one of `after` failed
    assets: tuple[str, ...] | None = None  # a part of the job's assets (None: all of them)

    @property
    def partition_key(self) -> str | None:
        if self.model and self.recipe:
            return dg.MultiPartitionKey({"model": self.model, "recipe": self.recipe})
        return self.model or self.recipe

    @property
    def label(self) -> str:
        part = f" ({', '.join(self.assets)})" if self.assets else ""
        return str(self.partition_key or "") + part


@dataclass(frozen=True)
class RunOutcome:
    run: PlannedRun
    seconds: float | None  # None: it never started
    failures: list[str]  # failed steps and checks, one line each; empty when the run succeeded
    worker_retires: bool = True  # its worker exits after it, rather than take another run


@dataclass(frozen=True)
class WorkerCrash:
    """What a worker sends when an exception escapes it: without it the launcher knows only an exit status."""

    reason: str  # the exception's type and first line


@dataclass
class LaunchSummary:
    outcomes: list[RunOutcome] = field(default_factory=list)
    skipped: list[PlannedRun] = field(default_factory=list)
    # Set when Ctrl-C or SIGTERM stopped the launch: the runs that were going on, and those never started.
    interrupted_by: str | None = None
    interrupted: list[PlannedRun] = field(default_factory=list)
    not_started: list[PlannedRun] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes if o.failures) + len(self.skipped) + len(self.interrupted)


def plan_runs(plan: RebuildPlan, models: list[str], recipes: list[str], reports: DueReports | None) -> list[PlannedRun]:
    """The runs for ``plan``, each with the runs it waits for; conversions first, the long ones.

    ``reports`` None: no reports (``--convert-only``).
    """
    converts = {m: PlannedRun(CONVERT_JOB, model=m, assets=as_selection(assets)) for m, assets in plan.convert.items()}
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


# --- a worker: a process that executes runs -----------------------------------------------------------


@dataclass(frozen=True)
class LaunchContext:
    """What a worker needs to execute runs like this launcher's; plain data, so it crosses to a spawned process."""

    instance_ref: Any
    pipeline_fields: dict[str, Any]
    conversion_only: bool
    # False: the libraries' output (TensorFlow, LiteRT, absl, torch...) goes only to each run's compute logs
    verbose: bool = False
    # True: runs only orchestrate here, their steps run on the executor's workers (defs/executor.py)
    distributed: bool = False

    def pipeline(self) -> PipelineConfig:
        # Resources do not pickle (their config schema does not): rebuilt from their fields.
        fields = self.pipeline_fields
        return PipelineConfig(**{**fields, "artifact_store": ArtifactStore(**fields["artifact_store"])})


def run_asset_names(defs: dg.Definitions, run: PlannedRun, conversion_only: bool) -> list[str]:
    """The assets ``run`` materializes: its own part of its job, and with ``--convert-only`` none after conversion."""
    names = [key.path[-1] for key in defs.resolve_job_def(run.job).asset_layer.executable_asset_keys]
    return [n for n in names if (not run.assets or n in run.assets) and (not conversion_only or n in CONVERSION_ASSETS)]


class Lane:
    """Dagster, the code location and the instance, loaded once in a process that executes runs."""

    def __init__(self, launch: LaunchContext):
        quiet_third_party_noise()
        from edge_quant_pipeline.definitions import build_definitions

        self.defs = build_definitions(launch.pipeline())
        self.instance = dg.DagsterInstance.from_ref(launch.instance_ref)
        self.conversion_only = launch.conversion_only
        self.distributed = launch.distributed

    def execute(self, run: "PlannedRun", run_id: str | None = None) -> "RunOutcome":
        """One Dagster run, as the UI would launch it: in this process, or its steps on the executor's workers."""
        started = time.perf_counter()
        selection = None
        if self.conversion_only or run.assets:
            selection = [dg.AssetKey(name) for name in run_asset_names(self.defs, run, self.conversion_only)]
        if self.distributed:
            result = self._execute_on_workers(run, selection)
        else:
            result = self.defs.resolve_job_def(run.job).execute_in_process(
                partition_key=run.partition_key,
                instance=self.instance,
                raise_on_error=False,
                run_config=RUN_CONFIG,
                asset_selection=selection,
                run_id=run_id,
                tags=process_tags(),  # so that a later run can tell this one died if this process is killed
            )
        checks = result.get_asset_check_evaluations()
        failures = [f"check {c.check_name}: {c.description}" for c in checks if not c.passed]
        failures += [
            step_failure_reason(e.step_failure_data.error)
            for e in result.all_events
            # a step stopped by a failed blocking check: the check's line above says why
            if e.is_step_failure and e.step_failure_data.error.cls_name != "DagsterAssetCheckFailedError"
        ]
        if failures or result.success is False:
            # Its steps' output, the libraries' included, is in its compute logs, which the UI shows.
            failures.append(f"run {result.run_id}: its logs are in `dagster dev`, Runs")
        return RunOutcome(run=run, seconds=time.perf_counter() - started, failures=failures)

    def _execute_on_workers(self, run: "PlannedRun", selection: list[dg.AssetKey] | None) -> dg.JobExecutionResult:
        """The run through its job's executor: workers load the job from the code location's module by name, as
        for a run the daemon launches, and read their settings from their own environment."""
        from edge_quant_pipeline import definitions

        repository = ReconstructableRepository.for_module(definitions.__name__, "defs")  # its @dg.definitions
        tags = process_tags()
        if run.partition_key:
            tags |= self.defs.resolve_job_def(run.job).get_tags_for_partition_key(run.partition_key, selection)
        return dg.execute_job(
            repository.get_reconstructable_job(run.job),
            self.instance,
            run_config=RUN_CONFIG,
            tags=tags,
            asset_selection=selection,
        )


def step_failure_reason(error: Any) -> str:
    """The first line of what went wrong in a step (a ``SerializableErrorInfo``): Dagster wraps an exception a
    step raises in one of its own ("Error occurred while executing op ..."), the exception being its cause."""
    while error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
        error = error.cause
    return error.message.strip().splitlines()[0]


def _worker_main(connection: Connection, launch: LaunchContext) -> None:
    """Load; then, while the launcher sends runs, execute each and send its outcome. The worker exits after a
    conversion (which imported torch and held the model) and after any run that left its memory above what
    it held when it was ready: the next run gets a process holding nothing of the last."""
    Path("/proc/self/oom_score_adj").write_text(str(WORKER_OOM_SCORE_ADJ))
    if not launch.verbose:
        _silence_terminal()
    try:
        _serve_runs(connection, launch)
    except Exception as error:
        first = next(iter(str(error).strip().splitlines()), "")
        connection.send(WorkerCrash(f"{type(error).__name__}: {first}" if first else type(error).__name__))
        raise
    # Everything is sent and the instance's writes are done: skip the interpreter's teardown, which torch and
    # TensorFlow stretch to seconds and in which LiteRT logs the teardown of its accelerators.
    connection.close()
    os._exit(0)


def _serve_runs(connection: Connection, launch: LaunchContext) -> None:
    """Load the code location, say so, then execute runs until told to stop or until this worker should retire."""
    lane = Lane(launch)
    if not launch.distributed:
        import ai_edge_quantizer.quantizer  # noqa: F401  (most runs need it: imported while waiting for one)

    baseline_mb = rss_mb()
    connection.send(READY)
    while (message := connection.recv()) is not None:
        run, run_id = message
        outcome = lane.execute(run, run_id)
        retire = run.job == CONVERT_JOB or rss_mb() > baseline_mb + WORKER_GROWTH_MB
        connection.send(replace(outcome, worker_retires=retire))
        if retire:
            return


def _silence_terminal() -> None:
    """Point this process's stdout and stderr, the file descriptors themselves (C++ libraries write to them), away
    from the terminal. Dagster still captures each step's output into the run's compute logs: it redirects the
    descriptors to its log file for the step, and copies to these only what the terminal would have shown."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


class Worker:
    """A spawned worker process, from its start to the outcome of its one run."""

    def __init__(self, launch: LaunchContext):
        self.connection, theirs = multiprocessing.Pipe()
        # spawn, not fork: a fork would copy the launcher's threads mid-flight
        self.process = multiprocessing.get_context("spawn").Process(
            target=_worker_main, args=(theirs, launch), daemon=True
        )
        self.process.start()
        theirs.close()
        self.ready = False
        self.run: PlannedRun | None = None
        self.run_id: str | None = None
        self.outcome: RunOutcome | None = None
        self.crash: WorkerCrash | None = None
        self.estimate_mb = LITERT_PROCESS_MB
        self.started = time.perf_counter()
        self.peak_mb = 0.0  # the largest RSS seen while it worked

    @property
    def idle(self) -> bool:
        return self.ready and self.run is None

    def start(self, run: "PlannedRun", estimate_mb: float) -> None:
        self.run_id = str(uuid.uuid4())  # as Dagster makes them; chosen here so that the launcher can follow the run
        self.connection.send((run, self.run_id))
        self.run, self.outcome = run, None
        self.estimate_mb, self.started, self.peak_mb = estimate_mb, time.perf_counter(), 0.0

    def poll(self) -> None:
        """Read what it sent, and how much memory it holds."""
        try:
            while self.connection.poll():
                message = self.connection.recv()
                self.ready = self.ready or message == READY
                if isinstance(message, RunOutcome):
                    self.outcome = message
                elif isinstance(message, WorkerCrash):
                    self.crash = message
        except (EOFError, OSError):  # it exited
            pass
        try:
            self.peak_mb = max(self.peak_mb, rss_mb(self.process.pid))
        except OSError:
            pass

    def take_outcome(self) -> RunOutcome | None:
        """The outcome of its run, once sent; the worker is idle again unless it retires."""
        outcome, self.outcome = self.outcome, None
        if outcome is not None:
            self.run, self.estimate_mb = None, LITERT_PROCESS_MB
        return outcome

    def reservation(self) -> Reservation:
        return Reservation(self.process.pid, "", self.estimate_mb, self.run.label if self.run else "starting worker")

    def death(self) -> str:
        """Why the process ended before its run did."""
        self.process.join()
        self.poll()  # what it sent just before it exited
        code = self.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            cause = " (the kernel's out-of-memory killer, or a person)" if name == "SIGKILL" else ""
            return f"its worker process was killed by {name}{cause} at {self.peak_mb / 1024:.1f} GB of memory"
        if self.crash:
            return f"its worker process failed: {self.crash.reason}"
        return f"its worker process exited with status {code}"

    def dismiss(self) -> None:
        """Tell an idle worker there is nothing to do; stop one that is still loading."""
        try:
            self.connection.send(None)
        except OSError:
            self.process.terminate()


# --- the launcher -------------------------------------------------------------------------------------


def current_step(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The step a run started last, from its event log (what the UI shows)."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_START, ascending=False, limit=1
    ).records
    return records[0].event_log_entry.step_key if records else None


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def not_started_reason(estimate_mb: float, fits: Admission) -> str:
    return (
        f"not started: it needs about {estimate_mb / 1024:.1f} GB of memory (the estimated peak of its largest "
        f"step), and this machine can give it at most {fits.ever_mb / 1024:.1f} GB "
        f"({machine_memory().total_mb / 1024:.1f} GB in all). Run it on a machine with more memory."
    )


class _Launch:
    """The state of one launch: what waits, what runs in which worker, what finished."""

    def __init__(
        self,
        runs: list[PlannedRun],
        estimates: dict[PlannedRun, float],
        launch: LaunchContext,
        jobs: int,
        budget_mb: float,
        view: RunView,
    ):
        self.pending, self.estimates, self.launch, self.jobs = list(runs), estimates, launch, jobs
        self.budget_mb, self.view = budget_mb, view
        self.instance = dg.DagsterInstance.from_ref(launch.instance_ref)
        self.workers: list[Worker] = []
        self.finished: dict[PlannedRun, bool] = {}  # run -> succeeded
        self.summary = LaunchSummary()

    @property
    def busy(self) -> bool:
        return bool(self.pending) or any(w.run for w in self.workers)

    def finish(self, outcome: RunOutcome) -> None:
        self.finished[outcome.run] = not outcome.failures
        self.summary.outcomes.append(outcome)
        run = outcome.run
        self.view.finished(run, run.job, run.label, outcome.seconds, outcome.failures)

    def ready_runs(self) -> list[PlannedRun]:
        """The runs that may start now, after skipping those whose prerequisites failed (and theirs, and so on)."""
        while True:
            ready = [r for r in self.pending if all(dep in self.finished for dep in r.after)]
            doomed = [r for r in ready if r.needs_success and not all(self.finished[dep] for dep in r.after)]
            if not doomed:
                return ready
            for run in doomed:
                failed = next(dep for dep in run.after if not self.finished[dep])
                self.pending.remove(run)
                self.finished[run] = False
                self.summary.skipped.append(run)
                self.view.finished(run, run.job, run.label, None, [f"skipped: its {failed.job} run failed"])

    @property
    def in_flight_mb(self) -> float:
        """The estimated peaks of the runs going on."""
        return sum(w.estimate_mb for w in self.workers if w.run)

    def fits_budget(self, estimate_mb: float) -> bool:
        """Beside the runs going on, within the launch's budget; a run alone always fits."""
        running = self.in_flight_mb
        return not running or running + estimate_mb <= self.budget_mb

    def keep_workers_warm(self) -> None:
        """Workers started ahead of their runs, at most ``jobs``, and none kept idle while the runs going on leave
        no room in the budget for another."""
        busy = sum(1 for w in self.workers if w.run)
        room = self.fits_budget(LITERT_PROCESS_MB)
        wanted = min(self.jobs, busy + (len(self.pending) if room else 0))
        self.workers += [Worker(self.launch) for _ in range(wanted - len(self.workers))]
        if not room:
            for worker in [w for w in self.workers if w.idle]:
                worker.dismiss()
                self.retire(worker)

    def start_what_fits(self, ready: list[PlannedRun]) -> None:
        for run in ready:
            worker = next((w for w in self.workers if w.idle), None)
            if worker is None:
                return
            estimate = self.estimates[run]
            if not self.fits_budget(estimate):
                continue  # a smaller one may fit beside what runs
            others = [w.reservation() for w in self.workers if w is not worker]
            fits = admission(estimate - rss_mb(worker.process.pid), others, machine_memory())
            if fits.admitted:
                self.pending.remove(run)
                worker.start(run, estimate)
                self.view.started(run, run.job, run.label)
            elif fits.needs_mb > fits.ever_mb:
                self.pending.remove(run)
                self.finish(RunOutcome(run, None, [not_started_reason(estimate, fits)]))

    def collect(self) -> None:
        """Wait until a worker is ready, a run ends or a worker dies, and take note."""
        wait([h for w in self.workers for h in (w.connection, w.process.sentinel)], timeout=POLL_SECONDS)
        for worker in list(self.workers):
            worker.poll()
            run = worker.run
            if run is not None and (step := current_step(self.instance, worker.run_id)):
                self.view.stage(run, step)
            if (outcome := worker.take_outcome()) is not None:
                self.finish(outcome)
                if outcome.worker_retires:
                    self.retire(worker)
            elif not worker.process.is_alive():
                self.retire(worker)
                if run is None:
                    raise RuntimeError(
                        f"a worker process could not load the code location ({worker.death()}); "
                        "run `dagster definitions validate -m edge_quant_pipeline.definitions` to see why."
                    )
                self.finish(RunOutcome(run, time.perf_counter() - worker.started, [worker.death()]))
                self.fail_dead_runs()

    def retire(self, worker: Worker) -> None:
        self.workers.remove(worker)
        worker.process.join(timeout=30)

    def fail_dead_runs(self) -> None:
        for run_id in fail_runs_of_dead_processes(self.instance):
            self.view.note(f"      its Dagster run {run_id} is marked failed")

    def stop(self, reason: str) -> None:
        """Interrupted: stop every worker, and mark the runs they were executing failed."""
        for worker in self.workers:
            worker.process.terminate()
        for worker in self.workers:
            worker.process.join(timeout=30)
            if worker.run is not None:
                self.summary.interrupted.append(worker.run)
        self.summary.interrupted_by, self.summary.not_started = reason, list(self.pending)
        self.workers = []
        self.fail_dead_runs()


def launch(
    runs: list[PlannedRun],
    estimates: dict[PlannedRun, float],
    context: LaunchContext,
    jobs: int,
    budget_mb: float | None = None,
) -> LaunchSummary:
    """Run ``runs`` in dependency order, at most ``jobs`` at a time, and side by side only while their estimated
    peaks add up to at most ``budget_mb`` (by default: what the largest of them needs alone, which the machine
    must fit anyway) and fit in the memory available; show them going on, and a line per finished run."""
    view = RunView(total=len(runs))
    state = _Launch(runs, estimates, context, jobs, budget_mb or max(estimates.values(), default=0.0), view)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    with view:
        try:
            while state.busy:
                ready = state.ready_runs()
                state.keep_workers_warm()
                state.start_what_fits(ready)
                if not state.busy:
                    break
                if not state.workers:
                    raise RuntimeError(
                        f"runs wait for runs that were never planned: {[r.label for r in state.pending]}"
                    )
                state.collect()
        except KeyboardInterrupt as interrupt:
            state.stop(str(interrupt) or "SIGINT")
        finally:
            signal.signal(signal.SIGTERM, previous)
            for worker in state.workers:
                worker.dismiss()
    return state.summary


def run_estimates(
    runs: list[PlannedRun], pipeline: PipelineConfig, defs: dg.Definitions, conversion_only: bool
) -> dict[PlannedRun, float]:
    """Each run's estimated peak: the largest of its steps for its model's size."""
    folders = find_checkpoints(pipeline.checkpoint_dir_path)
    sizes: dict[str, ModelSize | None] = {}
    for model in {r.model for r in runs if r.model}:
        try:
            sizes[model] = folder_model_size(folders[model], pipeline) if model in folders else None
        except (CheckpointError, OSError):
            sizes[model] = None  # its run fails at the checkpoint step, with the reason
    estimates, catalog = {}, pipeline.recipe_catalog()
    for run in runs:
        size = sizes.get(run.model) if run.model else None
        steps = run_asset_names(defs, run, conversion_only)
        recipe = catalog.recipes.get(run.recipe) if run.recipe else None
        estimates[run] = steps_mb(steps, size, recipe, catalog.calibration_need) if size else LITERT_PROCESS_MB
    return estimates


def materialize(
    instance: dg.DagsterInstance,
    pipeline: PipelineConfig,
    models: list[str],
    recipes: list[str],
    rebuild_all: bool = False,
    jobs: int = 1,
    conversion_only: bool = False,
    memory_budget_mb: float | None = None,
    verbose: bool = False,
) -> LaunchSummary:
    """Rebuild what is out of date (everything with ``rebuild_all``), then the reports that it changed.

    The same plan the nightly schedules follow; here the runs are launched right
    away instead of leaving the cascade to the automation daemon.
    """
    for run_id in fail_runs_of_dead_processes(instance):
        print(f"Run {run_id} was left STARTED by a process that is gone (killed?); marked it failed.")
    instance.add_dynamic_partitions("model", [m for m in models if not instance.has_dynamic_partition("model", m)])
    sync_recipe_partitions(instance, pipeline.recipe_catalog().names)
    plan = rebuild_plan(instance, pipeline, models, recipes, rebuild_all=rebuild_all)
    reports = None if conversion_only else reports_due(instance, models, rebuild_all)
    if plan.empty:
        print("Everything is up to date: nothing to convert or quantize.")
    runs = plan_runs(plan, models, recipes, reports)
    if not runs:
        return LaunchSummary()
    from edge_quant_pipeline.definitions import build_definitions

    distributed = settings.executor() in DISTRIBUTED_EXECUTORS
    if distributed:  # the steps' memory is the workers'; here a run holds Dagster and the code location
        estimates = dict.fromkeys(runs, ORCHESTRATOR_MB)
    else:
        estimates = run_estimates(runs, pipeline, build_definitions(pipeline), conversion_only)
    context = LaunchContext(instance.get_ref(), pipeline.model_dump(), conversion_only, verbose, distributed)
    return launch(runs, estimates, context, jobs, memory_budget_mb)
