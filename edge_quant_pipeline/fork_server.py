"""Fresh processes forked from a server that imported their modules once.

A fresh process per run keeps a run's memory and crashes to itself, and costs its imports every time: lm-eval's
take 1.2 s, longer than the demo's tasks. A ``ForkServer`` is a child process that imports a list of modules once,
then forks a process per ``run``, which starts with them imported. It works from any process (a worker of
``edge-quant run``, a Celery worker, a test), which Python's ``multiprocessing`` forkserver does not: it refuses a
daemonic process (Celery's are) and cannot pickle Celery's authentication key.

One run at a time per server, over a socket pair: the client sends the function (``module:name``), its keyword
arguments as JSON and the write end of a pipe; the server forks a process whose stderr is that pipe and whose stdout
goes nowhere, waits for it, then sends its exit status. The client reads the pipe as it comes,
as it would a ``subprocess``'s stderr. Servers and the processes they fork die with their parent
(``processes.die_with_parent``).

    python -m edge_quant_pipeline.fork_server <socket fd> <import path as JSON> <module to import>...
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edge_quant_pipeline.processes import die_with_parent

_MESSAGE_BYTES = 1 << 16
LineFilter = Callable[[Iterable[str]], Iterable[str]]


class ForkServerError(RuntimeError):
    """The server ended (killed) before it said how a run went; the run's process ended with it."""


@dataclass(frozen=True)
class Forked:
    stderr: str  # what the process wrote to its stderr, less what the ``lines`` filter took out
    returncode: int  # as ``subprocess`` gives it: negative for the signal that ended it


class ForkServer:
    """A server process that has imported ``preload``; ``run`` forks a fresh process from it."""

    def __init__(self, preload: tuple[str, ...]):
        self.preload = preload
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The client's import path, so that the server finds what the client imports (a test's module, say).
        command = [sys.executable, "-m", __name__, str(theirs.fileno()), json.dumps(sys.path), *preload]
        self.process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.socket, self.owner, self.lock = ours, os.getpid(), threading.Lock()

    @property
    def alive(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None

    def run(self, function: Callable, kwargs: dict[str, Any], lines: LineFilter) -> Forked:
        """``function(**kwargs)`` in a process forked from the server (``kwargs`` as JSON has them); its stderr
        passes through ``lines`` as it comes (a filter that may log what it takes out)."""
        request = json.dumps({"function": f"{function.__module__}:{function.__qualname__}", "kwargs": kwargs})
        reader, writer = os.pipe()
        with self.lock, os.fdopen(reader, errors="replace") as stream:
            try:
                try:
                    socket.send_fds(self.socket, [request.encode()], [writer])
                except OSError as error:
                    raise ForkServerError(f"the fork server (pid {self.process.pid}) is gone: {error}") from error
                finally:
                    os.close(writer)
                stderr = "".join(lines(stream))
                return Forked(stderr, self._receive())
            except BaseException:  # interrupted, or the server gone: it goes, and its process with it (die_with_parent)
                self.stop()
                raise

    def _receive(self) -> int:
        """The exit status of the process the server forked last."""
        message = self.socket.recv(_MESSAGE_BYTES)
        if not message:
            raise ForkServerError(f"the fork server (pid {self.process.pid}) of {', '.join(self.preload)} ended")
        return int(message)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.socket.close()


_servers: dict[tuple[str, ...], ForkServer] = {}


def fork_server(preload: tuple[str, ...]) -> ForkServer:
    """This process's server of ``preload``, started now if it has none running (so that it imports beside this
    process's work when called ahead of the first ``run``)."""
    server = _servers.get(preload)
    if server is None or not server.alive:
        server = _servers[preload] = ForkServer(preload)
    return server


def _serve(connection: socket.socket) -> None:
    while True:
        message, fds, _, _ = socket.recv_fds(connection, _MESSAGE_BYTES, 1)
        if not message:  # the client is gone
            return
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            connection.close()
            _forked(request, fds[0])
        os.close(fds[0])
        _, status = os.waitpid(pid, 0)
        connection.send(str(os.waitstatus_to_exitcode(status)).encode())


def _forked(request: dict, stderr: int) -> None:
    """In the forked process: its stderr into the client's pipe, then the function; its status as a process has it."""
    os.dup2(stderr, 2)
    os.close(stderr)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    die_with_parent()
    code = 0
    try:
        module, name = request["function"].split(":")
        getattr(importlib.import_module(module), name)(**request["kwargs"])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)  # without the interpreter's teardown, as a run's process of this package ends


def main() -> None:
    die_with_parent()
    connection = socket.socket(fileno=int(sys.argv[1]))
    sys.path[:0] = [path for path in json.loads(sys.argv[2]) if path not in sys.path]
    for module in sys.argv[3:]:
        importlib.import_module(module)
    _serve(connection)


if __name__ == "__main__":
    main()
