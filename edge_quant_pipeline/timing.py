"""Timed measurements alone on the machine: one reader-writer lock for every pipeline process of a user.

Latency measured while another step computes on the same cores measures that step too: two runs of the same
commit stored a float prefill of 0.66 and 1.65 ms for the demo. So every stage that computes hard (export,
float reference, quantization, scoring, error localisation) holds the lock shared while it computes, and a
timed measurement (the interpreter's profile, the LiteRT-LM benchmark) holds it exclusively: it starts once
nothing else computes, and nothing starts computing until it ends. The lock file sits beside the memory
ledger (``EDGE_QUANT_MEMORY_LEDGER``), so it covers the same processes.

A timed measurement must not run inside a ``computing`` block of its own process: it would wait for itself. A
block that has to wait logs (logger ``edge_quant_pipeline.timing``) who holds the lock: each holder's pid, command and
Dagster instance, since the lock is the machine's, shared with other checkouts and instances; then how long it
waited (``waited_s``), which the step's metadata sums up (``defs/admission.py``). Point ``EDGE_QUANT_MEMORY_LEDGER``
at another file to give a group of processes (a container, a checkout) a ledger and a lock of their own.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO

from edge_quant_pipeline import deployment_settings
from edge_quant_pipeline.processes import WAITING, describe, flock_holders

log = logging.getLogger(__name__)
_KIND = {fcntl.LOCK_SH: "to compute beside others", fcntl.LOCK_EX: "to measure speed alone"}


def lock_path() -> Path:
    ledger = deployment_settings.memory_ledger()
    return ledger.with_name(f"{ledger.stem}.timing.lock")


@contextmanager
def _held(mode: int) -> Iterator[IO[str]]:
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:  # released when the file closes, and by the kernel if the process dies
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = "; ".join(map(describe, flock_holders(path))) or "a process this user cannot see"
            log.info("%sthe machine's timing lock %s (%s), held by: %s", WAITING, _KIND[mode], path, holders)
            started = time.monotonic()
            fcntl.flock(lock, mode)
            waited = time.monotonic() - started
            log.info("Got the timing lock after %.1f s", waited, extra={"waited_s": waited})
        yield lock


def computing() -> AbstractContextManager[IO[str]]:
    """Around work that keeps the cores busy: any number of them at once."""
    return _held(fcntl.LOCK_SH)


@contextmanager
def timed_alone() -> Iterator[Callable[[], None]]:
    """Around a measurement of speed: alone, once no ``computing`` block runs. Gives a function that ends the
    measurement early: the rest of the block computes beside others, as a ``computing`` block (the lock held
    shared; a process that waited to measure may measure first)."""
    with _held(fcntl.LOCK_EX) as lock:
        yield lambda: fcntl.flock(lock, fcntl.LOCK_SH)
