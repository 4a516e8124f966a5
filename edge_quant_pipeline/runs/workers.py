"""A worker: a process of `edge-quant run` that loads Dagster and the code location once, then executes the runs
the launcher sends it, each as the UI would launch it, and tells the launcher how each went."""

import functools
import importlib
import multiprocessing
import os
import pkgutil
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository

from edge_quant_pipeline.config import ArtifactStore, PipelineConfig
from edge_quant_pipeline.evaluate.litert_lm import start_task_server
from edge_quant_pipeline.footprint import LITERT_PROCESS_MB
from edge_quant_pipeline.liveness import process_tags
from edge_quant_pipeline.memory import Reservation, rss_mb
from edge_quant_pipeline.processes import die_with_parent
from edge_quant_pipeline.runs.plan import PlannedRun, RunOutcome
from edge_quant_pipeline.toolchain import quiet_third_party_noise

RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# The kernel's out-of-memory killer picks the process with the highest score: a worker, never the launcher.
WORKER_OOM_SCORE_ADJ = 500
READY = "ready"  # what a worker sends once it has loaded the code location
# A worker whose memory after a run exceeds what it held when ready by more than this is replaced.
WORKER_GROWTH_MB = 256
# The workers `edge-quant run` starts before it has a plan, to import the code location meanwhile: the first run's,
# and one beside it (the room ``launch.default_budget_mb`` leaves).
FIRST_WORKERS = 2


@dataclass(frozen=True)
class WorkerCrash:
    """What a worker sends when an exception escapes it: without it the launcher knows only an exit status."""

    reason: str  # the exception's type and first line


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
            selection = [dg.AssetKey(name) for name in run.asset_names(self.conversion_only)]
        with _partition_keys_checked_once(self.instance):
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


@contextmanager
def _partition_keys_checked_once(instance: dg.DagsterInstance) -> Iterator[None]:
    """Dagster asks the instance whether the run's dynamic partition keys exist each time it maps the run's
    partition to an input's: 196 SQLite queries of about 6 ms each in one (model, recipe) run, over a second of it.
    Partitions are added and removed by the launcher before it starts runs, so within a run each answer is asked
    for once."""
    instance.has_dynamic_partition = functools.cache(instance.has_dynamic_partition)  # shadows the method
    try:
        yield
    finally:
        del instance.has_dynamic_partition


def step_failure_reason(error: Any) -> str:
    """The first line of what went wrong in a step (a ``SerializableErrorInfo``). Dagster wraps an exception a
    step raises, or one raised while loading its input, in one of its own ("Error occurred while executing op
    ...", "... while loading input ..."), the exception being its cause; a ``dg.Failure`` the pipeline raises on
    purpose is its description alone, without the class's module path."""
    while error.cls_name.startswith("DagsterExecution") and error.cause is not None:
        error = error.cause
    first = error.message.strip().splitlines()[0]
    return first.partition(": ")[2] or first if error.cls_name == "Failure" else first


def _worker_main(connection: Connection, verbose: bool) -> None:
    """Import the code location while the launcher plans; then load it for the launch it is assigned to and, while
    the launcher sends runs, execute each and send its outcome. The worker exits after a run of steps that import
    torch and hold the model (a conversion's) and after any run that left its memory above what it held when it
    was ready: the next run gets a process holding nothing of the last."""
    Path("/proc/self/oom_score_adj").write_text(str(WORKER_OOM_SCORE_ADJ))
    die_with_parent()  # a launcher that ends before assigning it work leaves nothing behind
    if not verbose:
        _silence_terminal()
    try:
        _import_code_location()
        launch = connection.recv()
        if launch is not None:
            _serve_runs(connection, launch)
    except EOFError:  # the launcher went before assigning it anything
        pass
    except Exception as error:
        first = next(iter(str(error).strip().splitlines()), "")
        connection.send(WorkerCrash(f"{type(error).__name__}: {first}" if first else type(error).__name__))
        raise
    # Everything is sent and the instance's writes are done: skip the interpreter's teardown, which torch and
    # TensorFlow stretch to seconds and in which LiteRT logs the teardown of its accelerators.
    connection.close()
    os._exit(0)


def _import_code_location() -> None:
    """What loading the code location imports, whatever the launch's settings (1.0 of the 1.3 s it takes): its
    asset modules, and ai-edge-quantizer, which the recipes' code versions and most runs use."""
    import ai_edge_quantizer.quantizer  # noqa: F401

    from edge_quant_pipeline import defs

    for module in pkgutil.iter_modules(defs.__path__):
        importlib.import_module(f"{defs.__name__}.{module.name}")


def _serve_runs(connection: Connection, launch: LaunchContext) -> None:
    """Load the code location, say so, then execute runs until told to stop or until this worker should retire."""
    lane = Lane(launch)
    if launch.pipeline().evaluation.tasks and not (launch.distributed or launch.conversion_only):
        # It imports lm-eval beside this process's work (a conversion's export, whose float baseline answers the
        # tasks too), once for the worker's evaluations.
        start_task_server()

    baseline_mb = rss_mb()
    connection.send(READY)
    while (message := connection.recv()) is not None:
        run, run_id = message
        outcome = lane.execute(run, run_id)
        retire = run.needs_torch(lane.conversion_only) or rss_mb() > baseline_mb + WORKER_GROWTH_MB
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
    """A spawned worker process, from its start to the outcome of its one run. It starts importing at once, and
    loads the code location for a launch once ``assign``ed to it."""

    def __init__(self, verbose: bool = False):
        self.connection, theirs = multiprocessing.Pipe()
        # spawn, not fork: a fork would copy the launcher's threads mid-flight
        self.process = multiprocessing.get_context("spawn").Process(
            target=_worker_main, args=(theirs, verbose), daemon=True
        )
        self.process.start()
        theirs.close()
        self.assigned = False
        self.ready = False
        self.run: PlannedRun | None = None
        self.run_id: str | None = None
        self.outcome: RunOutcome | None = None
        self.crash: WorkerCrash | None = None
        self.estimate_mb = LITERT_PROCESS_MB
        self.started = time.perf_counter()
        self.peak_mb = 0.0  # the largest RSS seen while it worked

    def assign(self, launch: LaunchContext) -> None:
        """Let it load the code location for ``launch``, and then take its runs."""
        self.connection.send(launch)
        self.assigned = True

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
        """Tell an idle or unassigned worker there is nothing to do; stop one that is still loading."""
        try:
            self.connection.send(None)
        except OSError:
            self.process.terminate()
