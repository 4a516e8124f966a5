"""`quantized_tflite`: the float flatbuffer with one recipe applied by ai-edge-quantizer."""

from dataclasses import replace

import dagster as dg
import pandas as pd

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.admission import admitted
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.outcomes import rejected
from edge_quant_pipeline.defs.partitions import BY_MODEL, model_recipe_partitions
from edge_quant_pipeline.disk import NotEnoughDiskError, check_free_disk
from edge_quant_pipeline.export.load import architecture_of
from edge_quant_pipeline.footprint import model_size, quantize_disk_bytes
from edge_quant_pipeline.memory import NotEnoughMemoryError
from edge_quant_pipeline.publish.store import record_failure
from edge_quant_pipeline.quantize.apply import QuantizationError, quantize_model
from edge_quant_pipeline.quantize.calibration import CalibrationMissingError, CalibrationStats, quantizer_calibration
from edge_quant_pipeline.quantize.conformance import ConformanceRow, check_conformance
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe, embedder_quantizer_recipe
from edge_quant_pipeline.search import ResolvedRecipe
from edge_quant_pipeline.settings import WORK_DIR_VARIABLE
from edge_quant_pipeline.timing import computing
from edge_quant_pipeline.versions import artifact_inputs
from edge_quant_pipeline.weights import TfliteModel, inspect_tflite


def conformance_table(rows: list[ConformanceRow], model: TfliteModel) -> str:
    """Per component and block: the storage the recipe asks for, what the file holds, and its bytes."""
    sizes: dict[tuple[str, int | None], int] = {}
    for w in model.weights:
        sizes[(w.component, w.block)] = sizes.get((w.component, w.block), 0) + w.num_bytes
    return pd.DataFrame(
        [
            {
                "component": row.component,
                "block": "" if row.block is None else row.block,
                "expected": str(row.expected),
                "actual": str(row.actual),
                "bytes": sizes.get((row.component, row.block), 0),
                "ok": "yes" if row.ok else "NO",
            }
            for row in rows
        ]
    ).to_markdown(index=False)


@dg.asset(
    partitions_def=model_recipe_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    ins={
        "checkpoint": dg.AssetIn(partition_mapping=BY_MODEL),
        "float_tflite": dg.AssetIn(partition_mapping=BY_MODEL),
        "calibration": dg.AssetIn(partition_mapping=BY_MODEL),
    },
    check_specs=[
        dg.AssetCheckSpec(
            "matches_recipe",
            asset="quantized_tflite",
            blocking=True,
            description="Every component's weights have the dtype, granularity and compute its recipe asks for.",
        )
    ],
)
def quantized_tflite(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    float_tflite: TfliteModel,
    calibration: CalibrationStats,
    resolved_recipe: ResolvedRecipe,
):
    """The model quantized with one recipe as it applies to this model (the `float` recipe is the float file)."""
    catalog_recipe, recipe = resolved_recipe.catalog, resolved_recipe.recipe
    float_tflite = pipeline.work.localize(float_tflite)
    inputs = artifact_inputs(pipeline, checkpoint, catalog_recipe)
    # Stored by the checkpoint asset; outputs stored before it did so need litert-torch once more.
    shape = checkpoint.shape or architecture_of(checkpoint).shape
    output = pipeline.work_path(checkpoint) / f"{recipe.name}-{recipe.spec_hash[:12]}.tflite"
    try:
        check_free_disk(output.parent, quantize_disk_bytes(float_tflite.file_bytes, recipe), WORK_DIR_VARIABLE)
        size = model_size(checkpoint, pipeline, float_tflite.model_bytes)
        if recipe.needs_calibration:  # its statistics are loaded too (and downloaded only then)
            calibration = pipeline.work.localize(calibration)
            size = replace(size, calibration_bytes=calibration.size_bytes)
        with admitted(context, size, recipe) as usage, computing():
            statistics = (
                quantizer_calibration(calibration, float_tflite.path, recipe.needs_hessians)
                if recipe.needs_calibration
                else None
            )
            model_recipe = ai_edge_quantizer_recipe(recipe, shape.tied_lm_head)
            quantize_model(float_tflite.path, model_recipe, embedder_quantizer_recipe(recipe), output, statistics)
    except (QuantizationError, CalibrationMissingError, NotEnoughMemoryError, NotEnoughDiskError) as error:
        stages = {NotEnoughMemoryError: "memory", NotEnoughDiskError: "disk", CalibrationMissingError: "calibration"}
        stage = stages.get(type(error), "quantization")
        raise rejected(pipeline, inputs, stage, error) from None
    quantized = inspect_tflite(output)
    rows = check_conformance(recipe, quantized.weights, shape)
    table = conformance_table(rows, quantized)
    ratio = float_tflite.file_bytes / quantized.file_bytes
    quantized = pipeline.work.shared(quantized, *quantized.embedders.values())
    context.log.info(f"{recipe.name}: {quantized.file_bytes} bytes, {ratio:.2f}x smaller than float")
    yield dg.Output(
        quantized,
        metadata=for_ui(
            {
                "tflite": dg.MetadataValue.path(str(output)),
                **quantized.embedder_metadata(),
                "file_bytes": quantized.file_bytes,
                "weight_bytes": quantized.weight_bytes,
                "file_ratio_vs_float": ratio,
                "weight_ratio_vs_float": float_tflite.weight_bytes / quantized.weight_bytes,
                "weights_by_component": dg.MetadataValue.md(table),
                "spec": dg.MetadataValue.json(recipe.spec()),
                **usage.metadata(),
            }
        ),
    )
    mismatches = [row for row in rows if not row.ok]
    description = f"{len(mismatches)} of {len(rows)} components differ from the recipe: " + ", ".join(
        f"{r.component}{'' if r.block is None else f'[{r.block}]'}" for r in mismatches
    )
    if mismatches:  # the check blocks everything after it; the report says why
        record_failure(pipeline.store, inputs, "conformance", description)
    yield dg.AssetCheckResult(
        check_name="matches_recipe",
        passed=not mismatches,
        description=description if mismatches else f"all {len(rows)} components as specified",
        metadata={"components": dg.MetadataValue.md(table)},
    )
