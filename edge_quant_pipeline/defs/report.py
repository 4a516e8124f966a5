"""The reports: every recipe of one model side by side (`quantization_report`), and every
model's in one table (`all_models_report`); each as Parquet, markdown and a plot in the UI."""

import dagster as dg
import pandas as pd
from upath import UPath

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.conditions import ON_ANY_OUTCOME
from edge_quant_pipeline.defs.partitions import BY_MODEL, model_partitions
from edge_quant_pipeline.footprint import pair_never_fits, planned_model_size
from edge_quant_pipeline.publish.objects import write_atomically
from edge_quant_pipeline.publish.report import (
    PLOT_FILE,
    REPORT_FILE,
    SEARCH_PLOT_FILE,
    build_report,
    champion_note,
    champion_of,
    embedded_png,
    read_parquet,
    report_row,
    search_markdown,
    search_png,
    size_quality_png,
    to_markdown,
    write_parquet,
)
from edge_quant_pipeline.publish.store import latest_outcome, point_champion
from edge_quant_pipeline.versions import artifact_inputs


def stored_report(frame: pd.DataFrame, folder: UPath, note: str = "") -> dict[str, object]:
    """Write the report and its plot into ``folder``; the metadata that shows both in the UI."""
    parquet = write_parquet(frame, folder / REPORT_FILE)
    png = size_quality_png(frame)
    write_atomically(folder / PLOT_FILE, png)
    return {
        "report": dg.MetadataValue.md(to_markdown(frame) + (f"\n\n{note}" if note else "")),
        "size_vs_quality": dg.MetadataValue.md(embedded_png(png)),
        "parquet": dg.MetadataValue.path(str(parquet)),
        "plot": dg.MetadataValue.path(str(folder / PLOT_FILE)),
        "published": int((frame["status"] == "published").sum()),
        "recipes": len(frame),
    }


@dg.asset(
    partitions_def=model_partitions,
    automation_condition=ON_ANY_OUTCOME,
    # It reads what evaluation records as well as what publishing does: an evaluation that failed its gates
    # publishes nothing, and the report must still say so.
    deps=[
        dg.AssetDep("evaluation", partition_mapping=BY_MODEL),
        dg.AssetDep("published_artifact", partition_mapping=BY_MODEL),
    ],
)
def quantization_report(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint
) -> dg.Output[pd.DataFrame]:
    """One row per recipe for the current checkpoint, as its latest evaluation left it: published metrics, or why
    it did not publish (or no longer passes); the champion (smallest published file) marked and pointed to by
    `<store>/<model>/champion.json`, which is removed when no recipe of this checkpoint is published."""
    rows, searches, catalog = [], {}, pipeline.recipe_catalog()
    size = planned_model_size(checkpoint.path, pipeline)
    for name in catalog.names:
        if name in catalog.errors:
            rows.append({"recipe": name, "status": "failed (recipe)", "error": catalog.errors[name]})
            continue
        recipe = catalog.recipes[name]
        manifest, failure = latest_outcome(pipeline.store, artifact_inputs(pipeline, checkpoint, recipe))
        never_ran = size is not None and not (manifest or failure)
        refusal = pair_never_fits(size, recipe, catalog.calibration_need) if never_ran else None
        rows.append(report_row(name, manifest, failure, refusal))
        if manifest and manifest.get("search"):
            searches[name] = manifest["search"]
    frame = build_report(rows)
    champion = champion_of(frame)
    update = point_champion(pipeline.store, checkpoint.model_id, champion)
    if update.changed:
        context.log.info(champion_note(update))
    return dg.Output(
        frame,
        metadata={
            **stored_report(frame, pipeline.store / checkpoint.model_id, champion_note(update)),
            "champion": champion["recipe"] if champion else "",
            "champion_changed": update.changed,
            **search_reports(searches, pipeline.store / checkpoint.model_id),
        },
    )


def search_reports(searches: dict[str, dict], folder: UPath) -> dict[str, object]:
    """Per budget recipe, its search's tables and its sensitivity plot (`<store>/<model>/search-<recipe>.png`)."""
    metadata: dict[str, object] = {}
    for recipe, trace in searches.items():
        png = search_png(recipe, trace)
        write_atomically(folder / SEARCH_PLOT_FILE.format(recipe=recipe), png)
        metadata[f"search_{recipe}"] = dg.MetadataValue.md(
            search_markdown(recipe, trace) + "\n\n" + embedded_png(png, f"{recipe} search")
        )
    return metadata


@dg.asset(
    automation_condition=ON_ANY_OUTCOME,
    deps=[quantization_report],
)
def all_models_report(context: dg.AssetExecutionContext, pipeline: PipelineConfig) -> dg.Output[pd.DataFrame]:
    """Every model's latest report in one table, `<store>/report.parquet`, with a `model` column."""
    frames = []
    for model_id in context.instance.get_dynamic_partitions(model_partitions.name):
        frame = read_parquet(pipeline.store / model_id / REPORT_FILE)
        if frame is not None:  # None: a model whose report has not run yet
            frame.insert(0, "model", model_id)
            frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else build_report([]).assign(model=None)
    return dg.Output(frame, metadata={**stored_report(frame, pipeline.store), "models": len(frames)})
