"""`checkpoint`: find and validate the model's checkpoint folder; its data version is its bytes' hash.

It is the first step of every conversion, so it also ends the runs that died without ending: a run
whose process was killed (SIGKILL, out of memory) stays STARTED and keeps its `litert_export` pool
slot, and with it every later export would wait forever.
"""

from dataclasses import replace
from pathlib import Path

import dagster as dg

from edge_quant_pipeline.checkpoints.folders import scan_checkpoints
from edge_quant_pipeline.checkpoints.validate import Checkpoint, CheckpointError, read_checkpoint, weight_files
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.export.architectures import UnsupportedArchitectureError
from edge_quant_pipeline.export.exporters import PLAN_APART_BYTES, plan_export, plan_export_apart
from edge_quant_pipeline.liveness import RUN_PROCESS_EXECUTORS, fail_runs_of_dead_processes, process_tags
from edge_quant_pipeline.settings import ExporterSettingError


def _checkpoint_folder(root: Path, model_id: str) -> Path:
    scan = scan_checkpoints(root)
    if model_id in scan.found:
        return scan.found[model_id]
    missing = f"{root}: no checkpoint folder for model {model_id!r} (a folder holding config.json)."
    raise CheckpointError(scan.refusal_for(model_id) or missing)


@dg.asset(partitions_def=model_partitions)
def checkpoint(context: dg.AssetExecutionContext, pipeline: PipelineConfig) -> dg.Output[Checkpoint]:
    """A Hugging Face style checkpoint folder (config.json + weights), validated and hashed."""
    for run_id in fail_runs_of_dead_processes(context.instance):
        context.log.warning(f"Run {run_id} was left STARTED by a process that is gone; marked it failed.")
    if context.job_def.executor_def.name in RUN_PROCESS_EXECUTORS:
        context.instance.add_run_tags(context.run_id, process_tags())
    try:
        found = read_checkpoint(_checkpoint_folder(pipeline.checkpoint_dir_path, context.partition_key))
        # Fails here, at the checkpoint, for a family neither of litert-torch's exporters takes.
        weight_bytes = sum(f.stat().st_size for f in weight_files(found.path))
        planner = plan_export_apart if weight_bytes > PLAN_APART_BYTES else plan_export
        plan = planner(found.hf_config, found.path / "config.json", pipeline.export.exporter)
        found = replace(found, shape=plan.shape, exporter=plan.exporter, proven_family=plan.proven_family)
    except (CheckpointError, UnsupportedArchitectureError, ExporterSettingError) as error:
        raise dg.Failure(str(error)) from None
    return dg.Output(
        found,
        data_version=dg.DataVersion(found.content_hash),
        metadata=for_ui(
            {
                "checkpoint_dir": dg.MetadataValue.path(str(found.path)),
                "sha256": found.content_hash,
                "tokenizer_sha256": found.tokenizer_hash or "none (byte-level)",
                "model_type": found.hf_config.get("model_type"),
                "exporter": found.exporter,
                "proven_family": found.proven_family,  # False: each export is proven (evaluate/export_proof.py)
                "weight_files": ", ".join(f.name for f in weight_files(found.path)),
                "weight_bytes": weight_bytes,
            }
        ),
    )
