"""Versioned re-materialization: only what changed is rebuilt, counted in real conversions.

A copy of the golden build (the demo checkpoint, every recipe published) and a second copy of the demo checkpoint,
`beta`, materialized here; every run really converts, quantizes and evaluates. Two models show that a change to one
rebuilds only its partitions; planning needs no more than the float file and one quantization to show it, so the
runs here take `float` and `dynamic_int8` only (the golden build's other recipes stay as they were)."""

import shutil
from pathlib import Path

import dagster as dg
import pytest
from conftest import DEMO_MODEL, recipe_catalog

from edge_quant_pipeline.checkpoints.digest import file_sha256
from edge_quant_pipeline.checkpoints.validate import read_checkpoint
from edge_quant_pipeline.config import EvaluationConfig, PipelineConfig
from edge_quant_pipeline.definitions import build_definitions
from edge_quant_pipeline.defs.automation import checkpoint_sensor, nightly_schedules, recipe_sensor
from edge_quant_pipeline.graph import MODEL_ASSETS, QUANTIZE_JOB
from edge_quant_pipeline.publish.store import published_versions, record_failure
from edge_quant_pipeline.rebuild import rebuild_plan
from edge_quant_pipeline.runs.launch import materialize
from edge_quant_pipeline.runs.plan import DueReports, reports_due
from edge_quant_pipeline.versions import artifact_inputs

RECIPES = ["float", "dynamic_int8"]
MODELS = [DEMO_MODEL, "beta"]


def materializations(instance, asset: str, partition: str) -> int:
    return len(
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=100
        ).records
    )


def conversions(instance) -> dict[str, int]:
    return {m: materializations(instance, "float_tflite", m) for m in MODELS}


def quantizations(instance) -> dict[str, int]:
    return {f"{m}|{r}": materializations(instance, "quantized_tflite", f"{m}|{r}") for m in MODELS for r in RECIPES}


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def world(golden, demo_checkpoint_dir):
    with golden.sandbox() as build, build.instance() as instance:
        shutil.copytree(demo_checkpoint_dir, build.root / "checkpoints" / "beta")
        runner = materialize(instance, build.pipeline, MODELS, RECIPES, jobs=2)
        assert runner.failures == 0
        yield instance, build.pipeline, build.root


@pytest.fixture(scope="module")
def defs(world):
    """The code location as it loads with the world's settings (code versions include them)."""
    return build_definitions(world[1])


def test_each_model_is_converted_once_and_each_pair_quantized_once(world):
    instance, _, _ = world
    assert conversions(instance) == {DEMO_MODEL: 1, "beta": 1}  # the golden build's, and this module's
    assert set(quantizations(instance).values()) == {1}


def test_all_models_report_lists_every_model_and_recipe_with_one_champion_each(world):
    from edge_quant_pipeline.publish.report import read_parquet

    instance, pipeline, _ = world
    report = read_parquet(pipeline.store / "report.parquet")
    catalog = pipeline.recipe_catalog().names
    assert sorted(zip(report["model"], report["recipe"], strict=True)) == sorted(
        (m, r) for m in MODELS for r in catalog
    )
    ran = report[report["recipe"].isin(RECIPES)]
    assert set(ran["status"]) == {"published"}
    assert report.groupby("model")["champion"].sum().to_dict() == {m: 1 for m in MODELS}
    meta = instance.fetch_materializations(dg.AssetKey("all_models_report"), limit=1).records[0]
    text = meta.asset_materialization.metadata["report"].value
    assert text.startswith("| model ") and "| beta " in text
    assert (pipeline.store / "report.png").read_bytes().startswith(b"\x89PNG")


def test_nothing_changed_converts_and_quantizes_nothing(world):
    instance, pipeline, _ = world
    before = conversions(instance), quantizations(instance)
    assert rebuild_plan(instance, pipeline, MODELS, RECIPES).empty
    summary = materialize(instance, pipeline, MODELS, RECIPES, jobs=2)
    assert summary.outcomes == [] and summary.failures == 0  # not even the reports: nothing they show changed
    assert (conversions(instance), quantizations(instance)) == before


def test_a_run_launched_elsewhere_makes_only_its_models_report_due(world, defs):
    """The daemon (or the UI) re-ran one pair: the next `edge-quant run` rebuilds that model's report
    and the all-models one, and launches nothing else."""
    instance, pipeline, _ = world
    assert reports_due(instance, MODELS) == DueReports(models=[], all_models=False)
    result = defs.resolve_job_def(QUANTIZE_JOB).execute_in_process(
        partition_key=dg.MultiPartitionKey({"model": DEMO_MODEL, "recipe": "float"}),
        instance=instance,
    )
    assert result.success
    assert reports_due(instance, MODELS).models == [DEMO_MODEL]
    summary = materialize(instance, pipeline, MODELS, RECIPES, jobs=1)
    assert [(o.run.job, o.run.model) for o in summary.outcomes] == [
        ("report", DEMO_MODEL),
        ("report_all_models", None),
    ]


