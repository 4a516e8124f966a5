"""The reports, the champion and the diff against the previous version, on the demo model's
real published artifacts (the session run); changes are made to a copy of its store."""

import base64
import json
import shutil

import pandas as pd
import pytest
from conftest import DEMO_MODEL, metadata
from upath import UPath

from edge_quant_pipeline.publish import CHAMPION, ArtifactInputs, latest_pointer, publish, published_versions


@pytest.fixture
def copied_store(pipeline_run, tmp_path):
    """A pipeline whose artifact store is a copy of the session's, and a function running the report on it."""
    from edge_quant_pipeline.definitions import defs, pipeline_config_from_env
    from edge_quant_pipeline.defs.resources import ArtifactStore, PipelineConfig

    instance, _ = pipeline_run
    store = tmp_path / "store"
    shutil.copytree(pipeline_config_from_env().store.path, store)
    env = pipeline_config_from_env()
    pipeline = PipelineConfig(
        checkpoint_dir=env.checkpoint_dir, work_dir=env.work_dir, artifact_store=ArtifactStore(url=str(store))
    )

    def report() -> dict:
        result = defs.resolve_job_def("report").execute_in_process(
            partition_key=DEMO_MODEL, instance=instance, resources={"pipeline": pipeline}
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("quantization_report")
        return {k: v.value for k, v in materialization.metadata.items()}

    return UPath(store), report


def test_champion_is_the_smallest_published_recipe(pipeline_run):
    from edge_quant_pipeline.definitions import pipeline_config_from_env

    instance, _ = pipeline_run
    meta = metadata(instance, "quantization_report", DEMO_MODEL)
    report = pd.read_parquet(meta["parquet"])
    smallest = report.loc[report["file_bytes"].idxmin()]
    assert list(report["champion"]) == [recipe == smallest["recipe"] for recipe in report["recipe"]]
    pointer = json.loads((pipeline_config_from_env().store / DEMO_MODEL / CHAMPION).read_text())
    assert (pointer["recipe"], pointer["version"]) == (smallest["recipe"], smallest["version"])
    assert meta["champion"] == smallest["recipe"] and f"**Champion:** {smallest['recipe']} #1" in meta["report"]


def test_every_published_recipe_has_version_one_and_a_latest_pointer(pipeline_run):
    from edge_quant_pipeline.definitions import pipeline_config_from_env
    from edge_quant_pipeline.defs.partitions import recipe_catalog

    store = pipeline_config_from_env().store
    for recipe in recipe_catalog.names:
        (manifest,) = published_versions(store, DEMO_MODEL, recipe)
        assert manifest["number"] == 1 and manifest["previous_version"] is None
        assert latest_pointer(store, DEMO_MODEL, recipe)["version"] == manifest["version"]


def test_report_shows_a_size_vs_quality_plot(pipeline_run):
    instance, _ = pipeline_run
    for meta in (metadata(instance, "quantization_report", DEMO_MODEL), metadata(instance, "all_models_report")):
        image = meta["size_vs_quality"]
        assert image.startswith("![size vs quality](data:image/png;base64,")
        png = base64.b64decode(image.split(",", 1)[1].rstrip(")"))
        assert png.startswith(b"\x89PNG") and png == UPath(meta["plot"]).read_bytes()


def test_report_says_when_the_champion_changes(copied_store):
    store, report = copied_store
    champion = json.loads((store / DEMO_MODEL / CHAMPION).read_text())
    versions = store / DEMO_MODEL / champion["recipe"]
    hidden = store.parent / "hidden"
    shutil.move(versions.path, hidden.path)  # as if the champion recipe had failed its gates
    runner_up = report()
    assert runner_up["champion_changed"] and runner_up["champion"] != champion["recipe"]
    assert f"changed from {champion['recipe']} #1 ({champion['version']})" in runner_up["report"]

    shutil.move(hidden.path, versions.path)
    back = report()
    assert back["champion"] == champion["recipe"] and f"changed from {runner_up['champion']} #1" in back["report"]
    assert json.loads((store / DEMO_MODEL / CHAMPION).read_text())["version"] == champion["version"]
    assert not report()["champion_changed"]


def test_report_shows_the_change_since_the_previous_version(copied_store):
    """fp16 republished after an older, larger and worse version of itself: number 2, with the diff."""
    store, report = copied_store
    (current,) = published_versions(store, DEMO_MODEL, "fp16")
    folder = store / DEMO_MODEL / "fp16" / current["version"]
    tflite = store.parent / "fp16.tflite"
    shutil.move((folder / "model.tflite").path, tflite.path)
    shutil.rmtree(folder.path)
    old = {
        **current["metrics"],
        "file_bytes": current["metrics"]["file_bytes"] + 1000,
        "perplexity_ratio": current["metrics"]["perplexity_ratio"] + 0.01,
    }
    publish(store, ArtifactInputs(DEMO_MODEL, "fp16", "an older checkpoint", "r", {}), tflite, old, {})
    inputs = ArtifactInputs(
        DEMO_MODEL, "fp16", current["checkpoint_sha256"], current["recipe_sha256"], current["toolchain"]
    )
    republished = publish(store, inputs, tflite, current["metrics"], {})
    assert republished.manifest["number"] == 2
    assert republished.manifest["delta"]["file_bytes"] == -1000
    assert latest_pointer(store, DEMO_MODEL, "fp16")["number"] == 2

    meta = report()
    row = pd.read_parquet(meta["parquet"]).set_index("recipe").loc["fp16"]
    assert row["number"] == 2 and row["previous_version"] != current["version"]
    assert row["delta_file_bytes"] == -1000 and row["delta_perplexity_ratio"] == pytest.approx(-0.01)
    assert "Since the previous version:" in meta["report"] and "| fp16 " in meta["report"].split("Since")[1]
