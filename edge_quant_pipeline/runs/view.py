"""What `edge-quant run` shows while it launches runs: a line per finished run (its outcome, and under a failure
the reasons), and below them, live, one line per run going on (its current step, what it waits for if it waits, and
its elapsed time) and a bar over all the runs. On a terminal rich redraws the live part in place; piped to a file
only the finished lines appear.
"""

from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

JOB_WIDTH, LABEL_WIDTH = 26, 42


def run_line(job: str, label: str, seconds: float | None, verdict: str) -> str:
    elapsed = f"{seconds:6.1f}s" if seconds is not None else " " * 7
    return f"  {job:<{JOB_WIDTH}} {label:<{LABEL_WIDTH}} {elapsed}  {verdict}"


@dataclass
class RunView:
    """Call ``started``, ``stage`` and ``finished`` as runs go; ``note`` prints a line of its own above the live
    part. A context manager: the live part is drawn while inside, and gone after."""

    total: int
    console: Console = field(default_factory=lambda: Console(highlight=False, soft_wrap=True))

    def __post_init__(self) -> None:
        # Elapsed time and step first: on a narrow terminal rich cuts the end of the line, the partition key.
        self._running = Progress(
            TextColumn(" "),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stage]:<18}", markup=False, style="cyan"),
            TextColumn("{task.description}", markup=False),
            console=self.console,
        )
        self._overall = Progress(
            TextColumn("  runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console
        )
        self._bar = self._overall.add_task("runs", total=self.total)
        self._tasks: dict[object, TaskID] = {}
        self._live = Live(Group(self._running, self._overall), console=self.console, transient=True)

    def __enter__(self) -> "RunView":
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)

    def started(self, run, job: str, label: str) -> None:
        self._tasks[run] = self._running.add_task(f"{job} {label}", stage="starting")

    def stage(self, run, stage: str) -> None:
        if run in self._tasks:
            self._running.update(self._tasks[run], stage=stage)

    def finished(self, run, job: str, label: str, seconds: float | None, failures: list[str]) -> None:
        """``seconds`` None: the run never started (skipped or refused)."""
        if run in self._tasks:
            self._running.remove_task(self._tasks.pop(run))
        verdict = "ok" if not failures else ("FAILED" if seconds is not None else "not run")
        self.note(run_line(job, label, seconds, verdict) + "".join(f"\n      {reason}" for reason in failures))
        self._overall.advance(self._bar)

    def note(self, line: str) -> None:
        self.console.print(Text(line), soft_wrap=True)
