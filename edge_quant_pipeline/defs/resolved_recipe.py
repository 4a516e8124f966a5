"""`resolved_recipe`: a catalog recipe as it applies to one model; a quality budget resolved by the recipe search."""

import hashlib
import json

import dagster as dg
import pandas as pd

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.admission import admitted
from edge_quant_pipeline.defs.conditions import ON_INPUT_OR_CODE_CHANGE
from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.defs.outcomes import rejected
from edge_quant_pipeline.defs.partitions import BY_MODEL, BY_RECIPE, model_recipe_partitions
from edge_quant_pipeline.disk import NotEnoughDiskError, check_free_disk
from edge_quant_pipeline.evaluate.reference import FloatReference
from edge_quant_pipeline.export.load import architecture_of
from edge_quant_pipeline.footprint import model_size
from edge_quant_pipeline.memory import NotEnoughMemoryError
from edge_quant_pipeline.quantize.apply import QuantizationError
from edge_quant_pipeline.quantize.calibration import CalibrationMissingError, CalibrationStats, quantizer_calibration
from edge_quant_pipeline.quantize.recipes import Recipe, RecipeError
from edge_quant_pipeline.quantize.translate import validate_for_model
from edge_quant_pipeline.runtime.session import RuntimeRejectedError
from edge_quant_pipeline.search import ResolvedRecipe, SearchContext, SearchError, SearchTrace, search
from edge_quant_pipeline.settings import WORK_DIR_VARIABLE
from edge_quant_pipeline.timing import computing
from edge_quant_pipeline.toolchain import toolchain_versions
from edge_quant_pipeline.versions import artifact_inputs
from edge_quant_pipeline.weights import TfliteModel


def assignment_table(trace: SearchTrace) -> str:
    """Per component: the chosen scheme, its bytes against float, and what each candidate was measured to add."""
    chosen = trace.rounds[-1].assignment
    rows = {}
    for s in trace.sensitivities:
        row = rows.setdefault(s.component, {"component": s.component, "chosen": chosen.get(s.component, "")})
        row[f"{s.scheme} cost"] = s.cost
        if s.scheme == chosen.get(s.component):
            row["bytes"], row["float bytes"] = s.weight_bytes, trace.float_weight_bytes.get(s.component, 0)
    return pd.DataFrame(list(rows.values())).to_markdown(index=False, floatfmt=".3g")


def rounds_table(trace: SearchTrace) -> str:
    return pd.DataFrame(
        [
            {
                "round": i,
                "target": r.target,
                "predicted": r.predicted,
                "verified": r.verified,
                "weight MB": r.weight_bytes / 1e6,
            }
            for i, r in enumerate(trace.rounds, 1)
        ]
    ).to_markdown(index=False, floatfmt=".4g")


def search_metadata(trace: SearchTrace) -> dict:
    return {
        "search_assignment": dg.MetadataValue.md(assignment_table(trace)),
        "search_rounds": dg.MetadataValue.md(rounds_table(trace)),
        "search_quantize_passes": trace.quantize_passes,
        "search_scoring_passes": trace.scoring_passes,
        "search_cached_sensitivities": trace.cached_sensitivities,
        "search_seconds": trace.seconds,
    }


def _search_context(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    float_tflite: TfliteModel,
    calibration: CalibrationStats,
    shape,
) -> SearchContext:
    # Sensitivities depend on the model (the work folder's), the scheme (their file's name) and these.
    key = {**pipeline.evaluation_settings(), **pipeline.calibration_settings(), **toolchain_versions()}
    float_tflite = pipeline.work.localize(float_tflite)  # a recipe without a budget needs none of these files
    return SearchContext(
        float_tflite=float_tflite.path,
        shape=shape,
        reference=FloatReference.load(pipeline.work.fetch(pipeline.float_reference_path(checkpoint))),
        settings=pipeline.export_settings,
        num_threads=pipeline.interpreter_threads,
        work_dir=pipeline.work_path(checkpoint) / "search",
        cache_key=hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12],
        calibration=lambda recipe: quantizer_calibration(
            pipeline.work.localize(calibration), float_tflite.path, recipe.needs_hessians
        ),
        log=context.log.info,
    )


@dg.asset(
    partitions_def=model_recipe_partitions,
    automation_condition=ON_INPUT_OR_CODE_CHANGE,
    ins={
        "checkpoint": dg.AssetIn(partition_mapping=BY_MODEL),
        "quant_recipe": dg.AssetIn(partition_mapping=BY_RECIPE),
        "float_tflite": dg.AssetIn(partition_mapping=BY_MODEL),
        "calibration": dg.AssetIn(partition_mapping=BY_MODEL),
    },
    # A search scores candidates against the float reference, read from its folder: a recipe without a budget
    # needs none, so `--convert-only` need not make it.
    deps=[dg.AssetDep("float_reference", partition_mapping=BY_MODEL)],
)
def resolved_recipe(
    context: dg.AssetExecutionContext,
    pipeline: PipelineConfig,
    checkpoint: Checkpoint,
    quant_recipe: Recipe,
    float_tflite: TfliteModel,
    calibration: CalibrationStats,
) -> dg.Output[ResolvedRecipe]:
    """The recipe as it applies to this model, checked against its shape; a budget (`search:`) resolved into the
    smallest per-component, per-block recipe whose verified evaluation meets it."""
    inputs = artifact_inputs(pipeline, checkpoint, quant_recipe)
    # Stored by the checkpoint asset; outputs stored before it did so need litert-torch once more.
    shape = checkpoint.shape or architecture_of(checkpoint).shape
    metadata = {}
    try:
        if quant_recipe.search is None:
            validate_for_model(quant_recipe, shape)
            resolved = ResolvedRecipe(quant_recipe, quant_recipe)
        else:
            # one candidate file at a time, mostly float weights: at most the float file's size
            check_free_disk(pipeline.work_path(checkpoint), float_tflite.file_bytes, WORK_DIR_VARIABLE)
            size = model_size(checkpoint, pipeline, float_tflite.model_bytes)
            with admitted(context, size, quant_recipe) as usage, computing():
                search_context = _search_context(context, pipeline, checkpoint, float_tflite, calibration, shape)
                concrete, trace = search(quant_recipe, search_context)
            resolved = ResolvedRecipe(quant_recipe, concrete, trace)
            metadata = {**search_metadata(trace), **usage.metadata()}
    except RecipeError as error:
        raise rejected(pipeline, inputs, "recipe validation", error) from None
    except SearchError as error:
        raise rejected(pipeline, inputs, "search", error) from None
    except FileNotFoundError as error:  # no float reference yet (--convert-only): not the inputs' fault, retried
        raise rejected(pipeline, inputs, "float reference", error) from None
    except QuantizationError as error:
        raise rejected(pipeline, inputs, "quantization", error) from None
    except CalibrationMissingError as error:  # the calibration asset runs again, then this: retried
        raise rejected(pipeline, inputs, "calibration", error) from None
    except RuntimeRejectedError as error:
        raise rejected(pipeline, inputs, "interpreter", error) from None
    except NotEnoughMemoryError as error:
        raise rejected(pipeline, inputs, "memory", error) from None
    except NotEnoughDiskError as error:
        raise rejected(pipeline, inputs, "disk", error) from None
    return dg.Output(
        resolved,
        data_version=dg.DataVersion(resolved.recipe.spec_hash),
        metadata=for_ui(
            {
                "spec": dg.MetadataValue.json(resolved.recipe.spec()),
                "spec_sha256": resolved.recipe.spec_hash,
                "searched": resolved.trace is not None,
                **metadata,
            }
        ),
    )
