"""`checkpoint`: find and validate the model's checkpoint folder; its data version is its bytes' hash.

It is the first step of every conversion, so it also ends the runs that died without ending: a run
whose process was killed (SIGKILL, out of memory) stays STARTED and keeps its `litert_export` pool
slot, and with it every later export would wait forever.
"""

import os
import socket
from dataclasses import replace
from pathlib import Path

import dagster as dg

from edge_quant_pipeline.architectures import UnsupportedArchitectureError
from edge_quant_pipeline.checkpoints import (
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    scan_checkpoints,
    weight_files,
)
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.exporters import ExporterSettingError, plan_export
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


def _checkpoint_folder(root: Path, model_id: str) -> Path:
    scan = scan_checkpoints(root)
    if model_id in scan.found:
        return scan.found[model_id]
    missing = f"{root}: no checkpoint folder for model {model_id!r} (a folder holding config.json)."
    raise CheckpointError(scan.refusal_for(model_id) or missing)


@dg.asset(partitions_def=model_partitions, group_name="checkpoints", code_version="checkpoint-1")
def checkpoint(context: dg.AssetExecutionContext, pipeline: PipelineConfig) -> dg.Output[Checkpoint]:
    """A Hugging Face style checkpoint folder (config.json + weights), validated and hashed."""
    for run_id in fail_runs_of_dead_processes(context.instance):
        context.log.warning(f"Run {run_id} was left STARTED by a process that is gone; marked it failed.")
    if context.job_def.executor_def.name in RUN_PROCESS_EXECUTORS:
        context.instance.add_run_tags(context.run_id, process_tags())
    try:
        found = read_checkpoint(_checkpoint_folder(pipeline.checkpoint_dir_path, context.partition_key))
        # Fails here, at the checkpoint, for a family neither of litert-torch's exporters takes.
        plan = plan_export(found.hf_config, found.path / "config.json", pipeline.exporter)
        found = replace(found, shape=plan.shape, exporter=plan.exporter)
    except (CheckpointError, UnsupportedArchitectureError, ExporterSettingError) as error:
        raise dg.Failure(str(error)) from None
    return dg.Output(
        found,
        data_version=dg.DataVersion(found.content_hash),
        metadata={
            "checkpoint_dir": dg.MetadataValue.path(str(found.path)),
            "sha256": found.content_hash,
            "tokenizer_sha256": found.tokenizer_hash or "none (byte-level)",
            "model_type": found.hf_config.get("model_type"),
            "exporter": found.exporter,
            "weight_files": ", ".join(f.name for f in weight_files(found.path)),
            "weight_bytes": sum(f.stat().st_size for f in weight_files(found.path)),
        },
    )
