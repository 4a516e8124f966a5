"""What is out of date right now, read from the checkpoint folder, the catalog, the instance and the store
(``staleness.py`` decides from what this reads).

The rebuild plan is shared by the nightly schedules, the sensors (``defs/automation.py``) and `edge-quant run`
(``runs/``), so all of them rebuild exactly what changed and nothing else.
"""

from pathlib import Path

import dagster as dg

from edge_quant_pipeline import graph
from edge_quant_pipeline.checkpoints.folders import find_checkpoints
from edge_quant_pipeline.checkpoints.validate import Checkpoint, CheckpointError, read_checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.liveness import fail_runs_of_dead_processes
from edge_quant_pipeline.publish.retention import CurrentWork
from edge_quant_pipeline.publish.store import latest_outcome
from edge_quant_pipeline.staleness import ModelState, RebuildPlan, RecipeState, plan_rebuild
from edge_quant_pipeline.versions import artifact_inputs, model_code_versions


def recipe_partition_changes(instance: dg.DagsterInstance, names: list[str]) -> tuple[list[str], list[str]]:
    """(partitions to add, partitions to delete) for the recipe partitions to be the catalog's ``names``."""
    existing = instance.get_dynamic_partitions(graph.RECIPE_PARTITION)
    return [n for n in names if n not in existing], [n for n in existing if n not in names]


def sync_recipe_partitions(instance: dg.DagsterInstance, names: list[str]) -> None:
    added, deleted = recipe_partition_changes(instance, names)
    instance.add_dynamic_partitions(graph.RECIPE_PARTITION, added)
    for name in deleted:
        instance.delete_dynamic_partition(graph.RECIPE_PARTITION, name)


def forgettable_models(instance: dg.DagsterInstance, present: set[str]) -> list[str]:
    """Model partitions whose checkpoint folder is gone (not in ``present``) and that never converted: a typo, a
    folder that could not be read. Nothing of them is kept, so their partitions go; a model that converted keeps
    its partition, with its history and artifacts."""
    return [
        model
        for model in instance.get_dynamic_partitions(graph.MODEL_PARTITION)
        if model not in present and latest_materialization(instance, "checkpoint", model) is None
    ]


def current_work(instance: dg.DagsterInstance, present: set[str]) -> dict[str, CurrentWork]:
    """Per model whose checkpoint folder is there (``present``) and which converted: the paths its latest
    materializations recorded in the work folder (graph.py's ``work_file``; ``retention.stale_work`` keeps these),
    per checkpoint and per recipe, whatever the settings of the process asking."""
    current, recipes = {}, instance.get_dynamic_partitions(graph.RECIPE_PARTITION)
    files = [stage for stage in graph.STAGES if stage.work_file]
    for model in present:
        paths = {
            s.asset: _recorded_path(instance, s.asset, model, s.work_file) for s in files if s.job == graph.CONVERT_JOB
        }
        if paths["float_tflite"] is not None:
            quantized = [
                _recorded_path(instance, s.asset, f"{model}|{recipe}", s.work_file)
                for s in files
                if s.job != graph.CONVERT_JOB
                for recipe in recipes
            ]
            current[model] = CurrentWork(
                paths["float_tflite"].parent, tuple(p for p in paths.values() if p), tuple(p for p in quantized if p)
            )
    return current


def _recorded_path(instance: dg.DagsterInstance, asset: str, partition: str, key: str) -> Path | None:
    record = latest_materialization(instance, asset, partition)
    value = record.asset_materialization.metadata.get(key) if record else None
    return Path(value.value) if value is not None else None


def runs_in_progress(instance: dg.DagsterInstance) -> int:
    """Runs of ``instance`` queued or in progress, once those whose process is gone are marked failed."""
    fail_runs_of_dead_processes(instance)
    statuses = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING]
    statuses += [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    return len(instance.get_run_ids(dg.RunsFilter(statuses=statuses)))


DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"


def latest_materialization(instance: dg.DagsterInstance, asset: str, partition: str | None = None):
    """The record of the latest materialization of ``asset`` (of one partition, if given), or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return records[0] if records else None


def latest_tags(instance: dg.DagsterInstance, asset: str, partition: str) -> dict[str, str]:
    """Tags of the latest materialization of one partition ({} if never materialized)."""
    record = latest_materialization(instance, asset, partition)
    return dict(record.asset_materialization.tags or {}) if record else {}


def model_state(
    instance: dg.DagsterInstance, model_id: str, content_hash: str | None, versions: dict[str, str | None]
) -> ModelState:
    """``content_hash`` None: the checkpoint cannot be read, which is always "changed" (its conversion then fails
    with the reason). ``versions``: the model-level assets' code versions now (``model_code_versions``)."""
    return ModelState(
        current_hash=content_hash or "unreadable",
        converted_hash=latest_tags(instance, "checkpoint", model_id).get(DATA_VERSION_TAG),
        changed_code=tuple(
            name
            for name, version in versions.items()
            if latest_tags(instance, name, model_id).get(CODE_VERSION_TAG) != version
        ),
    )


# Failures that the same inputs (gates and evaluation settings included) would meet again: the recipe does not fit
# the model, ai-edge-quantizer or the runtime refuse it, the file differs from the recipe, the metrics fail the
# gates. A run that died, or ran out of memory, without its inputs being at fault, is retried.
REPEATABLE_FAILURES = ("recipe validation", "search", "quantization", "conformance", "interpreter", "quality gate")


def is_settled(store, inputs) -> bool:
    """Published for these inputs, or failed for them in a way that would repeat, by their latest evaluation (a
    published version that failed its gates since is retried like any gate failure)."""
    manifest, failure = latest_outcome(store, inputs)
    return manifest is not None or (failure is not None and failure.get("stage") in REPEATABLE_FAILURES)


def rebuild_plan(
    instance: dg.DagsterInstance,
    pipeline: PipelineConfig,
    models: list[str] | None = None,
    recipes: list[str] | None = None,
    rebuild_all: bool = False,
) -> RebuildPlan:
    found = find_checkpoints(pipeline.checkpoint_dir_path)
    checkpoints: dict[str, Checkpoint | None] = {}
    for model_id in models or found:
        try:
            checkpoints[model_id] = read_checkpoint(found[model_id]) if model_id in found else None
        except CheckpointError:
            checkpoints[model_id] = None
    catalog, versions = pipeline.recipe_catalog(), model_code_versions(pipeline)
    usable = {
        name: catalog.recipes[name]
        for name in recipes or catalog.names
        if name in catalog.recipes and name not in catalog.errors
    }
    settled = {
        (model_id, name)
        for model_id, checkpoint in checkpoints.items()
        if checkpoint is not None
        for name, recipe in usable.items()
        if is_settled(pipeline.store, artifact_inputs(pipeline, checkpoint, recipe))
    }
    return plan_rebuild(
        models={m: model_state(instance, m, c and c.content_hash, versions) for m, c in checkpoints.items()},
        recipes={
            name: RecipeState(r.definition_hash, latest_tags(instance, "quant_recipe", name).get(DATA_VERSION_TAG))
            for name, r in usable.items()
        },
        settled=settled,
        rebuild_all=rebuild_all,
    )
