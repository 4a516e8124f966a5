"""Timed measurements wait until no other pipeline process computes (real processes, a real lock file)."""

import logging
import os
import subprocess
import sys
import textwrap
import time

import dagster as dg
from dagster._core.events import DagsterEvent
from dagster._core.events.log import EventLogEntry

from edge_quant_pipeline.runs.launch import current_activity
from edge_quant_pipeline.timing import computing, timed_alone

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge_quant_pipeline.timing import computing
    with computing():
        print("computing", flush=True)
        time.sleep(1.0)
        Path(sys.argv[1]).touch()  # the last thing it does before it lets go
    time.sleep(5)
    """
)


def test_a_timed_measurement_starts_only_once_nothing_computes_and_says_who_it_waits_for(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGE_QUANT_MEMORY_LEDGER", str(tmp_path / "ledger.json"))
    caplog.set_level(logging.INFO, logger="edge_quant_pipeline")
    released = tmp_path / "released"
    other_instance = {**os.environ, "DAGSTER_HOME": str(tmp_path / "another-checkout")}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(released)], stdout=subprocess.PIPE, text=True, env=other_instance
    )
    try:
        assert holder.stdout.readline().strip() == "computing"
        with computing():  # computing is shared: it does not wait for the other process
            assert not released.exists()
        assert not caplog.records  # nothing to wait for
        with timed_alone():
            assert released.exists()
    finally:
        holder.kill()
    waiting, got = caplog.records
    assert "to measure speed alone" in waiting.getMessage() and f"held by: pid {holder.pid}, " in waiting.getMessage()
    assert f"instance {tmp_path / 'another-checkout'}" in waiting.getMessage()
    assert 0 < got.waited_s < 5

    # In a step, these lines go to its run's log (defs/admission.py): `edge-quant run`'s live view shows the step with
    # the wait while it waits, and the step alone once it got the lock.
    instance = dg.DagsterInstance.ephemeral()
    _log(instance, "", DagsterEvent(event_type_value="STEP_START", job_name="job", step_key="evaluation"))
    _log(instance, waiting.getMessage())
    assert current_activity(instance, "run") == f"evaluation: {waiting.getMessage()}"
    _log(instance, got.getMessage())
    assert current_activity(instance, "run") == "evaluation"


def _log(instance: dg.DagsterInstance, message: str, event: DagsterEvent | None = None) -> None:
    entry = EventLogEntry(
        error_info=None,
        level=logging.INFO,
        user_message=message,
        run_id="run",
        timestamp=time.time(),
        step_key="evaluation",
        job_name="job",
        dagster_event=event,
    )
    instance.store_event(entry)
