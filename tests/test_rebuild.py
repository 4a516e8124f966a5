"""Versioned re-materialization: only what changed is rebuilt, counted in real conversions.

Two copies of the demo checkpoint, the whole recipe catalog, a real test instance; every run
really converts, quantizes and evaluates."""

import shutil
from pathlib import Path

import dagster as dg
import pytest
from conftest import recipe_catalog

from edge_quant_pipeline.checkpoints import file_sha256, read_checkpoint
from edge_quant_pipeline.definitions import build_definitions
from edge_quant_pipeline.defs.automation import checkpoint_sensor, nightly_schedules, recipe_sensor
from edge_quant_pipeline.defs.outcomes import artifact_inputs
from edge_quant_pipeline.defs.rebuild import DueReports, rebuild_plan, reports_due
from edge_quant_pipeline.defs.resources import ArtifactStore, PipelineConfig
from edge_quant_pipeline.launcher import materialize
from edge_quant_pipeline.publish import published_versions, record_failure
from edge_quant_pipeline.staleness import MODEL_ASSETS

RECIPES = recipe_catalog.names
MODELS = ["alpha", "beta"]


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
def world(tmp_path_factory, demo_checkpoint_dir):
    root = tmp_path_factory.mktemp("rebuild")
    for model in MODELS:
        shutil.copytree(demo_checkpoint_dir, root / "checkpoints" / model)
    pipeline = PipelineConfig(
        checkpoint_dir=str(root / "checkpoints"),
        artifact_store=ArtifactStore(url=str(root / "artifacts")),
        work_dir=str(root / "work"),
        eval_max_tokens=512,
    )
    with dg.instance_for_test() as instance:
        runner = materialize(instance, pipeline, MODELS, RECIPES, jobs=2)
        assert runner.failures == 0
        yield instance, pipeline, root


@pytest.fixture(scope="module")
def defs(world):
    """The code location as it loads with the world's settings (code versions include them)."""
    return build_definitions(world[1])


def test_first_run_converts_each_model_once_and_quantizes_each_pair_once(world):
    instance, _, _ = world
    assert conversions(instance) == {"alpha": 1, "beta": 1}
    assert set(quantizations(instance).values()) == {1}


def test_all_models_report_lists_every_model_and_recipe_with_one_champion_each(world):
    from edge_quant_pipeline.report import read_parquet

    instance, pipeline, _ = world
    report = read_parquet(pipeline.store / "report.parquet")
    assert sorted(zip(report["model"], report["recipe"], strict=True)) == sorted(
        (m, r) for m in MODELS for r in RECIPES
    )
    assert set(report["status"]) == {"published"}
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
    result = defs.resolve_job_def("quantize_evaluate_publish").execute_in_process(
        partition_key=dg.MultiPartitionKey({"model": "alpha", "recipe": "float"}),
        instance=instance,
    )
    assert result.success
    assert reports_due(instance, MODELS).models == ["alpha"]
    summary = materialize(instance, pipeline, MODELS, RECIPES, jobs=1)
    assert [(o.run.job, o.run.model) for o in summary.outcomes] == [("report", "alpha"), ("report_all_models", None)]


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


def test_nightly_schedules_request_nothing_when_nothing_changed(world):
    instance, pipeline, _ = world
    assert set(map(tuple, nightly_requests(instance, pipeline, rebuild_all=False).values())) == {()}


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
    assert requested["convert_checkpoint"] == MODELS
    assert set(RECIPES) <= set(requested["resolve_recipe"])
    assert requested["quantize_evaluate_publish"] == []  # covered by the conversions


def test_a_failed_or_missing_pair_is_requested_nightly(world):
    instance, pipeline, root = world
    published = root / "artifacts" / "alpha" / "dynamic_int8"
    hidden = root / "hidden"
    shutil.move(published, hidden)  # as if its publish never happened
    try:
        assert nightly_requests(instance, pipeline, rebuild_all=False) == {
            "convert_checkpoint": [],
            "resolve_recipe": [],
            "quantize_evaluate_publish": ["alpha|dynamic_int8"],
        }
    finally:
        shutil.move(hidden, published)


