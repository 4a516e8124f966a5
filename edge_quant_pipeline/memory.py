"""Memory of processes and of this machine, as the Linux kernel counts it (``/proc``), and the admission of
steps by memory.

Peaks are the kernel's high-water marks (``VmHWM``), not samples, so a short spike is never
missed; ``PeakMemory`` resets the mark to measure one phase of a long-lived process.

Before a step that holds a model starts, it reserves its estimated peak (``footprint.py``) in a ledger that
every process on the machine shares (``MemoryLedger``): it starts when that fits in the memory available,
less what the steps already running may still add; it waits while they hold the memory; it fails at once,
saying how much it needs and how much there is, when it could never fit.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_quant_pipeline.processes import WAITING, describe

MB = 2**20


def _status_kb(field: str, pid: int | str = "self") -> int:
    """Raises OSError for a process that is gone; 0 for one that exited and waits to be reaped (a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    if pid == "self":
        raise RuntimeError(f"/proc/self/status has no {field}; memory is measured on Linux only")
    return 0


def peak_rss_mb(pid: int | str = "self") -> float:
    """The process's high-water RSS. Not getrusage: its ru_maxrss survives exec and would report the
    (much larger) parent that forked us."""
    return _status_kb("VmHWM", pid) / 1024


def rss_mb(pid: int | str = "self") -> float:
    return _status_kb("VmRSS", pid) / 1024


def return_freed_memory() -> None:
    """glibc keeps freed heap memory for the process to reuse, however large; after a large structure is gone
    (a runtime's buffers), hand it back to the kernel. A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The peak RSS of this process during a ``with`` block (the kernel's mark, reset on entry).

    Blocks nest (a step's measurement around its evaluation's): the kernel keeps one mark per process, so
    before a block resets it, every enclosing block takes the mark so far, and takes the inner block's peak
    when it ends."""

    _open: list["PeakMemory"] = []  # the blocks of this process being measured, outermost first

    def __enter__(self) -> "PeakMemory":
        self._take_into_open_blocks(peak_rss_mb())
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current RSS
        self.mb = 0.0
        PeakMemory._open.append(self)
        return self

    def __exit__(self, *_exc) -> None:
        PeakMemory._open.remove(self)
        self.mb = max(self.mb, peak_rss_mb())
        self._take_into_open_blocks(self.mb)

    @staticmethod
    def _take_into_open_blocks(mb: float) -> None:
        for block in PeakMemory._open:
            block.mb = max(block.mb, mb)


@dataclass(frozen=True)
class MachineMemory:
    total_mb: float
    available_mb: float  # what the kernel could hand out now without swapping (MemAvailable)


def machine_memory() -> MachineMemory:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return MachineMemory(total_mb=fields["MemTotal"], available_mb=fields["MemAvailable"])


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


# --- admission: steps reserve their estimated peak before they start ------------------------------

# Left to the kernel, the page cache and processes outside the pipeline.
HEADROOM_FRACTION, HEADROOM_MIN_MB = 0.05, 1024
WAIT_POLL_SECONDS, WAIT_LOG_SECONDS = 2.0, 30.0


class NotEnoughMemoryError(RuntimeError):
    """A step needs more memory than this machine can give it, even with nothing else running."""


@dataclass(frozen=True)
class Reservation:
    pid: int
    started: str  # the process's start time (/proc/<pid>/stat), so a reused pid is not mistaken for it
    mb: float  # the step's whole estimated peak; what it may still add is mb minus its process's RSS now
    label: str


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(reservation: Reservation) -> bool:
    return _start_time(reservation.pid) == reservation.started


def _still_to_grow_mb(reservation: Reservation) -> float:
    try:
        return max(0.0, reservation.mb - rss_mb(reservation.pid))
    except OSError:  # it just ended
        return 0.0


def headroom_mb(machine: MachineMemory) -> float:
    return max(HEADROOM_MIN_MB, HEADROOM_FRACTION * machine.total_mb)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    needs_mb: float  # what the step will add to its process
    free_mb: float  # what is available for it now: available memory less what admitted steps may still add
    ever_mb: float  # the most it could get: free now plus what the admitted steps hold
    holders: list[Reservation]


def admission(needs_mb: float, holders: list[Reservation], machine: MachineMemory) -> Admission:
    free = machine.available_mb - headroom_mb(machine) - sum(_still_to_grow_mb(r) for r in holders)
    ever = free + sum(r.mb for r in holders)
    return Admission(needs_mb <= free, needs_mb, free, ever, holders)


def too_large_reason(estimate_mb: float, fits: Admission) -> str:
    """Why a run estimated at ``estimate_mb`` can never start here, ``fits`` saying that it never could."""
    return (
        f"it needs about {estimate_mb / 1024:.1f} GB of memory (the estimated peak of its largest step), and this "
        f"machine can give it at most {fits.ever_mb / 1024:.1f} GB ({machine_memory().total_mb / 1024:.1f} GB in "
        "all). Run it on a machine with more memory."
    )


def never_fits(estimate_mb: float) -> str | None:
    """Why a run estimated at ``estimate_mb`` could not start on this machine even alone; None when it could."""
    fits = admission(estimate_mb, [], machine_memory())
    return too_large_reason(estimate_mb, fits) if fits.needs_mb > fits.ever_mb else None


class MemoryLedger:
    """Reservations of the steps running on this machine, in a JSON file under an exclusive lock.

    Every process of every run on the machine (``edge-quant run``, the daemon's runs, another user's) reads
    the same file, so two large steps never start together when only one fits. Entries of processes that
    died are dropped by whoever reads the file next.
    """

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> list[Reservation]:
        try:
            entries = [Reservation(**e) for e in json.loads(self.path.read_text())]
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return []
        return [e for e in entries if _alive(e)]

    def _write(self, entries: list[Reservation]) -> None:
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps([asdict(e) for e in entries]))
        os.replace(partial, self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_suffix(".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def try_reserve(self, mb: float, label: str) -> Admission:
        """Reserve ``mb`` for this process if it fits now."""
        with self._locked():
            holders = [r for r in self._read() if r.pid != os.getpid()]
            fits = admission(mb - rss_mb(), holders, machine_memory())
            if fits.admitted:
                mine = Reservation(os.getpid(), _start_time(os.getpid()) or "", mb, label)
                self._write([*holders, mine])
            return fits

    def release(self) -> None:
        with self._locked():
            self._write([r for r in self._read() if r.pid != os.getpid()])

    @contextmanager
    def reserved(self, mb: float, label: str, on_wait: Callable[[str], None]) -> Iterator[None]:
        """Hold a reservation of ``mb`` (the step's estimated peak) for the block; wait while others' steps
        hold the memory; raise ``NotEnoughMemoryError`` at once if it could never fit."""
        logged = started = 0.0
        while not (fits := self.try_reserve(mb, label)).admitted:
            if fits.needs_mb > fits.ever_mb:
                raise NotEnoughMemoryError(
                    f"{label} needs about {mb / 1024:.1f} GB of memory (estimated peak), and this machine can "
                    f"give it at most {(fits.ever_mb + rss_mb()) / 1024:.1f} GB "
                    f"({machine_memory().total_mb / 1024:.1f} GB in all, {headroom_mb(machine_memory()) / 1024:.1f} "
                    "GB kept free). Run it on a machine with more memory, or free memory and run it again."
                )
            if time.monotonic() - logged > WAIT_LOG_SECONDS:
                holders = "; ".join(f"{r.label} ({r.mb / 1024:.1f} GB; {describe(r.pid)})" for r in fits.holders)
                on_wait(
                    f"{WAITING}{fits.needs_mb / 1024:.1f} GB of memory ({label}); "
                    f"{max(0.0, fits.free_mb) / 1024:.1f} GB free for it now. Running: {holders or 'none'}."
                )
                logged, started = time.monotonic(), started or time.monotonic()
            time.sleep(WAIT_POLL_SECONDS)
        if started:
            on_wait(f"{label}: admitted after {time.monotonic() - started:.0f} s of waiting for memory")
        try:
            yield
        finally:
            self.release()
