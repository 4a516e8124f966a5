"""`float_tflite` and `float_reference`: the per-checkpoint work every recipe shares.

Both load the checkpoint as a float PyTorch model (litert-torch's rebuild, or transformers' own model for
``export_hf``); export is the expensive step and runs once per checkpoint version, however many recipes follow.
"""

import os
from dataclasses import replace
from pathlib import Path

import dagster as dg

from edge_quant_pipeline.checkpoints.validate import Checkpoint, CheckpointError
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.admission import StepUsage, admitted
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.disk import NotEnoughDiskError, check_free_disk
from edge_quant_pipeline.evaluate.export_proof import prove_export
from edge_quant_pipeline.evaluate.reference import (
    EvalTextError,
    FloatModel,
    FloatReference,
    RebuiltModel,
    TransformersModel,
    build_float_reference,
    eval_windows,
    tokenize,
)
from edge_quant_pipeline.export.child import ExportError, error_line
from edge_quant_pipeline.export.exporters import per_layer_embeddings
from edge_quant_pipeline.export.generative import export_rebuilt_tflite
from edge_quant_pipeline.export.hf import export_hf_tflite
from edge_quant_pipeline.export.load import architecture_of, load_float_model, load_transformers_model
from edge_quant_pipeline.footprint import model_size
from edge_quant_pipeline.memory import NotEnoughMemoryError
from edge_quant_pipeline.settings import EXPORT_HF, WORK_DIR_VARIABLE
from edge_quant_pipeline.timing import computing
from edge_quant_pipeline.weights import TfliteModel, inspect_tflite


def _float_model(checkpoint: Checkpoint, pipeline: PipelineConfig) -> FloatModel:
    kv_cache_len = pipeline.export_settings.kv_cache_len
    try:
        if checkpoint.exporter == EXPORT_HF:
            return TransformersModel(load_transformers_model(checkpoint))
        model_config = architecture_of(checkpoint).model_config
        return RebuiltModel(load_float_model(checkpoint, kv_cache_len), model_config, kv_cache_len)
    except CheckpointError as error:
        raise dg.Failure(str(error)) from None


def _export(checkpoint: Checkpoint, pipeline: PipelineConfig, output: Path, usage: StepUsage) -> Path:
    settings = pipeline.export_settings
    if checkpoint.exporter == EXPORT_HF:
        embedders = per_layer_embeddings(checkpoint.hf_config)
        usage.child_peak_rss_mb = export_hf_tflite(checkpoint.path, settings, output, externalize_embedder=embedders)
    else:
        usage.child_peak_rss_mb = export_rebuilt_tflite(checkpoint, settings, output)
    return output


@dg.asset(
    partitions_def=model_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    pool="litert_export",
    # Before the float reference, which imports litert-torch into the step's process and leaves it there: the
    # export's child then runs beside a process that holds none of it (1.2 GB less at the run's peak).
    op_tags={"dagster/priority": "1"},
)
def float_tflite(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint
) -> dg.Output[TfliteModel]:
    """The checkpoint exported once to a float32 .tflite with prefill and decode signatures."""
    output = pipeline.work_path(checkpoint) / "float.tflite"
    size = model_size(checkpoint, pipeline)
    try:
        check_free_disk(output.parent, size.float_tflite_bytes, WORK_DIR_VARIABLE)
        with admitted(context, size) as usage:
            context.log.info(f"Exporting {checkpoint.path} to {output} with litert-torch {checkpoint.exporter}")
            with computing():
                if checkpoint.proven_family:
                    exported = inspect_tflite(_export(checkpoint, pipeline, output, usage))
                else:
                    exported = _proven_export(checkpoint, pipeline, output, usage)
                    context.log.info(f"The export matches transformers: {exported.export_proof.describe()}")
            exported = pipeline.work.shared(exported, *exported.embedders.values())
    except (NotEnoughMemoryError, NotEnoughDiskError, ExportError) as error:
        raise dg.Failure(str(error)) from None
    return dg.Output(
        exported,
        metadata=for_ui(
            {
                "tflite": dg.MetadataValue.path(str(exported.path)),
                **exported.embedder_metadata(),
                "file_bytes": exported.file_bytes,
                "weight_bytes": exported.weight_bytes,
                "signatures": f"{pipeline.export_settings.prefill_signature}, decode",
                "kv_cache_len": pipeline.export_settings.kv_cache_len,
                "exporter": checkpoint.exporter,
                **(exported.export_proof.as_dict() if exported.export_proof else {}),
                **usage.metadata(),
            }
        ),
    )


def _proven_export(checkpoint: Checkpoint, pipeline: PipelineConfig, output: Path, usage: StepUsage) -> TfliteModel:
    """The export of a family no test here covers, written beside ``output`` and moved there only once it computes
    what transformers computes (a file that does not, or a proof that fails, is deleted: ``output`` keeps what the
    last proven export wrote)."""
    unproven = output.with_name(f".unproven.{output.name}")  # the generic path exports no embedders
    model_type = checkpoint.hf_config.get("model_type")
    try:
        _export(checkpoint, pipeline, unproven, usage)
        proof = prove_export(checkpoint, unproven, pipeline.export_settings, pipeline.interpreter_threads)
    except ExportError:
        raise
    except Exception as error:  # a model transformers cannot load, a file LiteRT cannot run, ...: one line
        unproven.unlink(missing_ok=True)
        raise ExportError(
            f"{checkpoint.path}: model_type {model_type!r} is a family no test here covers, and its export could "
            f"not be compared with transformers: {error_line(error)}"
        ) from error
    if not proof.passed:
        unproven.unlink(missing_ok=True)
        raise ExportError(
            f"{checkpoint.path}: model_type {model_type!r} is a family no test here covers, and export_hf's generic "
            f"path does not compute what transformers computes: {proof.describe()}. Nothing was converted; convert "
            "the checkpoint to a supported family, or add this one (docs/checkpoints.md)."
        )
    os.replace(unproven, output)
    return replace(inspect_tflite(output), export_proof=proof)


@dg.asset(
    partitions_def=model_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
)
def float_reference(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint
) -> dg.Output[FloatReference]:
    """The float PyTorch model on the held-out text (logits, greedy continuations): what recipes are compared with."""
    settings, text = pipeline.export_settings, Path(pipeline.evaluation.text)
    try:  # before the model is loaded: a bad eval text costs nothing
        tokens = tokenize(text, checkpoint.path, checkpoint.vocab_size)
        windows = eval_windows(tokens, settings.kv_cache_len, pipeline.evaluation.max_tokens, text)
    except EvalTextError as error:
        raise dg.Failure(str(error)) from None
    eval_text_sha256 = pipeline.evaluation_settings()["eval_text_sha256"]
    output = pipeline.float_reference_path(checkpoint, eval_text_sha256)
    try:
        with admitted(context, model_size(checkpoint, pipeline)) as usage, computing():
            reference = build_float_reference(_float_model(checkpoint, pipeline), windows, settings, output)
        reference = pipeline.work.shared(reference)
    except NotEnoughMemoryError as error:
        raise dg.Failure(str(error)) from None
    context.log.info(f"PyTorch float perplexity {reference.perplexity:.3f} over {reference.eval_tokens} tokens")
    return dg.Output(
        reference,
        metadata=for_ui(
            {
                "perplexity": reference.perplexity,
                "eval_tokens": reference.eval_tokens,
                "eval_text": dg.MetadataValue.path(pipeline.evaluation.text),
                "eval_text_sha256": eval_text_sha256,
                "reference": dg.MetadataValue.path(str(reference.path)),
                **usage.metadata(),
            }
        ),
    )
