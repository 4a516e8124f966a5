"""The code location: every asset, job and resource, in one Definitions object, built when Dagster loads it."""

import dagster as dg

from edge_quant_pipeline import defs as asset_modules
from edge_quant_pipeline import graph, settings
from edge_quant_pipeline.config import PipelineConfig, pipeline_config_from_env
from edge_quant_pipeline.defs.automation import (
    automation_sensor,
    checkpoint_sensor,
    nightly_schedules_from_env,
    recipe_sensor,
)
from edge_quant_pipeline.defs.executor import executor_from_env
from edge_quant_pipeline.defs.outcomes import as_in_the_graph
from edge_quant_pipeline.defs.partitions import model_partitions, model_recipe_partitions, recipe_partitions
from edge_quant_pipeline.versions import code_versions

PARTITIONS = {"model": model_partitions, "recipe": recipe_partitions, "model_recipe": model_recipe_partitions}


def asset_jobs() -> list:
    """One job per partitioning (``graph.py``), selecting the assets the graph gives it."""
    return [
        dg.define_asset_job(job, selection=list(graph.assets_of(job)), partitions_def=PARTITIONS.get(partitions))
        for job, partitions in graph.JOB_PARTITIONS.items()
    ]


IO_MANAGER_PREFIX = "step-outputs"  # under the work store, where step outputs are pickled


def io_manager(pipeline: PipelineConfig) -> dict[str, dg.ConfigurableIOManagerFactory]:
    """With a work store, step outputs are pickled there too (Dagster's UPath IO manager): a step on another
    machine loads them. Without one, Dagster's default: files under DAGSTER_HOME."""
    if not pipeline.work_store:
        return {}
    return {"io_manager": dg.FilesystemIOManager(base_dir=f"{pipeline.work_store.rstrip('/')}/{IO_MANAGER_PREFIX}")}


def build_definitions(pipeline: PipelineConfig) -> dg.Definitions:
    """The code location with ``pipeline`` as its resource (`edge-quant run` passes its own to its workers)."""
    versions = code_versions(pipeline)
    # Every asset defined in defs/, placed as graph.py says (an asset graph.py does not know stops the load).
    assets = dg.load_assets_from_package_module(asset_modules)
    return dg.Definitions(
        assets=[as_in_the_graph(asset, versions[asset.key.path[-1]]) for asset in assets],
        jobs=asset_jobs(),
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
