"""`checkpoint`: find and validate the model's checkpoint folder; its data version is its bytes' hash."""

from dataclasses import replace

import dagster as dg

from edge_quant_pipeline.architectures import UnsupportedArchitectureError
from edge_quant_pipeline.checkpoints import (
    Checkpoint,
    CheckpointError,
    architecture_of,
    find_checkpoints,
    read_checkpoint,
    weight_files,
)
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.defs.resources import PipelineConfig


@dg.asset(partitions_def=model_partitions, group_name="checkpoints")
def checkpoint(context: dg.AssetExecutionContext, pipeline: PipelineConfig) -> dg.Output[Checkpoint]:
    """A Hugging Face style checkpoint folder (config.json + weights), validated and hashed."""
    model_id = context.partition_key
    root = pipeline.checkpoint_dir_path
    try:
        path = find_checkpoints(root).get(model_id)
        if path is None:
            raise CheckpointError(
                f"{root}: no checkpoint folder for model {model_id!r} (a folder holding config.json)."
            )
        found = read_checkpoint(path)
        # Fails here, at the checkpoint, for a family litert-torch cannot rebuild.
        found = replace(found, shape=architecture_of(found).shape)
    except (CheckpointError, UnsupportedArchitectureError) as error:
        raise dg.Failure(str(error)) from None
    return dg.Output(
        found,
        data_version=dg.DataVersion(found.content_hash),
        metadata={
            "checkpoint_dir": dg.MetadataValue.path(str(found.path)),
            "sha256": found.content_hash,
            "model_type": found.hf_config.get("model_type"),
            "weight_files": ", ".join(f.name for f in weight_files(found.path)),
            "weight_bytes": sum(f.stat().st_size for f in weight_files(found.path)),
        },
    )
