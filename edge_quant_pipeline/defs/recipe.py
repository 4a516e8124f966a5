"""`quant_recipe`: one validated recipe per partition; its data version is the hash of its spec and gates."""

import dagster as dg

from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.partitions import recipe_partitions
from edge_quant_pipeline.quantize.recipes import Recipe, RecipeError


@dg.asset(partitions_def=recipe_partitions)
def quant_recipe(context: dg.AssetExecutionContext, pipeline: PipelineConfig) -> dg.Output[Recipe]:
    """A quantization recipe from the catalog (built-ins + recipes.yaml, as the file is now)."""
    try:
        recipe = pipeline.recipe_catalog().get(context.partition_key)
    except RecipeError as error:
        raise dg.Failure(str(error)) from None
    return dg.Output(
        recipe,
        data_version=dg.DataVersion(recipe.definition_hash),
        metadata={
            "description": recipe.description,
            "source": recipe.source,
            "spec": dg.MetadataValue.json(recipe.spec()),
            "spec_sha256": recipe.spec_hash,
            "gates": dg.MetadataValue.json(dict(recipe.gates)),
        },
    )
