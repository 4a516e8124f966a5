"""The runs of `edge-quant run` that rebuild what ``rebuild.py`` finds out of date, each with the runs it waits
for, and the memory each may take."""

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg

from edge_quant_pipeline import graph
from edge_quant_pipeline.checkpoints.folders import find_checkpoints
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.footprint import LITERT_PROCESS_MB, ModelSize, planned_model_size, steps_mb
from edge_quant_pipeline.rebuild import latest_materialization
from edge_quant_pipeline.staleness import RebuildPlan, as_selection


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
    must_succeed: tuple["PlannedRun", ...] | None = None  # those of them it is skipped without (None: all of them)
    assets: tuple[str, ...] | None = None  # a part of the job's assets (None: all of them)

    @property
    def required(self) -> tuple["PlannedRun", ...]:
        return self.after if self.must_succeed is None else self.must_succeed

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

    def needs_torch(self, conversion_only: bool = False) -> bool:
        """Whether a step of it imports torch and holds the model: its worker exits after it (``workers.py``)."""
        return any(graph.BY_ASSET[name].needs_torch for name in self.asset_names(conversion_only))

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


def plan_runs(
    plan: RebuildPlan,
    models: list[str],
    recipes: list[str],
    reports: DueReports | None,
    leave_out: Collection[tuple[str, str]] = (),
) -> list[PlannedRun]:
    """The runs for ``plan``, each with the runs it waits for; conversions first, the long ones.

    ``reports`` None: no reports (``--convert-only``). ``leave_out``: (model, recipe) pairs not to run, which no
    report then waits for (nor is rebuilt for).
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
        if (m, r) not in leave_out
    }
    runs = [*converts.values(), *resolves.values(), *pairs.values()]
    if reports is None:
        return runs

    # Reports list failures too: they wait for their pairs without needing them to succeed, but not for a checkpoint
    # that failed to convert (the report reads the checkpoint the conversion made).
    def conversion(model: str) -> tuple[PlannedRun, ...]:
        return (converts[model],) if model in converts else ()

    model_reports = [
        PlannedRun(
            graph.REPORT_JOB,
            model=m,
            after=(*conversion(m), *(run for (model, _), run in pairs.items() if model == m)),
            must_succeed=conversion(m),
        )
        for m in models
        if m in reports.models or any(model == m for model, _ in pairs)
    ]
    if model_reports or reports.all_models:
        model_reports.append(PlannedRun(graph.ALL_MODELS_REPORT_JOB, after=tuple(model_reports), must_succeed=()))
    return runs + model_reports


def run_estimates(runs: list[PlannedRun], pipeline: PipelineConfig, conversion_only: bool) -> dict[PlannedRun, float]:
    """Each run's estimated peak: the largest of its steps for its model's size."""
    folders = find_checkpoints(pipeline.checkpoint_dir_path)
    sizes: dict[str, ModelSize | None] = {}
    for model in {r.model for r in runs if r.model}:
        sizes[model] = planned_model_size(folders[model], pipeline) if model in folders else None
    estimates, catalog = {}, pipeline.recipe_catalog()
    for run in runs:
        size = sizes.get(run.model) if run.model else None
        steps = run.asset_names(conversion_only)
        recipe = catalog.recipes.get(run.recipe) if run.recipe else None
        estimates[run] = steps_mb(steps, size, recipe, catalog.calibration_need) if size else LITERT_PROCESS_MB
    return estimates
