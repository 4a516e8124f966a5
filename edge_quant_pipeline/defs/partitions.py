"""Partitions: one `model` per checkpoint and one `recipe` per catalog entry (both dynamic), and their product.

Models are added by the checkpoint sensor and `edge-quant run`; recipes follow the catalog (built-ins plus
recipes.yaml): the recipe sensor and `edge-quant run` add an entry's partition and delete the partition of an
entry that is gone (``recipe_partition_changes``), so an edited recipes.yaml needs no reload of the code location.
"""

import warnings

import dagster as dg

model_partitions = dg.DynamicPartitionsDefinition(name="model")
recipe_partitions = dg.DynamicPartitionsDefinition(name="recipe")
model_recipe_partitions = dg.MultiPartitionsDefinition({"model": model_partitions, "recipe": recipe_partitions})

# A (model, recipe) asset reads the model-level and recipe-level assets of its own key.
# The mapping has been "beta" since Dagster 1.4 and is what the docs use for this.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    BY_MODEL = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
    BY_RECIPE = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="recipe")


def recipe_partition_changes(instance: dg.DagsterInstance, names: list[str]) -> tuple[list[str], list[str]]:
    """(partitions to add, partitions to delete) for the recipe partitions to be the catalog's ``names``."""
    existing = instance.get_dynamic_partitions(recipe_partitions.name)
    return [n for n in names if n not in existing], [n for n in existing if n not in names]


def sync_recipe_partitions(instance: dg.DagsterInstance, names: list[str]) -> None:
    added, deleted = recipe_partition_changes(instance, names)
    instance.add_dynamic_partitions(recipe_partitions.name, added)
    for name in deleted:
        instance.delete_dynamic_partition(recipe_partitions.name, name)
