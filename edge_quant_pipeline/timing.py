"""Timed measurements alone on the machine: one reader-writer lock for every pipeline process of a user.

Latency measured while another step computes on the same cores measures that step too: two runs of the same
commit stored a float prefill of 0.66 and 1.65 ms for the demo. So every stage that computes hard (export,
float reference, quantization, scoring, error localisation) holds the lock shared while it computes, and a
timed measurement (the interpreter's profile, the LiteRT-LM benchmark) holds it exclusively: it starts once
nothing else computes, and nothing starts computing until it ends. The lock file sits beside the memory
ledger (``EDGE_QUANT_MEMORY_LEDGER``), so it covers the same processes.

A timed measurement must not run inside a ``computing`` block of its own process: it would wait for itself.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from edge_quant_pipeline import settings


def lock_path() -> Path:
    ledger = settings.memory_ledger()
    return ledger.with_name(f"{ledger.stem}.timing.lock")


@contextmanager
def _held(mode: int) -> Iterator[None]:
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, mode)  # released when the file closes, and by the kernel if the process dies
        yield


def computing() -> AbstractContextManager[None]:
    """Around work that keeps the cores busy: any number of them at once."""
    return _held(fcntl.LOCK_SH)


def timed_alone() -> AbstractContextManager[None]:
    """Around a measurement of speed: alone, once no ``computing`` block runs."""
    return _held(fcntl.LOCK_EX)
