"""What is out of date right now, read from the checkpoint folder, the catalog, the instance and the store; the
runs that rebuild it, each with the runs it waits for, and the memory each may take.

The rebuild plan is shared by the nightly schedules, the sensors and `edge-quant run`, so all of them rebuild
exactly what changed and nothing else.
"""

from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg

from edge_quant_pipeline import graph
from edge_quant_pipeline.checkpoints.folders import find_checkpoints
from edge_quant_pipeline.checkpoints.validate import Checkpoint, CheckpointError, read_checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.footprint import LITERT_PROCESS_MB, ModelSize, folder_model_size, steps_mb
from edge_quant_pipeline.publish.store import latest_outcome
from edge_quant_pipeline.staleness import ModelState, RebuildPlan, RecipeState, as_selection, plan_rebuild
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


@dataclass(frozen=True)
class PlannedRun:
    job: str
    model: str | None = None
    recipe: str | None = None
    after: tuple["PlannedRun", ...] = ()  # runs that must have finished first
    needs_success: bool = True  # skip this run when one of `after` failed
    assets: tuple[str, ...] | None = None  # a part of the job's assets (None: all of them)

    @property
    def partition_key(self) -> str | None:
        if self.model and self.recipe:
            return dg.MultiPartitionKey({"model": self.model, "recipe": self.recipe})
        return self.model or self.recipe

    def asset_names(self, conversion_only: bool = False) -> list[str]:
        """What it materializes: its own part of its job, and with ``--convert-only`` nothing after conversion."""
        return [
            name
            for name in graph.assets_of(self.job)
            if (not self.assets or name in self.assets) and (not conversion_only or name in graph.CONVERSION_ASSETS)
        ]

    @property
    def label(self) -> str:
        part = f" ({', '.join(self.assets)})" if self.assets else ""
        return str(self.partition_key or "") + part


@dataclass(frozen=True)
class RunOutcome:
    run: PlannedRun
    seconds: float | None  # None: it never started
    failures: list[str]  # failed steps and checks, one line each; empty when the run succeeded
    worker_retires: bool = True  # its worker exits after it, rather than take another run


def plan_runs(plan: RebuildPlan, models: list[str], recipes: list[str], reports: DueReports | None) -> list[PlannedRun]:
    """The runs for ``plan``, each with the runs it waits for; conversions first, the long ones.

    ``reports`` None: no reports (``--convert-only``).
    """
    converts = {
        m: PlannedRun(graph.CONVERT_JOB, model=m, assets=as_selection(assets)) for m, assets in plan.convert.items()
    }
    resolves = {r: PlannedRun(graph.RESOLVE_JOB, recipe=r) for r in plan.resolve}
    pairs = {
        (m, r): PlannedRun(
            graph.QUANTIZE_JOB, model=m, recipe=r, after=tuple(run for run in (converts.get(m), resolves.get(r)) if run)
        )
        for m, r in plan.affected_pairs(models, recipes)
    }
    runs = [*converts.values(), *resolves.values(), *pairs.values()]
    if reports is None:
        return runs
    # Reports list failures too: they wait for their pairs without needing them to succeed.
    model_reports = [
        PlannedRun(
            graph.REPORT_JOB,
            model=m,
            after=tuple(run for (model, _), run in pairs.items() if model == m),
            needs_success=False,
        )
        for m in models
        if m in reports.models or any(model == m for model, _ in pairs)
    ]
    if model_reports or reports.all_models:
        model_reports.append(PlannedRun(graph.ALL_MODELS_REPORT_JOB, after=tuple(model_reports), needs_success=False))
    return runs + model_reports


def run_estimates(runs: list[PlannedRun], pipeline: PipelineConfig, conversion_only: bool) -> dict[PlannedRun, float]:
    """Each run's estimated peak: the largest of its steps for its model's size."""
    folders = find_checkpoints(pipeline.checkpoint_dir_path)
    sizes: dict[str, ModelSize | None] = {}
    for model in {r.model for r in runs if r.model}:
        try:
            sizes[model] = folder_model_size(folders[model], pipeline) if model in folders else None
        except (CheckpointError, OSError):
            sizes[model] = None  # its run fails at the checkpoint step, with the reason
    estimates, catalog = {}, pipeline.recipe_catalog()
    for run in runs:
        size = sizes.get(run.model) if run.model else None
        steps = run.asset_names(conversion_only)
        recipe = catalog.recipes.get(run.recipe) if run.recipe else None
        estimates[run] = steps_mb(steps, size, recipe, catalog.calibration_need) if size else LITERT_PROCESS_MB
    return estimates
