"""What runs unattended: a sensor on the checkpoint folder, one on the recipe catalog,
nightly re-quantization schedules, and declarative automation downstream.

Sensors and schedules only request the first stage that must run again (a model's
conversion, a recipe's resolution, or a pair's quantization), and only when the
instance does not already hold it for the current inputs: whoever made it (this
sensor, `edge-quant run`, the UI), nothing is made twice. The automation
conditions on the assets (``conditions.py``) carry the change down the graph,
partition by partition, in dependency order.
"""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg

from edge_quant_pipeline import deployment_settings
from edge_quant_pipeline.checkpoints.folders import SeenCheckpoint, look_again, scan_checkpoints
from edge_quant_pipeline.config import PipelineConfig
from edge_quant_pipeline.defs.partitions import model_partitions, recipe_partitions
from edge_quant_pipeline.graph import CONVERT_JOB, QUANTIZE_JOB, RESOLVE_JOB
from edge_quant_pipeline.rebuild import (
    DATA_VERSION_TAG,
    forgettable_models,
    latest_tags,
    model_state,
    rebuild_plan,
    recipe_partition_changes,
)
from edge_quant_pipeline.staleness import as_selection
from edge_quant_pipeline.versions import model_code_versions


def settled_hash(
    context: dg.SensorEvaluationContext, model_id: str, path: Path, seen: dict[str, SeenCheckpoint]
) -> str | None:
    """The version of a checkpoint whose files held still for a tick; None (and ``seen`` updated) while they change.
    Raises OSError when a file vanishes while it is read."""
    previous = seen.get(model_id)
    seen[model_id] = current = look_again(path, previous)
    if current is not previous and current.problem:  # said once per state of the folder
        context.log.warning(
            f"{current.problem} Its `checkpoint` step will fail with this reason until the folder changes."
        )
    return current.content_hash


def conversion_request(
    context: dg.SensorEvaluationContext, model_id: str, content_hash: str, versions: dict[str, str | None]
) -> dg.RunRequest | None:
    """The part of the conversion the instance lacks for this checkpoint version and the current settings (the
    whole of it for new bytes, only the float reference for a new eval text), or None when it has it all.
    ``versions``: the model-level assets' code versions now."""
    assets = model_state(context.instance, model_id, content_hash, versions).assets_to_run
    if not assets:
        return None
    selection = as_selection(assets)
    versions_key = "|".join(version or "" for version in versions.values())
    # The run key makes one state trigger once, across restarts, also while its run is still going.
    return dg.RunRequest(
        partition_key=model_id,
        run_key=f"{model_id}@{content_hash}@{hashlib.sha256(versions_key.encode()).hexdigest()[:12]}",
        asset_selection=[dg.AssetKey(a) for a in selection] if selection else None,
    )


@dg.sensor(
    job_name=CONVERT_JOB,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the checkpoint folder: adds a `model` partition per checkpoint, converts new or changed ones.",
)
def checkpoint_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineConfig) -> dg.SensorResult | dg.SkipReason:
    root = pipeline.checkpoint_dir_path
    if not root.is_dir():
        return dg.SkipReason(f"{root} does not exist; set EDGE_QUANT_CHECKPOINT_DIR to your checkpoint folder.")
    seen = {m: SeenCheckpoint(**s) for m, s in json.loads(context.cursor or "{}").items()}
    scan = scan_checkpoints(root)  # folders without config.json are not checkpoints (yet)
    for refused in scan.refused:  # every tick, until someone renames the folder
        context.log.warning(refused.reason)

    forgotten = forgettable_models(context.instance, scan.model_ids)  # gone, and never converted: nothing to keep
    for gone in sorted(set(seen) - set(scan.found)):
        if scan.refusal_for(gone) is None and gone not in forgotten:
            context.log.warning(f"Checkpoint {gone!r} is gone from {root}; its partitions and artifacts are kept.")
        del seen[gone]
    if forgotten:
        context.log.info(f"Deleting the partitions of {', '.join(forgotten)}: gone from {root}, never converted.")

    requests, settling, settled, versions = [], [], [], model_code_versions(pipeline)
    for model_id, path in scan.found.items():
        try:
            content_hash = settled_hash(context, model_id, path, seen)
        except OSError as error:  # a file vanished or changed while it was read: this tick skips the checkpoint
            context.log.info(f"Could not read {path} this tick ({error}); looking again next tick.")
            seen.pop(model_id, None)
            content_hash = None
        if content_hash is None:
            settling.append(model_id)
            continue
        settled.append(model_id)
        if request := conversion_request(context, model_id, content_hash, versions):
            requests.append(request)

    new_models = [m for m in settled if not context.instance.has_dynamic_partition(model_partitions.name, m)]
    if settling:
        context.log.info(f"Waiting for {', '.join(settling)} to stop changing")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[
            *([model_partitions.build_add_request(new_models)] if new_models else []),
            *([model_partitions.build_delete_request(forgotten)] if forgotten else []),
        ],
        cursor=json.dumps({m: asdict(s) for m, s in seen.items()}),
    )


