"""`quantized_tflite`: the float flatbuffer with one recipe applied by ai-edge-quantizer."""

import shutil

import dagster as dg
import pandas as pd

from edge_quant_pipeline.checkpoints import Checkpoint, architecture_of
from edge_quant_pipeline.convert import QuantizationError, quantize_tflite
from edge_quant_pipeline.defs.outcomes import artifact_inputs, rejected
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.partitions import BY_MODEL, BY_RECIPE, model_recipe_partitions
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.recipes import Recipe, RecipeError, ai_edge_quantizer_recipe
from edge_quant_pipeline.toolchain import toolchain_tag
from edge_quant_pipeline.weights import TfliteModel, inspect_tflite


def weights_table(model: TfliteModel) -> str:
    """Per component: the dtype, granularity and bytes actually present in the file."""
    frame = pd.DataFrame([vars(w) for w in model.weights])
    summary = (
        frame.assign(block=frame["block"].fillna(-1).astype(int))
        .groupby(["component", "block", "dtype", "granularity", "compute"], as_index=False)["num_bytes"].sum()
        .replace({"block": {-1: ""}})
    )
    return summary.to_markdown(index=False)


@dg.asset(
    partitions_def=model_recipe_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    group_name="conversion",
    code_version=f"quantized_tflite-1|{toolchain_tag()}",
    ins={
        "checkpoint": dg.AssetIn(partition_mapping=BY_MODEL),
        "float_tflite": dg.AssetIn(partition_mapping=BY_MODEL),
        "quant_recipe": dg.AssetIn(partition_mapping=BY_RECIPE),
    },
)
def quantized_tflite(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    float_tflite: TfliteModel,
    quant_recipe: Recipe,
) -> dg.Output[TfliteModel]:
    """The model quantized with one recipe (the `float` recipe is the float file itself)."""
    inputs = artifact_inputs(checkpoint, quant_recipe)
    output = pipeline.work_path(checkpoint.model_id, checkpoint.content_hash) / f"{quant_recipe.name}-{quant_recipe.spec_hash[:12]}.tflite"
    if quant_recipe.is_float:
        shutil.copyfile(float_tflite.path, output)
    else:
        try:
            rules = ai_edge_quantizer_recipe(quant_recipe, architecture_of(checkpoint).model_config)
            quantize_tflite(float_tflite.path, rules, output)
        except (RecipeError, QuantizationError, ValueError) as error:
            raise rejected(pipeline, inputs, "quantization", error) from None
    quantized = inspect_tflite(output)
    context.log.info(f"{quant_recipe.name}: {quantized.file_bytes} bytes ({float_tflite.file_bytes / quantized.file_bytes:.2f}x smaller)")
    return dg.Output(quantized, metadata={
        "path": dg.MetadataValue.path(str(output)),
        "file_bytes": quantized.file_bytes,
        "weight_bytes": quantized.weight_bytes,
        "file_ratio_vs_float": float_tflite.file_bytes / quantized.file_bytes,
        "weight_ratio_vs_float": float_tflite.weight_bytes / quantized.weight_bytes,
        "weights": dg.MetadataValue.md(weights_table(quantized)),
    })
