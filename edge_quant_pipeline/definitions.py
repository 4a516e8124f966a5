"""The code location: every asset, job and resource, in one Definitions object."""

import os

import dagster as dg

from edge_quant_pipeline import settings
from edge_quant_pipeline.defs.automation import (
    CONVERT_JOB,
    QUANTIZE_JOB,
    RESOLVE_JOB,
    automation_sensor,
    checkpoint_sensor,
    nightly_schedules_from_env,
    recipe_sensor,
)
from edge_quant_pipeline.defs.calibration import calibration
from edge_quant_pipeline.defs.checkpoint import checkpoint
from edge_quant_pipeline.defs.evaluation import evaluation
from edge_quant_pipeline.defs.executor import executor_from_env
from edge_quant_pipeline.defs.float_model import float_reference, float_tflite
from edge_quant_pipeline.defs.outcomes import code_versions, with_code_version
from edge_quant_pipeline.defs.partitions import model_partitions, model_recipe_partitions, recipe_partitions
from edge_quant_pipeline.defs.publishing import published_artifact
from edge_quant_pipeline.defs.quantize import quantized_tflite
from edge_quant_pipeline.defs.recipe import quant_recipe
from edge_quant_pipeline.defs.report import all_models_report, quantization_report
from edge_quant_pipeline.defs.resolved_recipe import resolved_recipe
from edge_quant_pipeline.defs.resources import ArtifactStore, PipelineConfig

# One job per partitioning: a Dagster run materializes one partition key, so the
# graph for a model runs as convert -> recipes -> one run per recipe -> report.
convert_checkpoint_job = dg.define_asset_job(
    CONVERT_JOB, selection=[checkpoint, float_tflite, float_reference, calibration], partitions_def=model_partitions
)
resolve_recipe_job = dg.define_asset_job(RESOLVE_JOB, selection=[quant_recipe], partitions_def=recipe_partitions)
quantize_job = dg.define_asset_job(
    QUANTIZE_JOB,
    selection=[resolved_recipe, quantized_tflite, evaluation, published_artifact],
    partitions_def=model_recipe_partitions,
)
report_job = dg.define_asset_job("report", selection=[quantization_report], partitions_def=model_partitions)
all_models_report_job = dg.define_asset_job("report_all_models", selection=[all_models_report])


IO_MANAGER_PREFIX = "step-outputs"  # under the work store, where step outputs are pickled


def artifact_store_from_env() -> ArtifactStore:
    # An EnvVar shows in the UI which variable sets the store; Dagster refuses one that is unset.
    if os.environ.get(settings.ARTIFACT_DIR_VARIABLE):
        return ArtifactStore(url=dg.EnvVar(settings.ARTIFACT_DIR_VARIABLE))
    return ArtifactStore(url=settings.DEFAULT_ARTIFACT_DIR)


def pipeline_config_from_env() -> PipelineConfig:
    return PipelineConfig(
        checkpoint_dir=str(settings.checkpoint_dir()),
        artifact_store=artifact_store_from_env(),
        work_dir=str(settings.work_dir()),
        work_store=settings.work_store() or "",
        work_cache_gb=settings.work_cache_gb(),
        eval_text=str(settings.eval_text()),
        calibration_text=str(settings.calibration_text()),
        exporter=settings.exporter(),
        recipes_file=str(settings.recipes_file().absolute()),
    )


def io_manager(pipeline: PipelineConfig) -> dict[str, dg.ConfigurableIOManagerFactory]:
    """With a work store, step outputs are pickled there too (Dagster's UPath IO manager): a step on another
    machine loads them. Without one, Dagster's default: files under DAGSTER_HOME."""
    if not pipeline.work_store:
        return {}
    return {"io_manager": dg.FilesystemIOManager(base_dir=f"{pipeline.work_store.rstrip('/')}/{IO_MANAGER_PREFIX}")}


def build_definitions(pipeline: PipelineConfig) -> dg.Definitions:
    """The code location with ``pipeline`` as its resource (`edge-quant run` passes its own to its workers)."""
    assets = [
        checkpoint,
        float_tflite,
        float_reference,
        calibration,
        quant_recipe,
        resolved_recipe,
        quantized_tflite,
        evaluation,
        published_artifact,
        quantization_report,
        all_models_report,
    ]
    versions = code_versions(assets, pipeline)
    return dg.Definitions(
        assets=[with_code_version(asset, versions[asset.key.path[-1]]) for asset in assets],
        jobs=[convert_checkpoint_job, resolve_recipe_job, quantize_job, report_job, all_models_report_job],
        sensors=[checkpoint_sensor, recipe_sensor, automation_sensor],
        schedules=nightly_schedules_from_env(),
        resources={"pipeline": pipeline, **io_manager(pipeline)},
        # EDGE_QUANT_EXECUTOR: by default steps of one run share a process, because for small
        # models the ~1.1 GB, ~7 s import of torch + TensorFlow + litert-torch costs more than
        # the work itself; `multiprocess` and `k8s` spread the steps (defs/executor.py).
        executor=executor_from_env(),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location as Dagster loads it, from the EDGE_QUANT_* settings and recipes.yaml, all checked before
    it is built: a bad setting, or a recipes.yaml that is not YAML, stops the load with one line per problem (a bad
    recipe fails only its own partitions)."""
    settings.check()
    pipeline = pipeline_config_from_env()
    pipeline.recipe_catalog()
    return build_definitions(pipeline)
