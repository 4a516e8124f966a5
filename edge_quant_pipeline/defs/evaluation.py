"""`evaluation`: the quantized model run in the LiteRT interpreter against the float reference, and its LiteRT-LM
bundle in LiteRT-LM."""

import dataclasses

import dagster as dg
import pandas as pd

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.admission import admitted
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.outcomes import rejected
from edge_quant_pipeline.defs.partitions import BY_MODEL, BY_RECIPE, model_recipe_partitions
from edge_quant_pipeline.disk import NotEnoughDiskError
from edge_quant_pipeline.evaluate.bundle import BundleError, build_bundle, bundle_path, bundle_spec
from edge_quant_pipeline.evaluate.evaluation import Bundle, FloatBaseline, evaluate
from edge_quant_pipeline.evaluate.litert_lm import NO_TASKS
from edge_quant_pipeline.evaluate.localize import TensorError, layer_summary, tensor_errors
from edge_quant_pipeline.evaluate.reference import FloatReference
from edge_quant_pipeline.footprint import model_size
from edge_quant_pipeline.gates import check_gates, check_health_gates, check_task_gates
from edge_quant_pipeline.memory import NotEnoughMemoryError, PeakMemory
from edge_quant_pipeline.publish.store import record_failure
from edge_quant_pipeline.quantize.recipes import Recipe
from edge_quant_pipeline.runtime.session import RuntimeRejectedError
from edge_quant_pipeline.timing import computing
from edge_quant_pipeline.versions import artifact_inputs
from edge_quant_pipeline.weights import TfliteModel


def hotspot_table(errors: list[TensorError], top_n: int) -> str:
    return pd.DataFrame(
        [
            {
                "component": e.component,
                "block": "" if e.block is None else e.block,
                "op": e.op,
                "SNR dB": round(e.snr_db, 1),
            }
            for e in errors[:top_n]
        ]
    ).to_markdown(index=False)


def localization_metadata(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    float_tflite: TfliteModel,
    candidate: TfliteModel,
    reference: FloatReference,
) -> dict:
    """Error hotspots per tensor and per layer on the first prompt, and the memory that took."""
    if not pipeline.evaluation.localize_errors:
        return {}
    prompt = reference.tokens()["prompts"][0]
    try:
        with computing(), PeakMemory() as memory:
            errors = tensor_errors(
                float_tflite.path, candidate.path, prompt, pipeline.export_settings, pipeline.interpreter_threads
            )
    except Exception as error:  # a diagnosis that fails takes nothing measured with it; it says why instead
        context.log.warning(f"error localisation of {candidate.path} failed: {type(error).__name__}: {error}")
        return {"error_hotspots": f"not localised: {type(error).__name__}: {error}"}
    return {
        "error_hotspots": dg.MetadataValue.md(hotspot_table(errors, pipeline.evaluation.hotspots_top_n)),
        "error_by_layer": dg.MetadataValue.md(hotspot_table(layer_summary(errors), pipeline.evaluation.hotspots_top_n)),
        "localize_peak_rss_mb": memory.mb,
    }


