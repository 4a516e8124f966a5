"""`evaluation`: the quantized model run in the LiteRT interpreter against the float reference."""

import dagster as dg

from edge_quant_pipeline.checkpoints import Checkpoint
from edge_quant_pipeline.defs.outcomes import artifact_inputs, rejected
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.partitions import BY_MODEL, BY_RECIPE, model_recipe_partitions
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.evaluate import Evaluation, FloatReference, RuntimeRejectedError, evaluate
from edge_quant_pipeline.recipes import Recipe
from edge_quant_pipeline.toolchain import toolchain_tag
from edge_quant_pipeline.weights import TfliteModel


@dg.asset(
    partitions_def=model_recipe_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    group_name="evaluation",
    code_version=f"evaluation-1|{toolchain_tag()}",
    ins={
        "checkpoint": dg.AssetIn(partition_mapping=BY_MODEL),
        "quant_recipe": dg.AssetIn(partition_mapping=BY_RECIPE),
        "float_tflite": dg.AssetIn(partition_mapping=BY_MODEL),
        "float_reference": dg.AssetIn(partition_mapping=BY_MODEL),
    },
)
def evaluation(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    quant_recipe: Recipe,
    float_tflite: TfliteModel,
    float_reference: FloatReference,
    quantized_tflite: TfliteModel,
) -> dg.Output[Evaluation]:
    """Size, perplexity, KL divergence, top-1 agreement and speed, measured in the interpreter."""
    try:
        result = evaluate(quantized_tflite, float_tflite, float_reference,
                          pipeline.export_settings, pipeline.interpreter_threads)
    except RuntimeRejectedError as error:
        raise rejected(pipeline, artifact_inputs(checkpoint, quant_recipe), "interpreter", error) from None
    context.log.info(f"{quant_recipe.name}: perplexity {result.perplexity:.3f} "
                     f"({result.perplexity_ratio:.4f}x float), top-1 agreement {result.top1_agreement:.1%}")
    return dg.Output(result, metadata=result.as_dict())