def nightly_requests(instance, pipeline, rebuild_all: bool) -> dict[str, list[str]]:
    """The partitions each nightly schedule requests on a tick now."""
    requests = {}
    for schedule in nightly_schedules("0 2 * * *", "UTC", rebuild_all=rebuild_all):
        repository = build_definitions(pipeline).get_repository_def()
        with dg.build_schedule_context(
            instance=instance, resources={"pipeline": pipeline}, repository_def=repository
        ) as context:
            requests[schedule.job_name] = sorted(
                str(r.partition_key) for r in schedule.evaluate_tick(context).run_requests
            )
    return requests


def test_sensors_request_nothing_when_nothing_changed(world):
    """After `edge-quant run` (whose runs carry no run key), the sensors find the instance holds every
    checkpoint version and recipe already: the daemon starting up launches nothing."""
    instance, pipeline, _ = world
    cursor = None
    for _ in range(2):  # the first tick sees the folders, the second finds them settled
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"pipeline": pipeline}) as context:
            result = checkpoint_sensor(context)
        cursor = result.cursor
        assert result.run_requests == [] and result.dynamic_partitions_requests == []
    with dg.build_sensor_context(instance=instance, resources={"pipeline": pipeline}) as context:
        result = recipe_sensor(context)
    assert result.run_requests == [] and result.dynamic_partitions_requests == []


def test_rebuild_all_requests_every_model_and_recipe(world):
    instance, pipeline, _ = world
    requested = nightly_requests(instance, pipeline, rebuild_all=True)
    assert requested["convert_checkpoint"] == sorted(MODELS)
    assert set(pipeline.recipe_catalog().names) <= set(requested["resolve_recipe"])
    assert requested[QUANTIZE_JOB] == []  # covered by the conversions


def hide_published(root: Path, model: str, recipe: str) -> Path:
    """Move a published (model, recipe) aside, as if its publish never happened; returns where it went."""
    hidden = root / "hidden"
    shutil.move(root / "artifacts" / model / recipe, hidden)
    return hidden


def test_a_failed_or_missing_pair_is_requested_nightly(world):
    """The nightly plan covers the whole catalog: the golden build's recipes that `beta` never ran are requested
    all along; hiding one published pair adds exactly that pair."""
    instance, pipeline, root = world
    before = nightly_requests(instance, pipeline, rebuild_all=False)
    hidden = hide_published(root, DEMO_MODEL, "dynamic_int8")
    try:
        after = nightly_requests(instance, pipeline, rebuild_all=False)
    finally:
        shutil.move(hidden, root / "artifacts" / DEMO_MODEL / "dynamic_int8")
    assert after["convert_checkpoint"] == after["resolve_recipe"] == []
    assert set(after[QUANTIZE_JOB]) - set(before[QUANTIZE_JOB]) == {f"{DEMO_MODEL}|dynamic_int8"}


@pytest.mark.parametrize(
    "stage, retried", [("recipe validation", False), ("interpreter", False), ("quality gate", False), ("memory", True)]
)
def test_a_pair_that_failed_in_a_way_that_would_repeat_is_not_retried(world, stage, retried):
    """Without a published version, a (model, recipe) whose current inputs (gates included) failed validation,
    quantization, the runtime or its gates is settled (the same inputs would fail again); one that ran out of
    memory is retried."""
    instance, pipeline, root = world
    before = set(nightly_requests(instance, pipeline, rebuild_all=False)[QUANTIZE_JOB])
    published = root / "artifacts" / DEMO_MODEL / "dynamic_int8"
    hidden = hide_published(root, DEMO_MODEL, "dynamic_int8")
    try:
        checkpoint = read_checkpoint(root / "checkpoints" / DEMO_MODEL)
        record_failure(
            pipeline.store, artifact_inputs(pipeline, checkpoint, recipe_catalog.get("dynamic_int8")), stage, "x"
        )
        after = set(nightly_requests(instance, pipeline, rebuild_all=False)[QUANTIZE_JOB])
        assert after - before == ({f"{DEMO_MODEL}|dynamic_int8"} if retried else set())
    finally:
        shutil.rmtree(published, ignore_errors=True)
        shutil.move(hidden, published)


