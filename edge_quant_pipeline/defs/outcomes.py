"""What identifies a (model, recipe) result, and how a rejected one is recorded before it fails."""

import dagster as dg

from edge_quant_pipeline.checkpoints import Checkpoint
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.publish import ArtifactInputs, record_failure
from edge_quant_pipeline.recipes import Recipe
from edge_quant_pipeline.toolchain import toolchain_versions


def artifact_inputs(checkpoint: Checkpoint, recipe: Recipe) -> ArtifactInputs:
    return ArtifactInputs(
        model_id=checkpoint.model_id,
        recipe=recipe.name,
        checkpoint_hash=checkpoint.content_hash,
        recipe_hash=recipe.spec_hash,
        toolchain=toolchain_versions(),
        exporter=checkpoint.exporter,
    )


def rejected(pipeline: PipelineConfig, inputs: ArtifactInputs, stage: str, error: Exception) -> dg.Failure:
    """Record why this partition has no artifact (for the report); the Failure fails only this partition."""
    record_failure(pipeline.store, inputs, stage, str(error))
    return dg.Failure(
        description=f"{inputs.recipe} on {inputs.model_id}: {stage} failed: {error}",
        metadata={"stage": stage, "error": str(error)},
    )
