"""`float_tasks`: the float model's bundle answering the configured tasks in LiteRT-LM, once per checkpoint: what
each recipe's task scores are gated against (``gates.check_task_gates``)."""

import dagster as dg

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.admission import admitted
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.evaluate.bundle import BundleError, build_bundle, bundle_path, bundle_spec
from edge_quant_pipeline.evaluate.tasks import FloatTasks, TaskRunError, run_tasks
from edge_quant_pipeline.footprint import model_size
from edge_quant_pipeline.memory import NotEnoughMemoryError
from edge_quant_pipeline.timing import computing
from edge_quant_pipeline.weights import TfliteModel


@dg.asset(partitions_def=model_partitions, automation_condition=ON_INPUT_OR_CODE_CHANGE)
def float_tasks(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint, float_tflite: TfliteModel
) -> dg.Output[FloatTasks]:
    """The float .tflite bundled and scored on the tasks in LiteRT-LM, as every recipe's bundle is. When it cannot
    be (no tasks set, a checkpoint that makes no bundle, a float model the runtime cannot hold here), the reason,
    and recipes are not gated on tasks."""
    names, limit = tuple(pipeline.evaluation.tasks), pipeline.evaluation.task_limit
    if not names:
        return dg.Output(FloatTasks((), "no tasks set (EDGE_QUANT_TASKS)"), metadata={"tasks": 0})
    float_tflite = pipeline.work.localize(float_tflite)
    kv_cache_len = pipeline.export_settings.kv_cache_len
    try:
        with admitted(context, model_size(checkpoint, pipeline, float_tflite.file_bytes)) as usage, computing():
            spec = bundle_spec(checkpoint.path, checkpoint.hf_config, kv_cache_len)
            bundle = build_bundle(float_tflite.path, spec, checkpoint.exporter, bundle_path(float_tflite.path))
            try:
                scores = FloatTasks(tuple(run_tasks(bundle, list(names), limit, kv_cache_len)), "")
            finally:
                bundle.unlink()  # as large as the float file, and needed for nothing else
        metadata = usage.metadata()
    except (NotEnoughMemoryError, BundleError, TaskRunError) as error:
        scores, metadata = FloatTasks((), f"the float model's tasks were not scored: {error}"), {}
        context.log.warning(scores.reason)
    table = {"task_scores": dg.MetadataValue.md(scores.table())} if scores.scores else {"not_scored": scores.reason}
    return dg.Output(scores, metadata={"tasks": len(scores.scores), **table, **metadata})
