"""`float_baseline`: the float model's bundle in LiteRT-LM, once per checkpoint: its task scores and the health of
its long generations, what each recipe's are gated against there (``gates.py``)."""

import dagster as dg

from edge_quant_pipeline.atomic import locked_scratch_beside
from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.admission import admitted
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.partitions import model_partitions
from edge_quant_pipeline.disk import NotEnoughDiskError
from edge_quant_pipeline.evaluate.bundle import BundleError, build_bundle, bundle_path, bundle_spec
from edge_quant_pipeline.evaluate.evaluation import FloatBaseline
from edge_quant_pipeline.evaluate.litert_lm import BundleRejectedError, float_generations
from edge_quant_pipeline.evaluate.reference import FloatReference
from edge_quant_pipeline.footprint import model_size
from edge_quant_pipeline.memory import NotEnoughMemoryError
from edge_quant_pipeline.timing import computing
from edge_quant_pipeline.weights import TfliteModel


@dg.asset(partitions_def=model_partitions, automation_condition=ON_INPUT_OR_CODE_CHANGE)
def float_baseline(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    float_tflite: TfliteModel,
    float_reference: FloatReference,
) -> dg.Output[FloatBaseline]:
    """The float .tflite bundled and run in LiteRT-LM as every recipe's bundle is: greedy generations from the
    evaluation's prompts, and the tasks. When it cannot be (a checkpoint that makes no bundle, a float model the
    runtime cannot hold on this machine), the reason; recipes are then not gated in the runtime."""
    float_tflite, float_reference = pipeline.work.localize(float_tflite), pipeline.work.localize(float_reference)
    tasks = pipeline.task_request()
    try:
        with admitted(context, model_size(checkpoint, pipeline, float_tflite.model_bytes)) as usage, computing():
            spec = bundle_spec(checkpoint.path, checkpoint.hf_config, pipeline.export_settings.kv_cache_len)
            # As large as the float file and needed for nothing else, so removed after; in a folder of this step's
            # own, since a run converting the same checkpoint at the same time makes and removes the same bundle.
            float_bundle = bundle_path(float_tflite.path)
            with locked_scratch_beside(float_bundle) as scratch:
                bundle = build_bundle(float_tflite.path, spec, checkpoint.exporter, scratch / float_bundle.name)
                run, health = float_generations(bundle, spec, float_reference.tokens()["prompts"], tasks)
            usage.child_peak_rss_mb = max(run.peak_rss_mb, run.tasks_peak_rss_mb)  # the runtime's, this step's largest
        baseline, metadata = FloatBaseline(run.tasks, health, run.tasks_error), usage.metadata()
    except (NotEnoughMemoryError, NotEnoughDiskError, BundleError, BundleRejectedError) as error:
        baseline, metadata = FloatBaseline((), None, f"the float model was not run in LiteRT-LM: {error}"), {}
    if baseline.reason:
        context.log.warning(baseline.reason)
    table = {"task_scores": dg.MetadataValue.md(baseline.table())} if baseline.scores else {}
    return dg.Output(
        baseline,
        metadata=for_ui(
            {
                **baseline.as_dict(),
                **table,
                **({"not_measured": baseline.reason} if baseline.reason else {}),
                **metadata,
            }
        ),
    )
