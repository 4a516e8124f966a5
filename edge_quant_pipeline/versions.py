"""What identifies what the graph makes: each asset's code version, with the toolchain that makes it and the
settings that shape it (``graph.py`` says which), and the inputs a published artifact's version is derived from.
The code location, the rebuild plan and the sensors read the same versions from here, so they agree on what is
stale."""

from dataclasses import asdict
from typing import Any

from edge_quant_pipeline import graph
from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.publish.store import ArtifactInputs
from edge_quant_pipeline.quantize.recipes import Recipe
from edge_quant_pipeline.toolchain import CONVERSION_PACKAGES, TOOLCHAIN_PACKAGES, toolchain_tag, toolchain_versions

TOOLCHAINS = {graph.CONVERSION_TOOLCHAIN: CONVERSION_PACKAGES, graph.WHOLE_TOOLCHAIN: TOOLCHAIN_PACKAGES}


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


def _settings(pipeline: PipelineConfig) -> dict[str, dict[str, Any]]:
    """The values of each kind of setting a code version can include (``graph.Stage.settings``)."""
    export = asdict(pipeline.export_settings)
    evaluation = pipeline.evaluation_settings()
    return {
        graph.EXPORTER: {"exporter": pipeline.export.exporter},
        graph.EXPORT: export,
        graph.REFERENCE: {
            "eval_text_sha256": evaluation["eval_text_sha256"],
            "eval_max_tokens": evaluation["eval_max_tokens"],
            "kv_cache_len": export["kv_cache_len"],
        },
        graph.CALIBRATION: {**pipeline.calibration_settings(), "computes": pipeline.calibration_need.value},
        graph.EVALUATION: evaluation,
        graph.TASKS: {"tasks": evaluation["tasks"], "task_limit": evaluation["task_limit"]},
    }


def settings_tag(settings: dict[str, Any]) -> str:
    """``name=value,...``, hashes cut to 12 digits: short enough for the UI's code version column."""
    return ",".join(f"{k}={str(v)[:12] if k.endswith('sha256') else v}" for k, v in sorted(settings.items()))


def code_versions(pipeline: PipelineConfig) -> dict[str, str | None]:
    """By asset name, its code version: the stage's own, the versions of the toolchain it runs and the settings
    that shape its output (read once, the eval text hashed once). Changing one shows the asset changed to the UI,
    to declarative automation and to the rebuild plan, as a code change does."""
    values = _settings(pipeline)
    versions: dict[str, str | None] = {}
    for stage in graph.STAGES:
        parts = [stage.code_version] if stage.code_version else []
        if stage.toolchain:
            parts.append(toolchain_tag(TOOLCHAINS[stage.toolchain]))
        if stage.settings:
            parts.append(settings_tag({k: v for kind in stage.settings for k, v in values[kind].items()}))
        versions[stage.asset] = "|".join(parts) or None
    return versions


def model_code_versions(pipeline: PipelineConfig) -> dict[str, str | None]:
    """The code versions of the per-model assets, in graph order."""
    versions = code_versions(pipeline)
    return {asset: versions[asset] for asset in graph.MODEL_ASSETS}
