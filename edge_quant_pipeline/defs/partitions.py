"""Partitions: one `model` per checkpoint and one `recipe` per catalog entry (both dynamic), and their product.

Models are added by the checkpoint sensor and `edge-quant run`; recipes follow the catalog (built-ins plus
recipes.yaml): the recipe sensor and `edge-quant run` add an entry's partition and delete the partition of an
entry that is gone (``runs/plan.py``), so an edited recipes.yaml needs no reload of the code location.
"""

import warnings

import dagster as dg

from edge_quant_pipeline.graph import MODEL_PARTITION, RECIPE_PARTITION

model_partitions = dg.DynamicPartitionsDefinition(name=MODEL_PARTITION)
recipe_partitions = dg.DynamicPartitionsDefinition(name=RECIPE_PARTITION)
model_recipe_partitions = dg.MultiPartitionsDefinition({"model": model_partitions, "recipe": recipe_partitions})

# A (model, recipe) asset reads the model-level and recipe-level assets of its own key.
# The mapping has been "beta" since Dagster 1.4 and is what the docs use for this.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    BY_MODEL = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
    BY_RECIPE = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="recipe")