def test_changing_one_checkpoint_rebuilds_only_its_partitions(world):
    instance, pipeline, root = world
    before_q = quantizations(instance)
    flip_last_byte(root / "checkpoints" / "beta" / "model.safetensors")
    plan = rebuild_plan(instance, pipeline, MODELS, RECIPES)
    assert (plan.convert, plan.resolve, plan.quantize) == ({"beta": MODEL_ASSETS}, [], [])

    # One run at a time: with two, the latest `evaluation` materialization and the latest run of its checks can be
    # of different partitions, and declarative automation (next test) reads a partitioned asset's check results
    # across partitions: it would take the checks as stale and hold publishing back.
    summary = materialize(instance, pipeline, MODELS, RECIPES, jobs=1)
    assert summary.failures == 0
    assert {(o.run.job, o.run.model) for o in summary.outcomes if "report" in o.run.job} == {
        ("report", "beta"),
        ("report_all_models", None),
    }
    assert conversions(instance) == {DEMO_MODEL: 1, "beta": 2}
    after_q = quantizations(instance)
    assert {k: after_q[k] - before_q[k] for k in after_q} == {
        f"{m}|{r}": int(m == "beta") for m in MODELS for r in RECIPES
    }
    assert rebuild_plan(instance, pipeline, MODELS, RECIPES).empty


def test_automation_carries_a_conversion_downstream(world, defs):
    """After only the model-level job ran for a changed checkpoint, declarative automation
    requests exactly that model's (model, recipe) partitions."""
    instance, pipeline, root = world
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)  # the daemon's first tick
    assert before.total_requested == 0

    flip_last_byte(root / "checkpoints" / DEMO_MODEL / "model.safetensors")
    result = defs.resolve_job_def("convert_checkpoint").execute_in_process(partition_key=DEMO_MODEL, instance=instance)
    assert result.success

    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    changed_pairs = {f"{DEMO_MODEL}|{r}" for r in pipeline.recipe_catalog().names}  # the whole catalog
    for asset in ("quantized_tflite", "evaluation", "published_artifact"):
        assert {str(k) for k in after.get_requested_partitions(dg.AssetKey(asset))} == changed_pairs
    assert after.get_requested_partitions(dg.AssetKey("float_tflite")) == set()  # already rebuilt by the run


def test_a_new_eval_text_rebuilds_the_reference_and_every_evaluation_but_no_export(world, tmp_path):
    """The eval text is an input of the float reference and of every metric: a new one is seen as stale through
    every entry point, is a new artifact version, and is recorded in the manifest; the export is not redone."""
    instance, pipeline, root = world
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text(Path(pipeline.evaluation.text).read_text()[::-1])
    evaluation = EvaluationConfig(**{**pipeline.evaluation.model_dump(), "text": str(eval_text)})
    edited = PipelineConfig(
        **{**pipeline.model_dump(), "artifact_store": pipeline.artifact_store, "evaluation": evaluation}
    )
    # the float reference, and the float baseline, whose long generations start from the eval text's prompts
    reference = ("float_reference", "float_baseline")
    assert rebuild_plan(instance, edited, MODELS, RECIPES).convert == {m: reference for m in MODELS}
    with dg.build_sensor_context(instance=instance, resources={"pipeline": edited}) as context:
        cursor = checkpoint_sensor(context).cursor
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"pipeline": edited}) as context:
        requests = checkpoint_sensor(context).run_requests
    assert {(r.partition_key, tuple(k.path[-1] for k in r.asset_selection)) for r in requests} == {
        (m, reference) for m in MODELS
    }

    before = conversions(instance), quantizations(instance)
    summary = materialize(instance, edited, MODELS, RECIPES, jobs=2)
    assert summary.failures == 0
    assert conversions(instance) == before[0]  # no export
    assert {m: materializations(instance, "float_reference", m) for m in MODELS} == {DEMO_MODEL: 3, "beta": 3}
    assert all(after > before[1][pair] for pair, after in quantizations(instance).items())
    manifests = published_versions(edited.store, "beta", "float")
    assert [m["evaluation_settings"]["eval_text_sha256"] for m in manifests[-2:]] == [
        file_sha256(Path(pipeline.evaluation.text)),
        file_sha256(eval_text),
    ]
    assert rebuild_plan(instance, edited, MODELS, RECIPES).empty


def test_automation_refreshes_the_report_after_an_evaluation_that_published_nothing(world, defs):
    """An evaluation that fails its gates materializes `evaluation` and records the failure, but publishes
    nothing: the daemon must still rebuild that model's report, which shows the failure."""
    instance, _, _ = world
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    result = defs.resolve_job_def(QUANTIZE_JOB).execute_in_process(
        partition_key=dg.MultiPartitionKey({"model": "beta", "recipe": "float"}),
        instance=instance,
        asset_selection=[dg.AssetKey("evaluation")],
    )
    assert result.success
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    assert after.get_requested_partitions(dg.AssetKey("quantization_report")) == {"beta"}
