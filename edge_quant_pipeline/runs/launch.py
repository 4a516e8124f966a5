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

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import dagster as dg

from edge_quant_pipeline import deployment_settings, graph
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.footprint import LITERT_PROCESS_MB
from edge_quant_pipeline.liveness import fail_runs_of_dead_processes
from edge_quant_pipeline.memory import admission, machine_memory, never_fits, rss_mb, too_large_reason
from edge_quant_pipeline.processes import WAITING
from edge_quant_pipeline.rebuild import rebuild_plan, sync_recipe_partitions
from edge_quant_pipeline.runs.plan import PlannedRun, RunOutcome, plan_runs, reports_due, run_estimates
from edge_quant_pipeline.runs.view import RunView
from edge_quant_pipeline.runs.workers import LaunchContext, Worker

POLL_SECONDS = 0.5
# How often the live view asks a run's event log for its step: two SQLite queries, 8.7 ms of CPU taken from the cores
# the workers share (every POLL_SECONDS, about 3 s of CPU in a 90 s run of two lanes).
STAGE_SECONDS = 2.0
STOP_SECONDS = 10  # how long a stopped worker may take to end before it is killed
# A run that only orchestrates (its steps on Celery workers): Dagster and the code location, no model (188 MB
# measured once loaded, before its run).
ORCHESTRATOR_MB = 400


@dataclass
class LaunchSummary:
    outcomes: list[RunOutcome] = field(default_factory=list)
    skipped: list[PlannedRun] = field(default_factory=list)
    # Set when Ctrl-C or SIGTERM stopped the launch: the runs that were going on, and those never started.
    interrupted_by: str | None = None
    interrupted: list[PlannedRun] = field(default_factory=list)
    not_started: list[PlannedRun] = field(default_factory=list)
    # (model, recipe) runs refused before the launch: more memory than this machine could ever give them.
    too_large: list[RunOutcome] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes if o.failures) + len(self.skipped) + len(self.interrupted)


