"""`published_artifact`: the evaluated model copied into the artifact store with its manifest."""

import dagster as dg

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.conditions import ON_CHECKED_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.partitions import BY_MODEL, BY_RECIPE, model_recipe_partitions
from edge_quant_pipeline.disk import NotEnoughDiskError
from edge_quant_pipeline.evaluate.bundle import bundle_path
from edge_quant_pipeline.evaluate.evaluation import Evaluation
from edge_quant_pipeline.publish.card import checkpoint_card_facts
from edge_quant_pipeline.publish.retention import prune_versions
from edge_quant_pipeline.publish.store import PublishedArtifact, publish, version_number
from edge_quant_pipeline.quantize.recipes import Recipe
from edge_quant_pipeline.search import ResolvedRecipe
from edge_quant_pipeline.versions import artifact_inputs
from edge_quant_pipeline.weights import TfliteModel


@dg.asset(
    partitions_def=model_recipe_partitions,
    automation_condition=ON_CHECKED_INPUT_OR_CODE_CHANGE,
    ins={
        "checkpoint": dg.AssetIn(partition_mapping=BY_MODEL),
        "quant_recipe": dg.AssetIn(partition_mapping=BY_RECIPE),
    },
)
def published_artifact(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    quant_recipe: Recipe,
    resolved_recipe: ResolvedRecipe,
    quantized_tflite: TfliteModel,
    evaluation: Evaluation,
) -> dg.Output[PublishedArtifact]:
    """`<store>/<model>/<recipe>/<version>/` with model.tflite and manifest.json (lineage, metrics, diff); for a
    budget recipe, the recipe its search resolved and the search's trace."""
    inputs = artifact_inputs(pipeline, checkpoint, quant_recipe)
    quantized_tflite = pipeline.work.localize(quantized_tflite)
    pipeline.work.fetch(bundle_path(quantized_tflite.path))  # the evaluation step's bundle, published beside it
    details = {
        "checkpoint_path": str(checkpoint.path),
        "recipe_spec": quant_recipe.spec(),
        "resolved_spec": resolved_recipe.recipe.spec(),
        "dagster_run_id": context.run.run_id,
        **checkpoint_card_facts(checkpoint.path, checkpoint.hf_config),  # license, base_model: for the model card
    }
    if resolved_recipe.trace is not None:
        details["search"] = resolved_recipe.trace.as_dict()
    try:
        artifact = publish(pipeline.store, inputs, quantized_tflite.path, evaluation.as_dict(), details)
    except NotEnoughDiskError as error:  # nothing was written: the published versions are as they were
        raise dg.Failure(str(error)) from None
    manifest = artifact.manifest
    context.log.info(f"{'Published' if artifact.newly_published else 'Already published'} {artifact.path}")
    keep = pipeline.artifact_store.keep_versions
    try:
        removed = prune_versions(pipeline.store, inputs.model_id, inputs.recipe, keep)
    except OSError as error:  # published all the same; `edge-quant prune` tries again
        context.log.warning(f"Retention could not prune {inputs.model_id}/{inputs.recipe}: {error}")
        removed = []
    for version in removed:
        context.log.info(f"Removed {version.describe()} (EDGE_QUANT_KEEP_VERSIONS={keep})")
    return dg.Output(
        artifact,
        metadata=for_ui(
            {
                "artifact_path": dg.MetadataValue.path(str(artifact.path)),
                "version": artifact.version,
                "number": version_number(manifest),
                "previous_version": manifest.get("previous_version") or "",
                "delta": dg.MetadataValue.json(manifest.get("delta") or {}),
                "newly_published": artifact.newly_published,
                "versions_removed": len(removed),
                "exporter": checkpoint.exporter,
                **evaluation.as_dict(),
            }
        ),
    )
