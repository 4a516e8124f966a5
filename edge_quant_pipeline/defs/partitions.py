"""Partitions: one `model` per checkpoint (dynamic), one `recipe` per catalog entry, and their product."""

import warnings

import dagster as dg

from edge_quant_pipeline import settings
from edge_quant_pipeline.recipes import load_catalog

# Read once per code-location load: editing recipes.yaml and reloading adds or
# removes recipe partitions without touching the others.
recipe_catalog = load_catalog(settings.recipes_file())

model_partitions = dg.DynamicPartitionsDefinition(name="model")
recipe_partitions = dg.StaticPartitionsDefinition(recipe_catalog.names)
model_recipe_partitions = dg.MultiPartitionsDefinition({"model": model_partitions, "recipe": recipe_partitions})

# A (model, recipe) asset reads the model-level and recipe-level assets of its own key.
# The mapping has been "beta" since Dagster 1.4 and is what the docs use for this.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    BY_MODEL = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
    BY_RECIPE = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="recipe")
