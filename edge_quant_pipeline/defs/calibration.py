"""`calibration`: the statistics static activations and GPTQ need, from the float `.tflite` on calibration text,
once per checkpoint, and only what the catalog's recipes need (nothing at all when none is static or GPTQ)."""

from dataclasses import replace
from pathlib import Path

import dagster as dg

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.admission import admitted
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.evaluate.reference import EvalTextError, tokenize
from edge_quant_pipeline.footprint import model_size
from edge_quant_pipeline.memory import NotEnoughMemoryError
from edge_quant_pipeline.quantize.calibration import (
    CalibrationStats,
    CalibrationTextError,
    calibrate,
    hessian_bytes,
)
from edge_quant_pipeline.quantize.catalog import CalibrationNeed
from edge_quant_pipeline.runtime.session import RuntimeRejectedError
from edge_quant_pipeline.timing import computing
from edge_quant_pipeline.weights import TfliteModel


@dg.asset(
    partitions_def=model_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
)
def calibration(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint, float_tflite: TfliteModel
) -> dg.Output[CalibrationStats]:
    """Activation ranges, and for GPTQ input Hessians, of every fully-connected layer, over `calibration_samples`
    windows of the calibration text (EDGE_QUANT_CALIBRATION_TEXT); nothing when no recipe of the catalog is static
    or GPTQ. What it computes is in its code version: a catalog that needs more makes it run again."""
    text, samples, need = Path(pipeline.calibration.text), pipeline.calibration.samples, pipeline.calibration_need
    output = pipeline.calibration_path(checkpoint)
    if need is CalibrationNeed.NONE:
        context.log.info("No recipe of the catalog is static or GPTQ: no calibration statistics computed")
        return dg.Output(CalibrationStats(output, samples=0, tokens=0), metadata={"computed": need.value})
    float_tflite = pipeline.work.localize(float_tflite)
    hessians = need is CalibrationNeed.HESSIANS
    try:  # before any model runs: a text too short costs nothing
        tokens = tokenize(text, checkpoint.path, checkpoint.vocab_size)
        gram_bytes = hessian_bytes(float_tflite.path, pipeline.export_settings) if hessians else 0
        size = replace(model_size(checkpoint, pipeline, float_tflite.model_bytes), calibration_bytes=gram_bytes)
        with admitted(context, size, calibration=need) as usage, computing():
            stats = calibrate(
                float_tflite.path,
                tokens,
                pipeline.export_settings,
                samples,
                text,
                pipeline.interpreter_threads,
                output,
                hessians,
            )
    except (EvalTextError, CalibrationTextError, NotEnoughMemoryError, RuntimeRejectedError) as error:
        raise dg.Failure(str(error)) from None
    stats = pipeline.work.shared(stats)
    context.log.info(f"Calibrated ({need.value}) on {stats.tokens} tokens of {text} ({samples} windows)")
    return dg.Output(
        stats,
        metadata=for_ui(
            {
                "computed": need.value,
                "calibration_text": dg.MetadataValue.path(str(text)),
                "calibration_text_sha256": pipeline.calibration_settings()["calibration_text_sha256"],
                "samples": samples,
                "tokens": stats.tokens,
                "layers": len(stats.layers()),
                "hessian_mb": gram_bytes / 1e6,
                "statistics": dg.MetadataValue.path(str(stats.path)),
                **usage.metadata(),
            }
        ),
    )
