"""Processes of this host: whether one still runs (how a later run tells that the process executing an earlier one
is gone), what it is, and who holds a lock."""

import ctypes
import os
import signal
from pathlib import Path

# How every notice of a wait (for memory, for the machine's timing lock) starts: `edge-quant run`'s live view shows a
# run's latest log line while it is one (runs/launch.py).
WAITING = "Waiting for "
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def is_alive(pid: int) -> bool:
    """Whether a process of this host with this pid runs (a zombie does not)."""
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Killed but never reaped: in a container without an init process, a killed worker keeps its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux), or it just went
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"  # the state follows the parenthesized command name


def describe(pid: int) -> str:
    """``pid 123, edge-quant run --model x, instance /home/me/proj``: the process, named by its own command line or
    by that of the nearest process above it that is an ``edge-quant`` or ``dagster`` command (a step's worker is a
    bare Python), and the Dagster instance it runs for (``DAGSTER_HOME``), where /proc lets this user read them."""
    commands = [_command(p) for p in _lineage(pid)]
    command = next((c for c in commands if "edge-quant" in c or "dagster" in c), commands[0] if commands else "")
    instance = _environment(pid).get("DAGSTER_HOME", "unknown")
    return f"pid {pid}, {command or 'unknown command'}, instance {instance}"


def _lineage(pid: int) -> list[int]:
    """``pid`` and the processes above it, up to init."""
    lineage = []
    while pid > 1 and pid not in lineage:
        lineage.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return lineage


def _command(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    words = [w.decode(errors="replace") for w in words]
    command = " ".join([Path(words[0]).name, *words[1:]])
    return " ".join(command.split())[:120]  # a `python -c` script's lines on one line


def _environment(pid: int) -> dict[str, str]:
    try:
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def flock_holders(path: Path) -> list[int]:
    """The processes holding an ``flock`` on ``path``, from /proc/locks ([] where there is none to read)."""
    try:
        inode, locks = path.stat().st_ino, Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    # "1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF"; a waiter's line has "->" after the number
    fields = [line.split() for line in locks if "->" not in line]
    holders = {int(f[4]) for f in fields if len(f) > 5 and f[1] == "FLOCK" and f[5].endswith(f":{inode}")}
    return sorted(holders - {0})  # 0: a process of another pid namespace (a container), which /proc cannot show


def last_word(stderr: str, returncode: int) -> str:
    """Why a child process failed, as the children here say it: the last line it wrote to stderr (an exception's
    one line), else its exit status."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {returncode}"


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux's PR_SET_PDEATHSIG; elsewhere nothing): what a step starts
    (an export, the runtime's check and profile) must not go on holding the machine's memory for nobody once the
    step's process is gone, killed by the OOM killer, a person or a stopped launch. Linux sends it when the thread
    that started the child ends: Dagster runs a step, and so starts its children, in its process's main thread."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent went before the request was in place
        os._exit(1)
