"""Measuring a command in a fresh process: wall and CPU time from the kernel, the peak RSS of its process tree
(sampled every 20 ms from /proc) and of its largest process (the kernel's high-water mark, through wait4).

CPU time and the largest process count the command and every descendant it waited for (the launcher's
workers, their runtime profilers), as ``wait4`` reports them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def tree_rss_bytes(root: int) -> dict[int, int]:
    """Resident memory of ``root`` and of each of its descendants, by pid, from /proc."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(entry)] = next(
            (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return {pid: rss.get(pid, 0) for pid in tree}


def _describe(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
    except OSError:
        return "?"


class PeakTreeRss(threading.Thread):
    """Samples the tree's RSS; at each new peak it notes which processes held what, to say where it came from. Above
    ``cap_bytes`` it kills the tree (before the kernel's OOM killer picks a process, maybe another one)."""

    def __init__(self, pid: int, cap_bytes: float | None = None):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running, self.cap_bytes, self.capped = pid, 0, True, cap_bytes, False
        self.started, self.at_peak, self.peak_seconds = time.perf_counter(), {}, 0.0

    def run(self) -> None:
        while self.running:
            by_pid = tree_rss_bytes(self.pid)
            if sum(by_pid.values()) > self.peak:
                self.peak, self.peak_seconds = sum(by_pid.values()), time.perf_counter() - self.started
                self.at_peak = {pid: (rss, _describe(pid)) for pid, rss in by_pid.items() if rss > 50 * 2**20}
            if self.cap_bytes and self.peak > self.cap_bytes and not self.capped:
                self.capped = True
                for pid in by_pid:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def breakdown(self) -> str:
        """The processes of over 50 MB at the peak, largest first."""
        return "; ".join(f"{rss / 2**20:.0f} MB {what}" for rss, what in sorted(self.at_peak.values(), reverse=True))


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    cpu_s: float
    peak_tree_mb: float
    largest_process_mb: float
    status: int
    peak_at_s: float  # when the tree's peak was seen, seconds after the start
    peak_breakdown: str  # the processes at that moment, largest first
    capped: bool = False  # killed for passing the memory cap


def run_measured(
    command: list[str], cwd: Path, env: dict[str, str], log: Path, cap_mb: float | None = None
) -> Measurement:
    """Run ``command`` to its end, or until its process tree passes ``cap_mb``; its output goes to ``log`` (a file:
    a pipe would fill up and block it)."""
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        sampler = PeakTreeRss(process.pid, cap_mb * 2**20 if cap_mb else None)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        sampler.running = False
    return Measurement(
        wall_s=time.perf_counter() - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_tree_mb=sampler.peak / 2**20,
        largest_process_mb=usage.ru_maxrss / 1024,
        status=os.waitstatus_to_exitcode(status),
        peak_at_s=sampler.peak_seconds,
        peak_breakdown=sampler.breakdown(),
        capped=sampler.capped,
    )
