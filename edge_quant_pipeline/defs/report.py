"""`quantization_report`: every recipe of one model side by side, as Parquet and as a table in the UI."""

import dagster as dg
import pandas as pd

from edge_quant_pipeline.checkpoints import Checkpoint
from edge_quant_pipeline.defs.outcomes import artifact_inputs
from edge_quant_pipeline.defs.conditions import ON_ANY_PUBLISH
from edge_quant_pipeline.defs.partitions import BY_MODEL, model_partitions, recipe_catalog
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.publish import failure_record, published_manifest
from edge_quant_pipeline.report import build_report, report_row, to_markdown, write_parquet


@dg.asset(
    partitions_def=model_partitions,
    automation_condition=ON_ANY_PUBLISH,
    group_name="publishing",
    deps=[dg.AssetDep("published_artifact", partition_mapping=BY_MODEL)],
)
def quantization_report(
    context: dg.AssetExecutionContext, pipeline: PipelineConfig, checkpoint: Checkpoint
) -> dg.Output[pd.DataFrame]:
    """One row per recipe for the current checkpoint: published metrics, or why it did not publish."""
    rows = []
    for name in recipe_catalog.names:
        if name in recipe_catalog.errors:
            rows.append({"recipe": name, "status": "failed (recipe)", "error": recipe_catalog.errors[name]})
            continue
        inputs = artifact_inputs(checkpoint, recipe_catalog.recipes[name])
        rows.append(report_row(name, published_manifest(pipeline.store, inputs), failure_record(pipeline.store, inputs)))
    frame = build_report(rows)
    path = write_parquet(frame, pipeline.store / checkpoint.model_id / "report.parquet")
    return dg.Output(frame, metadata={
        "report": dg.MetadataValue.md(to_markdown(frame)),
        "parquet": dg.MetadataValue.path(str(path)),
        "published": int((frame["status"] == "published").sum()),
        "recipes": len(frame),
    })