@dg.asset(
    partitions_def=model_recipe_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    ins={
        "checkpoint": dg.AssetIn(partition_mapping=BY_MODEL),
        "quant_recipe": dg.AssetIn(partition_mapping=BY_RECIPE),
        "float_tflite": dg.AssetIn(partition_mapping=BY_MODEL),
        "float_reference": dg.AssetIn(partition_mapping=BY_MODEL),
        "float_baseline": dg.AssetIn(partition_mapping=BY_MODEL),
    },
    check_specs=[
        dg.AssetCheckSpec(
            "quality_gates",
            asset="evaluation",
            blocking=True,
            description="The recipe's thresholds (recipes.yaml `gates`), task drops from float included; a failing "
            "partition is not published.",
        ),
        dg.AssetCheckSpec(
            "runs_in_litert_lm",
            asset="evaluation",
            blocking=True,
            description="The .litertlm bundle loads in LiteRT-LM and generates; one that does not is not published.",
        ),
    ],
)
def evaluation(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    quant_recipe: Recipe,
    float_tflite: TfliteModel,
    float_reference: FloatReference,
    float_baseline: FloatBaseline,
    quantized_tflite: TfliteModel,
):
    """Perplexity, KL, top-1, generation agreement, SQNR, speed and memory, measured in the interpreter."""
    inputs = artifact_inputs(pipeline, checkpoint, quant_recipe)
    float_tflite, quantized_tflite = pipeline.work.localize(float_tflite), pipeline.work.localize(quantized_tflite)
    float_reference = pipeline.work.localize(float_reference)
    settings, threads = pipeline.export_settings, pipeline.interpreter_threads
    try:
        size = model_size(checkpoint, pipeline, float_tflite.model_bytes)
        with admitted(context, size, quant_recipe) as usage:
            bundle = _bundle(pipeline, checkpoint, quantized_tflite, inputs)
            pipeline.work.share(bundle.path)  # published_artifact's step publishes it
            # The `float` recipe's files are the float export's: the float baseline answered its tasks already.
            float_tasks = bool(float_baseline.scores) and quantized_tflite.same_bytes_as(float_tflite)
            tasks = NO_TASKS if float_tasks else pipeline.task_request()
            result = evaluate(quantized_tflite, float_tflite, float_reference, settings, threads, bundle, tasks)
            result = dataclasses.replace(
                result,
                float_baseline=float_baseline,
                export_proof=float_tflite.export_proof,
                **({"tasks": float_baseline.scores} if float_tasks else {}),
            )
            hotspots = localization_metadata(context, pipeline, float_tflite, quantized_tflite, float_reference)
    except NotEnoughMemoryError as error:
        raise rejected(pipeline, inputs, "memory", error) from None
    except NotEnoughDiskError as error:  # the bundle, refused before it was written
        raise rejected(pipeline, inputs, "disk", error) from None
    except RuntimeRejectedError as error:
        raise rejected(pipeline, inputs, "interpreter", error) from None
    context.log.info(
        f"{quant_recipe.name}: perplexity {result.perplexity:.3f} ({result.perplexity_ratio:.4f} ± "
        f"{result.perplexity_ratio_error:.4f} x float), top-1 agreement {result.top1_agreement:.1%} ± "
        f"{result.top1_agreement_error:.1%}"
    )
    if result.tasks_error:
        context.log.warning(result.tasks_error)
    if float_tasks:
        context.log.info("Tasks: the float baseline's scores, answered by a bundle of the same files")
    bundle_metadata = {
        "litertlm": dg.MetadataValue.path(str(bundle.path)),
        "fidelity": dg.MetadataValue.md(result.fidelity_table()),
        **({"tasks": dg.MetadataValue.md(result.task_table())} if result.tasks else {}),
    }
    yield dg.Output(result, metadata=for_ui({**result.as_dict(), **bundle_metadata, **hotspots, **usage.metadata()}))
    health = result.litert_lm.health if result.litert_lm else None
    gates = [
        *check_gates(result.as_dict(), quant_recipe.gates),
        *check_task_gates(result.tasks, float_baseline.scores, quant_recipe.gates),
        *check_health_gates(health, float_baseline.health, quant_recipe.gates),
    ]
    failed = [g for g in gates if not g.passed]
    if failed:
        record_failure(pipeline.store, inputs, "quality gate", "; ".join(map(str, failed)))
    scope = "tasks" if float_baseline.health else "tasks and long generations"
    unchecked = f"; {scope} not gated: {float_baseline.reason}" if float_baseline.reason else ""
    yield dg.AssetCheckResult(
        check_name="quality_gates",
        passed=not failed,
        description="; ".join(map(str, failed or gates)) + unchecked,
        metadata=for_ui({g.gate: g.value for g in gates}),
    )
    if result.litert_lm_error and not failed:  # a gate failure recorded above says enough
        record_failure(pipeline.store, inputs, "litert-lm", result.litert_lm_error)
    litert_lm = result.litert_lm
    yield dg.AssetCheckResult(
        check_name="runs_in_litert_lm",
        passed=litert_lm is not None,
        description=result.litert_lm_error
        or f"LiteRT-LM repeated {litert_lm.interpreter_agreement:.0%} of the interpreter's greedy text",
    )


def _bundle(pipeline: PipelineConfig, checkpoint: Checkpoint, quantized: TfliteModel, inputs) -> Bundle:
    """The LiteRT-LM bundle of the quantized file, beside it; a checkpoint that cannot make one fails here."""
    try:
        spec = bundle_spec(checkpoint.path, checkpoint.hf_config, pipeline.export_settings.kv_cache_len)
    except BundleError as error:
        raise rejected(pipeline, inputs, "bundle", error) from None
    return Bundle(build_bundle(quantized.path, spec, checkpoint.exporter, bundle_path(quantized.path)), spec)
