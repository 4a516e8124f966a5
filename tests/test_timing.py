"""Timed measurements wait until no other pipeline process computes (real processes, a real lock file)."""

import os
import subprocess
import sys
import textwrap

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


def test_a_timed_measurement_starts_only_once_nothing_computes(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_QUANT_MEMORY_LEDGER", str(tmp_path / "ledger.json"))
    released = tmp_path / "released"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(released)], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert holder.stdout.readline().strip() == "computing"
        with computing():  # computing is shared: it does not wait for the other process
            assert not released.exists()
        with timed_alone():
            assert released.exists()
    finally:
        holder.kill()
