"""What is out of date right now, read from the checkpoint folder, the catalog, the instance and the store.

Shared by the nightly schedules and `edge-quant run`, so both rebuild exactly
what changed and nothing else.
"""

from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg

from edge_quant_pipeline.checkpoints import Checkpoint, CheckpointError, find_checkpoints, read_checkpoint
from edge_quant_pipeline.defs.calibration import calibration
from edge_quant_pipeline.defs.checkpoint import checkpoint as checkpoint_asset
from edge_quant_pipeline.defs.float_model import float_reference, float_tflite
from edge_quant_pipeline.defs.outcomes import artifact_inputs, code_versions
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.publish import latest_outcome
from edge_quant_pipeline.staleness import ModelState, RebuildPlan, RecipeState, plan_rebuild


def model_code_versions(pipeline: PipelineConfig) -> dict[str, str | None]:
    """The code versions of the per-model assets (settings included), in the order of the graph."""
    return code_versions((checkpoint_asset, float_tflite, float_reference, calibration), pipeline)


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


@dataclass(frozen=True)
class DueReports:
    models: list[str]  # whose `quantization_report` is older than their pairs' latest runs
    all_models: bool


def _report_is_current(instance: dg.DagsterInstance, model_id: str) -> bool:
    """Materialized, and no run of this model's (model, recipe) partitions updated since (the
    report lists failures too, so any finished run counts, whichever job or sensor launched it)."""
    reported = latest_materialization(instance, "quantization_report", model_id)
    if reported is None:
        return False
    since = datetime.fromtimestamp(reported.timestamp, timezone.utc)
    runs = instance.get_run_records(
        dg.RunsFilter(tags={"dagster/partition/model": model_id}, updated_after=since), limit=1
    )
    return not runs


def reports_due(instance: dg.DagsterInstance, models: list[str], rebuild_all: bool = False) -> DueReports:
    """Reports to rebuild even when no pair is: never made, or older than work done since (e.g. by the daemon)."""
    stale = [m for m in models if rebuild_all or not _report_is_current(instance, m)]
    return DueReports(
        models=stale,
        all_models=rebuild_all or latest_materialization(instance, "all_models_report") is None,
    )