def current_activity(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The step a run started last, from its event log (what the UI shows), and what it waits for while its latest
    log line says it waits (for memory, or for the machine's timing lock: who holds it)."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_START, ascending=False, limit=1
    ).records
    if not records:
        return None
    step = records[0].event_log_entry.step_key
    latest = instance.get_records_for_run(run_id, ascending=False, limit=1).records
    message = latest[0].event_log_entry.user_message if latest else ""
    return f"{step}: {message}" if message.startswith(WAITING) else step


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


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
        started: list[Worker],
    ):
        self.pending, self.estimates, self.launch, self.jobs = list(runs), estimates, launch, jobs
        self.budget_mb, self.view = budget_mb, view
        self.instance = dg.DagsterInstance.from_ref(launch.instance_ref)
        self.workers: list[Worker] = []
        self.started = started  # workers spawned before the launch, taken before new ones
        self.finished: dict[PlannedRun, bool] = {}  # run -> succeeded
        self.stages_shown = 0.0  # when the live view last read the runs' steps
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
            doomed = [r for r in ready if not all(self.finished[dep] for dep in r.required)]
            if not doomed:
                return ready
            for run in doomed:
                failed = next(dep for dep in run.required if not self.finished[dep])
                self.pending.remove(run)
                self.finished[run] = False
                self.summary.skipped.append(run)
                self.view.finished(run, run.job, run.label, None, [f"skipped: its {failed.job} run failed"])

    @property
    def running(self) -> int:
        """How many workers execute a run (at most ``jobs``)."""
        return sum(1 for w in self.workers if w.run)

    @property
    def in_flight_mb(self) -> float:
        """The estimated peaks of the runs going on."""
        return sum(w.estimate_mb for w in self.workers if w.run)

    def fits_budget(self, estimate_mb: float) -> bool:
        """Beside the runs going on, within the launch's budget; a run alone always fits."""
        running = self.in_flight_mb
        return not running or running + estimate_mb <= self.budget_mb

    def spare_workers(self) -> int:
        """How many workers holding no model (loading, or idle) the budget has room for beside the runs going on;
        with none going on, ``jobs``."""
        if not self.in_flight_mb:
            return self.jobs
        return max(0, int((self.budget_mb - self.in_flight_mb) // LITERT_PROCESS_MB))

    def keep_workers_warm(self) -> None:
        """Workers started ahead of their runs, at most ``jobs`` besides those that exit after their run (a
        conversion's), and no more of them idle or loading than the budget has room for beside the runs going on:
        beside a conversion, by default, one, which resolves the recipes and then takes the first run after it."""
        retiring = sum(1 for w in self.workers if w.run and w.run.needs_torch(self.launch.conversion_only))
        spare = self.spare_workers()
        wanted = min(self.jobs + retiring, self.running + min(len(self.pending), spare))
        while len(self.workers) < wanted:
            self.workers.append(self.started.pop(0) if self.started else Worker(self.launch.verbose))
        for worker in self.started:  # more than this launch wants
            worker.dismiss()
        self.started.clear()
        for worker in (w for w in self.workers if not w.assigned):
            worker.assign(self.launch)
        for worker in [w for w in self.workers if w.idle][spare:]:
            worker.dismiss()
            self.retire(worker)

    def start_what_fits(self, ready: list[PlannedRun]) -> None:
        for run in ready:
            worker = next((w for w in self.workers if w.idle), None)
            if worker is None or self.running >= self.jobs:
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
                self.finish(RunOutcome(run, None, [f"not started: {too_large_reason(estimate, fits)}"]))

    def collect(self) -> None:
        """Wait until a worker is ready, a run ends or a worker dies, and take note."""
        wait([h for w in self.workers for h in (w.connection, w.process.sentinel)], timeout=POLL_SECONDS)
        show_stages = time.monotonic() - self.stages_shown >= STAGE_SECONDS
        if show_stages:
            self.stages_shown = time.monotonic()
        for worker in list(self.workers):
            worker.poll()
            run = worker.run
            if run is not None and show_stages and (step := current_activity(self.instance, worker.run_id)):
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
        """Interrupted: stop every worker, and mark the runs they were executing failed. A worker gets SIGTERM, which
        Dagster raises in its step, then SIGKILL if it has not ended by STOP_SECONDS: the step may be in native code
        (an export, a quantization), which runs no signal handler until it returns, or waiting for a child (the
        runtime's check of a 2B model's float bundle takes 15 minutes), which ``subprocess`` waits for as the step
        unwinds. Its children die with it (``processes.die_with_parent``)."""
        for worker in self.workers:
            worker.process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self.workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            if worker.run is not None:
                self.summary.interrupted.append(worker.run)
        self.summary.interrupted_by, self.summary.not_started = reason, list(self.pending)
        self.workers = []
        self.fail_dead_runs()


def too_large(runs: list[PlannedRun], estimates: dict[PlannedRun, float]) -> list[RunOutcome]:
    """The (model, recipe) runs this machine could never give their estimate, with the reason: refused before the
    launch, so that no report waits for them and a later `edge-quant run` does not rebuild one for them."""
    reasons = {run: never_fits(estimates[run]) for run in runs if run.model and run.recipe}
    return [RunOutcome(run, None, [f"not started: {reason}"]) for run, reason in reasons.items() if reason]


def default_budget_mb(estimates: dict[PlannedRun, float]) -> float:
    """What the largest run needs alone, which the machine must fit anyway, and a worker holding no model beside it:
    during a conversion, it resolves the recipes and is ready for the first run after it, instead of both waiting
    for the conversion to end (and for a worker to load, 3 s on the demo)."""
    return max(estimates.values(), default=0.0) + LITERT_PROCESS_MB


def launch(
    runs: list[PlannedRun],
    estimates: dict[PlannedRun, float],
    context: LaunchContext,
    jobs: int,
    budget_mb: float | None = None,
    refused: Sequence[RunOutcome] = (),
    started: list[Worker] | None = None,
) -> LaunchSummary:
    """Run ``runs`` in dependency order, at most ``jobs`` at a time, and side by side only while their estimated
    peaks add up to at most ``budget_mb`` (by default ``default_budget_mb``) and fit in the memory available; show
    them going on, and a line per finished run (first those ``refused`` up front). Workers ``started`` before are
    taken (from the list) before new ones."""
    view = RunView(total=len(runs) + len(refused))
    budget = budget_mb or default_budget_mb(estimates)
    state = _Launch(runs, estimates, context, jobs, budget, view, started if started is not None else [])
    for outcome in refused:
        view.finished(outcome.run, outcome.run.job, outcome.run.label, None, outcome.failures)
    state.summary.too_large = list(refused)
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
            for worker in state.workers + state.started:
                worker.dismiss()
    return state.summary


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
    started: list[Worker] | None = None,
) -> LaunchSummary:
    """Rebuild what is out of date (everything with ``rebuild_all``), then the reports that it changed, in workers
    ``started`` before (they load while this plans) and more as needed.

    The same plan the nightly schedules follow; here the runs are launched right
    away instead of leaving the cascade to the automation daemon.
    """
    for run_id in fail_runs_of_dead_processes(instance):
        print(f"Run {run_id} was left STARTED by a process that is gone (killed?); marked it failed.")
    new_models = [m for m in models if not instance.has_dynamic_partition(graph.MODEL_PARTITION, m)]
    instance.add_dynamic_partitions(graph.MODEL_PARTITION, new_models)
    sync_recipe_partitions(instance, pipeline.recipe_catalog().names)
    plan = rebuild_plan(instance, pipeline, models, recipes, rebuild_all=rebuild_all)
    reports = None if conversion_only else reports_due(instance, models, rebuild_all)
    if plan.empty:
        print("Everything is up to date: nothing to convert or quantize.")
    runs = plan_runs(plan, models, recipes, reports)
    if not runs:
        return LaunchSummary()
    distributed = deployment_settings.executor() in deployment_settings.DISTRIBUTED_EXECUTORS
    refused = []
    if distributed:  # the steps' memory is the workers'; here a run holds Dagster and the code location
        estimates = dict.fromkeys(runs, ORCHESTRATOR_MB)
    else:
        estimates = run_estimates(runs, pipeline, conversion_only)
        if refused := too_large(runs, estimates):
            runs = plan_runs(plan, models, recipes, reports, {(o.run.model, o.run.recipe) for o in refused})
            estimates = run_estimates(runs, pipeline, conversion_only)
    context = LaunchContext(instance.get_ref(), pipeline.model_dump(), conversion_only, verbose, distributed)
    return launch(runs, estimates, context, jobs, memory_budget_mb, refused, started)
