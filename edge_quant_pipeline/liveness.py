"""Runs whose process is gone: a run whose process was killed (SIGKILL, out of memory) stays STARTED and keeps its
`litert_export` pool slot, and with it every later export would wait forever. Whoever starts a run tags it with
its process; the next conversion, or `edge-quant run`, ends the runs of processes that are gone."""

import os
import socket

import dagster as dg

from edge_quant_pipeline.processes import is_alive

# "<host>:<pid>" of the process executing a run; set by this step, or by whoever launches the run.
PROCESS_TAG = "edge_quant/process"
# Executors that run every step in the run's own process, so that a step's pid is the run's.
RUN_PROCESS_EXECUTORS = ("in_process", "execute_in_process_executor")


def process_tags() -> dict[str, str]:
    """Tags naming this process as the one executing a run (pass them to ``execute_in_process``)."""
    return {PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"}


def fail_runs_of_dead_processes(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every STARTED run tagged with a process of this host that no longer exists, and free the
    pool slots it holds; returns their run ids.

    Only runs carrying ``PROCESS_TAG`` are judged, and only on the host that ran them: a pid means nothing
    elsewhere. A reused pid makes a dead run look alive, which leaves it as Dagster would (never the reverse).
    """
    host = socket.gethostname()
    failed = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        run = record.dagster_run
        run_host, _, pid = run.tags.get(PROCESS_TAG, "").rpartition(":")
        if run_host != host or not pid.isdigit() or is_alive(int(pid)):
            continue
        instance.report_run_failed(
            run,
            f"The process executing this run (pid {pid} on {host}) is gone: it was killed before the run "
            "could end. Marked failed, and its pool slots freed, by a later run on this host.",
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    return failed