@pytest.mark.parametrize(
    "stage, retried", [("recipe validation", False), ("interpreter", False), ("quality gate", False), ("memory", True)]
)
def test_a_pair_that_failed_in_a_way_that_would_repeat_is_not_retried(world, stage, retried):
    """Without a published version, a (model, recipe) whose current inputs (gates included) failed validation,
    quantization, the runtime or its gates is settled (the same inputs would fail again); one that ran out of
    memory is retried."""
    instance, pipeline, root = world
    published = root / "artifacts" / "alpha" / "dynamic_int8"
    hidden = root / "hidden"
    shutil.move(published, hidden)
    try:
        checkpoint = read_checkpoint(root / "checkpoints" / "alpha")
        record_failure(
            pipeline.store, artifact_inputs(pipeline, checkpoint, recipe_catalog.get("dynamic_int8")), stage, "x"
        )
        requested = nightly_requests(instance, pipeline, rebuild_all=False)["quantize_evaluate_publish"]
        assert requested == (["alpha|dynamic_int8"] if retried else [])
    finally:
        shutil.rmtree(published, ignore_errors=True)
        shutil.move(hidden, published)


def test_changing_one_checkpoint_rebuilds_only_its_partitions(world):
    instance, pipeline, root = world
    before_q = quantizations(instance)
    flip_last_byte(root / "checkpoints" / "beta" / "model.safetensors")
    plan = rebuild_plan(instance, pipeline, MODELS, RECIPES)
    assert (plan.convert, plan.resolve, plan.quantize) == ({"beta": MODEL_ASSETS}, [], [])

    summary = materialize(instance, pipeline, MODELS, RECIPES, jobs=2)
    assert summary.failures == 0
    assert {(o.run.job, o.run.model) for o in summary.outcomes if "report" in o.run.job} == {
        ("report", "beta"),
        ("report_all_models", None),
    }
    assert conversions(instance) == {"alpha": 1, "beta": 2}
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

    flip_last_byte(root / "checkpoints" / "alpha" / "model.safetensors")
    result = defs.resolve_job_def("convert_checkpoint").execute_in_process(partition_key="alpha", instance=instance)
    assert result.success

    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    alpha_pairs = {f"alpha|{r}" for r in RECIPES}
    for asset in ("quantized_tflite", "evaluation", "published_artifact"):
        assert {str(k) for k in after.get_requested_partitions(dg.AssetKey(asset))} == alpha_pairs
    assert after.get_requested_partitions(dg.AssetKey("float_tflite")) == set()  # already rebuilt by the run


def test_a_new_eval_text_rebuilds_the_reference_and_every_evaluation_but_no_export(world, tmp_path):
    """The eval text is an input of the float reference and of every metric: a new one is seen as stale through
    every entry point, is a new artifact version, and is recorded in the manifest; the export is not redone."""
    instance, pipeline, root = world
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text(Path(pipeline.eval_text).read_text()[::-1])
    edited = PipelineConfig(
        **{**pipeline.model_dump(), "artifact_store": pipeline.artifact_store, "eval_text": str(eval_text)}
    )
    assert rebuild_plan(instance, edited, MODELS, RECIPES).convert == {m: ("float_reference",) for m in MODELS}
    with dg.build_sensor_context(instance=instance, resources={"pipeline": edited}) as context:
        cursor = checkpoint_sensor(context).cursor
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"pipeline": edited}) as context:
        requests = checkpoint_sensor(context).run_requests
    assert {(r.partition_key, tuple(k.path[-1] for k in r.asset_selection)) for r in requests} == {
        (m, ("float_reference",)) for m in MODELS
    }

    before = conversions(instance), quantizations(instance)
    summary = materialize(instance, edited, MODELS, RECIPES, jobs=2)
    assert summary.failures == 0
    assert conversions(instance) == before[0]  # no export
    assert {m: materializations(instance, "float_reference", m) for m in MODELS} == {"alpha": 3, "beta": 3}
    assert all(after > before[1][pair] for pair, after in quantizations(instance).items())
    manifests = published_versions(edited.store, "beta", "float")
    assert [m["evaluation_settings"]["eval_text_sha256"] for m in manifests[-2:]] == [
        file_sha256(Path(pipeline.eval_text)),
        file_sha256(eval_text),
    ]
    assert rebuild_plan(instance, edited, MODELS, RECIPES).empty


def test_automation_refreshes_the_report_after_an_evaluation_that_published_nothing(world, defs):
    """An evaluation that fails its gates materializes `evaluation` and records the failure, but publishes
    nothing: the daemon must still rebuild that model's report, which shows the failure."""
    instance, _, _ = world
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    result = defs.resolve_job_def("quantize_evaluate_publish").execute_in_process(
        partition_key=dg.MultiPartitionKey({"model": "beta", "recipe": "float"}),
        instance=instance,
        asset_selection=[dg.AssetKey("evaluation")],
    )
    assert result.success
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    assert after.get_requested_partitions(dg.AssetKey("quantization_report")) == {"beta"}
