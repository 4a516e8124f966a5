"""Whether a process still runs: how a later run tells that the process executing an earlier one is gone."""

import os
from pathlib import Path


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
