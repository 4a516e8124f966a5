"""`float_tflite` and `float_reference`: the per-checkpoint work every recipe shares.

Both rebuild the checkpoint as a litert-torch model; export is the expensive step
and runs once per checkpoint version, however many recipes follow.
"""

from pathlib import Path

import dagster as dg

from edge_quant_pipeline.checkpoints import Checkpoint, CheckpointError, architecture_of, load_float_model
from edge_quant_pipeline.convert import export_float_tflite
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.evaluate import FloatReference, build_float_reference, tokenize
from edge_quant_pipeline.toolchain import toolchain_tag
from edge_quant_pipeline.weights import TfliteModel, inspect_tflite


def _float_model(checkpoint: Checkpoint, pipeline: PipelineConfig):
    try:
        return load_float_model(checkpoint, pipeline.export_settings.kv_cache_len)
    except CheckpointError as error:
        raise dg.Failure(str(error)) from None


@dg.asset(
    partitions_def=model_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    group_name="conversion",
    code_version=f"float_tflite-1|{toolchain_tag()}",
    pool="litert_export",
)
def float_tflite(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint
) -> dg.Output[TfliteModel]:
    """The checkpoint exported once to a float32 .tflite with prefill and decode signatures."""
    model = _float_model(checkpoint, pipeline)
    output = pipeline.work_path(checkpoint.model_id, checkpoint.content_hash) / "float.tflite"
    context.log.info(f"Exporting {checkpoint.path} to {output} (torch.export + MLIR lowering)")
    exported = inspect_tflite(
        export_float_tflite(model, architecture_of(checkpoint).model_config, pipeline.export_settings, output)
    )
    return dg.Output(
        exported,
        metadata={
            "tflite": dg.MetadataValue.path(str(exported.path)),
            "file_bytes": exported.file_bytes,
            "weight_bytes": exported.weight_bytes,
            "signatures": f"{pipeline.export_settings.prefill_signature}, decode",
            "kv_cache_len": pipeline.export_settings.kv_cache_len,
        },
    )


@dg.asset(
    partitions_def=model_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    group_name="evaluation",
    code_version=f"float_reference-1|{toolchain_tag()}",
)
def float_reference(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint
) -> dg.Output[FloatReference]:
    """The float PyTorch model on the held-out text (logits, greedy continuations): what recipes are compared with."""
    model = _float_model(checkpoint, pipeline)
    output = pipeline.work_path(checkpoint.model_id, checkpoint.content_hash) / "float_reference.npz"
    try:
        tokens = tokenize(Path(pipeline.eval_text), checkpoint.path, checkpoint.vocab_size)
    except ValueError as error:
        raise dg.Failure(str(error)) from None
    reference = build_float_reference(
        model,
        architecture_of(checkpoint).model_config,
        tokens,
        pipeline.export_settings,
        pipeline.eval_max_tokens,
        output,
    )
    context.log.info(f"PyTorch float perplexity {reference.perplexity:.3f} over {reference.eval_tokens} tokens")
    return dg.Output(
        reference,
        metadata={
            "perplexity": reference.perplexity,
            "eval_tokens": reference.eval_tokens,
            "eval_text": dg.MetadataValue.path(pipeline.eval_text),
        },
    )
