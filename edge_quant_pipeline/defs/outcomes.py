"""An asset as the graph places it, and how a rejected (model, recipe) is recorded before it fails."""

import dagster as dg

from edge_quant_pipeline import graph
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.publish.store import ArtifactInputs, record_failure


def as_in_the_graph(asset: dg.AssetsDefinition, version: str | None) -> dg.AssetsDefinition:
    """``asset`` with its code version (``versions.py``) and the group ``graph.py`` gives it."""
    group = graph.BY_ASSET[asset.key.path[-1]].group
    return asset.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version, group_name=group))


def rejected(pipeline: PipelineConfig, inputs: ArtifactInputs, stage: str, error: Exception) -> dg.Failure:
    """Record why this partition has no artifact (for the report); the Failure fails only this partition."""
    record_failure(pipeline.store, inputs, stage, str(error))
    return dg.Failure(
        description=f"{inputs.recipe} on {inputs.model_id}: {stage} failed: {error}",
        metadata={"stage": stage, "error": str(error)},
    )