@dg.sensor(
    job_name=RESOLVE_JOB,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps a `recipe` partition per catalog entry, and resolves each recipe whose spec or gates the "
    "instance has not resolved yet.",
)
def recipe_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineConfig) -> dg.SensorResult:
    catalog = pipeline.recipe_catalog()
    added, deleted = recipe_partition_changes(context.instance, catalog.names)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=name, run_key=f"{name}@{recipe.definition_hash}")
            for name, recipe in catalog.recipes.items()
            if name not in catalog.errors
            and latest_tags(context.instance, "quant_recipe", name).get(DATA_VERSION_TAG) != recipe.definition_hash
        ],
        dynamic_partitions_requests=[
            *([recipe_partitions.build_add_request(added)] if added else []),
            *([recipe_partitions.build_delete_request(deleted)] if deleted else []),
        ],
    )


def nightly_schedules(cron: str, timezone: str, rebuild_all: bool) -> list[dg.ScheduleDefinition]:
    """One schedule per first stage (a schedule targets one job), all planned from the same state.

    Their requests never overlap: a pair is quantized directly only when neither
    its model nor its recipe is being rebuilt.
    """

    def requests_for(job_name: str, context: dg.ScheduleEvaluationContext, pipeline: PipelineConfig):
        plan = rebuild_plan(context.instance, pipeline, rebuild_all=rebuild_all)
        keys: dict[str, tuple[str, ...] | None] = {  # partition -> the assets to make, None: all the job's
            CONVERT_JOB: {m: as_selection(assets) for m, assets in plan.convert.items()},
            RESOLVE_JOB: dict.fromkeys(plan.resolve),
            QUANTIZE_JOB: dict.fromkeys(dg.MultiPartitionKey({"model": m, "recipe": r}) for m, r in plan.quantize),
        }[job_name]
        # Schedule run keys are scoped to one tick: they only tell this tick's requests apart.
        return [
            dg.RunRequest(
                partition_key=key,
                run_key=str(key),
                asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
                tags={"edge_quant/trigger": "nightly"},
            )
            for key, assets in keys.items()
        ]

    def build(job_name: str) -> dg.ScheduleDefinition:
        @dg.schedule(
            name=f"nightly_{job_name}",
            job_name=job_name,
            cron_schedule=cron,
            execution_timezone=timezone,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Nightly: {job_name} for every stale or failed partition"
            + (" (EDGE_QUANT_NIGHTLY_REBUILD_ALL: everything)" if rebuild_all else ""),
        )
        def schedule(context: dg.ScheduleEvaluationContext, pipeline: PipelineConfig):
            return requests_for(job_name, context, pipeline)

        return schedule

    return [build(job) for job in (CONVERT_JOB, RESOLVE_JOB, QUANTIZE_JOB)]


def nightly_schedules_from_env() -> list[dg.ScheduleDefinition]:
    return nightly_schedules(
        cron=deployment_settings.nightly_cron(),
        timezone=deployment_settings.nightly_timezone(),
        rebuild_all=deployment_settings.nightly_rebuild_all(),
    )


automation_sensor = dg.AutomationConditionSensorDefinition(
    "downstream_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
