"""What identifies a (model, recipe) result, and how a rejected one is recorded before it fails."""

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import dagster as dg

from edge_quant_pipeline.checkpoints import Checkpoint
from edge_quant_pipeline.defs.resources import PipelineConfig
from edge_quant_pipeline.publish import ArtifactInputs, record_failure
from edge_quant_pipeline.quantize.recipes import Recipe
from edge_quant_pipeline.toolchain import toolchain_versions


def artifact_inputs(pipeline: PipelineConfig, checkpoint: Checkpoint, recipe: Recipe) -> ArtifactInputs:
    return ArtifactInputs(
        model_id=checkpoint.model_id,
        recipe=recipe.name,
        checkpoint_hash=checkpoint.content_hash,
        recipe_hash=recipe.spec_hash,
        toolchain=toolchain_versions(),
        exporter=checkpoint.exporter,
        tokenizer_hash=checkpoint.tokenizer_hash,
        export=asdict(pipeline.export_settings),
        evaluation=pipeline.evaluation_settings(),
        gates=dict(recipe.gates),
        calibration=pipeline.calibration_settings() if recipe.needs_calibration else None,
    )


def _settings_by_asset(pipeline: PipelineConfig) -> dict[str, dict[str, Any]]:
    export = asdict(pipeline.export_settings)
    evaluation = pipeline.evaluation_settings()
    reference = {key: evaluation[key] for key in ("eval_text_sha256", "eval_max_tokens")}
    return {
        "checkpoint": {"exporter": pipeline.exporter},
        "float_tflite": export,
        "float_reference": {**reference, "kv_cache_len": export["kv_cache_len"]},
        "calibration": {**pipeline.calibration_settings(), **export, "computes": pipeline.calibration_need.value},
        "evaluation": evaluation,
    }


def settings_tag(settings: dict[str, Any]) -> str:
    """``name=value,...``, hashes cut to 12 digits: short enough for the UI's code version column."""
    return ",".join(f"{k}={str(v)[:12] if k.endswith('sha256') else v}" for k, v in sorted(settings.items()))


def code_versions(assets: Iterable[dg.AssetsDefinition], pipeline: PipelineConfig) -> dict[str, str | None]:
    """By asset name, each asset's code version with the settings that shape its output (read once, the eval
    text hashed once): changing one shows the asset changed to the UI, to declarative automation and to the
    rebuild plan, as a code change does."""
    by_asset = _settings_by_asset(pipeline)
    versions = {}
    for asset in assets:
        base, settings = asset.code_versions_by_key[asset.key], by_asset.get(asset.key.path[-1])
        versions[asset.key.path[-1]] = f"{base}|{settings_tag(settings)}" if settings else base
    return versions


def with_code_version(asset: dg.AssetsDefinition, version: str | None) -> dg.AssetsDefinition:
    return asset.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))


def rejected(pipeline: PipelineConfig, inputs: ArtifactInputs, stage: str, error: Exception) -> dg.Failure:
    """Record why this partition has no artifact (for the report); the Failure fails only this partition."""
    record_failure(pipeline.store, inputs, stage, str(error))
    return dg.Failure(
        description=f"{inputs.recipe} on {inputs.model_id}: {stage} failed: {error}",
        metadata={"stage": stage, "error": str(error)},
    )
