"""Fresh processes forked from a server that imported their modules once (the task processes of LiteRT-LM)."""

import os
import signal
import sys
import time

import pytest

from edge_quant_pipeline.fork_server import ForkServer, ForkServerError, fork_server


def say_where_i_am(text: str, code: int) -> None:
    """A process's work: a line to stderr saying what the server had imported, then its exit status."""
    print(f"{text} in {os.getpid()}, child of {os.getppid()}, csv imported: {'csv' in sys.modules}", file=sys.stderr)
    sys.exit(code)


def fail(kind: str) -> None:
    if kind == "raise":
        raise ValueError("a task that cannot run")
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_long() -> None:
    time.sleep(60)


def test_each_run_is_a_fresh_process_of_one_server_that_imported_its_modules_once():
    server = fork_server(("csv", __name__))
    runs = [server.run(say_where_i_am, {"text": f"run {n}", "code": n}, lambda lines: lines) for n in (0, 3)]
    assert [run.returncode for run in runs] == [0, 3]
    pids = [line.split()[3].rstrip(",") for run in runs for line in run.stderr.splitlines()]
    assert len(set(pids)) == 2 and all(f"child of {server.process.pid}, csv imported: True" in r.stderr for r in runs)
    assert fork_server(("csv", __name__)) is server


def test_a_process_that_fails_says_why_and_the_server_forks_the_next():
    server = fork_server((__name__,))
    raised = server.run(fail, {"kind": "raise"}, lambda lines: lines)
    assert raised.returncode == 1 and raised.stderr.strip().endswith("ValueError: a task that cannot run")
    assert server.run(fail, {"kind": "kill"}, lambda lines: lines).returncode == -signal.SIGKILL
    assert server.run(say_where_i_am, {"text": "after", "code": 0}, lambda lines: lines).returncode == 0


def test_an_interrupted_run_takes_its_process_and_server_with_it():
    """A step interrupted while its process runs (Ctrl-C, the launcher's SIGTERM): nothing of either is left."""
    server = ForkServer((__name__,))

    def interrupt(lines):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        server.run(sleep_long, {}, interrupt)
    assert server.process.poll() is not None
    assert fork_server((__name__,)).alive


def kill_my_server() -> None:
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)  # ended by its server's death (processes.die_with_parent)


def test_a_server_killed_during_a_run_is_an_error_of_that_run_and_the_next_gets_a_new_one():
    server = ForkServer((__name__,))
    with pytest.raises(ForkServerError, match="ended"):
        server.run(kill_my_server, {}, lambda lines: lines)
    assert not server.alive
    after = fork_server((__name__,)).run(say_where_i_am, {"text": "next", "code": 0}, lambda lines: lines)
    assert after.returncode == 0
