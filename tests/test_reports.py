"""The reports, the champion and the diff against the previous version, on the demo model's
real published artifacts (the golden build); changes are made to a copy of it."""

import base64
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pandas as pd
import pytest
from conftest import DEMO_MODEL, metadata, scramble_weights
from upath import UPath

from edge_quant_pipeline.config import pipeline_config_from_env
from edge_quant_pipeline.footprint import pair_never_fits, planned_model_size
from edge_quant_pipeline.publish.report import build_report, label_offsets, report_row, to_markdown
from edge_quant_pipeline.publish.store import (
    CHAMPION,
    FAILURE_RECORD,
    ArtifactInputs,
    latest_pointer,
    publish,
    published_versions,
    record_failure,
)
from edge_quant_pipeline.synthetic import SHAPES


@pytest.fixture
def copied(demo_sandbox):
    """A copy of the golden build; functions running on it the report, and the evaluation and publishing of one
    recipe (whose gate check they return)."""
    from edge_quant_pipeline.definitions import build_definitions

    instance, pipeline = demo_sandbox.instance, demo_sandbox.pipeline
    defs = build_definitions(pipeline)

    def report() -> dict:
        result = defs.resolve_job_def("report").execute_in_process(partition_key=DEMO_MODEL, instance=instance)
        assert result.success
        (materialization,) = result.asset_materializations_for_node("quantization_report")
        return {k: v.value for k, v in materialization.metadata.items()}

    def resolve(recipe: str) -> None:
        assert (
            defs.resolve_job_def("resolve_recipe").execute_in_process(partition_key=recipe, instance=instance).success
        )

    def evaluate_and_publish(recipe: str) -> dg.AssetCheckEvaluation:
        result = defs.resolve_job_def("quantize_evaluate_publish").execute_in_process(
            partition_key=dg.MultiPartitionKey({"model": DEMO_MODEL, "recipe": recipe}),
            instance=instance,
            raise_on_error=False,
            asset_selection=[dg.AssetKey("evaluation"), dg.AssetKey("published_artifact")],
        )
        (gate,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "quality_gates"]
        return gate

    return SimpleNamespace(
        store=pipeline.store,
        pipeline=pipeline,
        instance=instance,
        recipes=demo_sandbox.build.recipes,
        report=report,
        resolve=resolve,
        evaluate_and_publish=evaluate_and_publish,
    )


def inputs_of(manifest: dict) -> ArtifactInputs:
    return ArtifactInputs(
        manifest["model"],
        manifest["recipe"],
        manifest["checkpoint_sha256"],
        manifest["recipe_sha256"],
        manifest["toolchain"],
        manifest["exporter"],
        manifest["tokenizer_sha256"],
        manifest["export"],
        manifest["evaluation_settings"],
        manifest["gates"],
        manifest.get("calibration"),  # calibrated recipes only
    )


def rows(meta: dict) -> pd.DataFrame:
    return pd.read_parquet(meta["parquet"]).set_index("recipe")


def test_champion_is_the_smallest_published_recipe(golden, golden_instance):
    meta = metadata(golden_instance, "quantization_report", DEMO_MODEL)
    report = pd.read_parquet(meta["parquet"])
    smallest = report.loc[report["file_bytes"].idxmin()]
    assert list(report["champion"]) == [recipe == smallest["recipe"] for recipe in report["recipe"]]
    pointer = json.loads((golden.pipeline.store / DEMO_MODEL / CHAMPION).read_text())
    assert (pointer["recipe"], pointer["version"]) == (smallest["recipe"], smallest["version"])
    assert meta["champion"] == smallest["recipe"] and f"**Champion:** {smallest['recipe']} #1" in meta["report"]


def test_every_published_recipe_has_version_one_and_a_latest_pointer(golden):
    store = golden.pipeline.store
    for recipe in golden.recipes:
        (manifest,) = published_versions(store, DEMO_MODEL, recipe)
        assert manifest["number"] == 1 and manifest["previous_version"] is None
        assert latest_pointer(store, DEMO_MODEL, recipe)["version"] == manifest["version"]


def test_report_shows_a_size_vs_quality_plot(golden_instance):
    instance = golden_instance
    for meta in (metadata(instance, "quantization_report", DEMO_MODEL), metadata(instance, "all_models_report")):
        image = meta["size_vs_quality"]
        assert image.startswith("![size vs quality](data:image/png;base64,")
        png = base64.b64decode(image.split(",", 1)[1].rstrip(")"))
        assert png.startswith(b"\x89PNG") and png == UPath(meta["plot"]).read_bytes()


def test_a_champion_that_fails_its_gates_is_no_longer_published_nor_champion(copied):
    """A real gate failure of the champion's current version (its weights damaged, evaluated again): failed.json
    for that version beside its manifest. The report, latest.json and champion.json follow that evaluation, the
    version stays in the store, the pair is not retried with the same inputs, and passing again brings everything
    back."""
    from edge_quant_pipeline.rebuild import rebuild_plan

    champion = json.loads((copied.store / DEMO_MODEL / CHAMPION).read_text())
    recipe, folder = champion["recipe"], copied.store / DEMO_MODEL / champion["recipe"]
    partition = str(dg.MultiPartitionKey({"model": DEMO_MODEL, "recipe": recipe}))
    quantized = Path(metadata(copied.instance, "quantized_tflite", partition)["tflite"])
    original = quantized.read_bytes()
    quantized.write_bytes(scramble_weights(quantized, "feedforward"))
    try:
        assert not copied.evaluate_and_publish(recipe).passed
    finally:
        quantized.write_bytes(original)
    assert json.loads((folder / FAILURE_RECORD).read_text())["version"] == champion["version"]
    assert [m["version"] for m in published_versions(copied.store, DEMO_MODEL, recipe)] == [champion["version"]]
    assert latest_pointer(copied.store, DEMO_MODEL, recipe) is None
    assert rebuild_plan(copied.instance, copied.pipeline, [DEMO_MODEL]).empty

    runner_up = copied.report()
    assert rows(runner_up).loc[recipe, "status"] == "failed (quality gate)"
    assert runner_up["champion_changed"] and runner_up["champion"] not in ("", recipe)
    assert f"changed from {recipe} #1 ({champion['version']})" in runner_up["report"]
    assert json.loads((copied.store / DEMO_MODEL / CHAMPION).read_text())["recipe"] == runner_up["champion"]

    assert copied.evaluate_and_publish(recipe).passed  # the file as it was: the same version passes again
    assert not (folder / FAILURE_RECORD).exists()
    assert latest_pointer(copied.store, DEMO_MODEL, recipe)["version"] == champion["version"]
    back = copied.report()
    assert rows(back).loc[recipe, "status"] == "published"
    assert back["champion"] == recipe and f"changed from {runner_up['champion']} #1" in back["report"]
    assert json.loads((copied.store / DEMO_MODEL / CHAMPION).read_text())["version"] == champion["version"]
    assert not copied.report()["champion_changed"]


def test_a_recipe_whose_task_accuracy_drops_past_its_gate_is_not_published(copied):
    """The demo's int4 block-128 bundle answers the cloze task 5.8 points below the float model's bundle (0.923
    against 0.981 in LiteRT-LM, 4.2 points of standard error together): within the default 2 standard errors it
    is published; allowed 1, it fails its gate, is not published and says which task."""
    recipes = Path(copied.pipeline.recipes_file)
    recipes.write_text("gates: {max_task_drop_points: 5, task_drop_sigmas: 1}\n" + recipes.read_text())
    copied.resolve("dynamic_int4_block128")
    gate = copied.evaluate_and_publish("dynamic_int4_block128")
    assert not gate.passed
    assert gate.description == (
        "demo_cloze is 5.8 ± 4.2 points below float (fails max_task_drop_points 5 and 1 standard errors)"
    )
    assert rows(copied.report()).loc["dynamic_int4_block128", "status"] == "failed (quality gate)"


def test_no_champion_when_no_recipe_of_the_current_checkpoint_publishes(copied):
    """Every recipe's current version failed its latest evaluation (the records evaluation writes): champion.json
    goes rather than name an artifact that is not the current checkpoint's champion; the versions stay."""

    champion = json.loads((copied.store / DEMO_MODEL / CHAMPION).read_text())
    for recipe in copied.recipes:
        (manifest,) = published_versions(copied.store, DEMO_MODEL, recipe)  # the current checkpoint's
        record_failure(copied.store, inputs_of(manifest), "quality gate", "top1_agreement = 0.1")
    meta = copied.report()
    assert set(rows(meta)["status"]) == {"failed (quality gate)"}
    assert meta["champion"] == "" and meta["champion_changed"]
    assert (
        f"**Champion:** none, no recipe of this checkpoint is published; until now {champion['recipe']}"
        in (meta["report"])
    )
    assert not (copied.store / DEMO_MODEL / CHAMPION).exists()
    assert all(len(published_versions(copied.store, DEMO_MODEL, r)) == 1 for r in copied.recipes)
    assert not copied.report()["champion_changed"]


def test_report_shows_the_change_since_the_previous_version(copied):
    """fp16 republished after an older, larger and worse version of itself: number 2, with the diff."""
    store, report = copied.store, copied.report
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
    republished = publish(store, inputs_of(current), tflite, current["metrics"], {})
    assert republished.manifest["number"] == 2
    assert republished.manifest["delta"]["file_bytes"] == -1000
    assert latest_pointer(store, DEMO_MODEL, "fp16")["number"] == 2

    meta = report()
    row = pd.read_parquet(meta["parquet"]).set_index("recipe").loc["fp16"]
    assert row["number"] == 2 and row["previous_version"] != current["version"]
    assert row["delta_file_bytes"] == -1000 and row["delta_perplexity_ratio"] == pytest.approx(-0.01)
    assert "Since the previous version:" in meta["report"] and "| fp16 " in meta["report"].split("Since")[1]


def test_a_recipe_refused_for_memory_says_why_in_the_report(tmp_path, demo_checkpoint_dir):
    """`edge-quant run` refuses up front a (model, recipe) run this machine could never fit (Gemma 4 E2B's float
    recipes on 24 GB): the report says so in the recipe's row, from the checkpoint folder as the launcher plans, not
    "not run" alone. Here 70B parameters declared by a safetensors header over a sparse file: nothing is read."""
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({**SHAPES["qwen2.5-0.5b"], "torch_dtype": "bfloat16"}))
    count = 70_000_000_000
    header = json.dumps(
        {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [count], "data_offsets": [0, 2 * count]}}
    )
    with open(huge / "model.safetensors", "wb") as weights:
        weights.write(len(header).to_bytes(8, "little") + header.encode())
        weights.truncate(8 + len(header) + 2 * count)
    pipeline = pipeline_config_from_env()
    catalog = pipeline.recipe_catalog()
    recipe, need = catalog.recipes["dynamic_int8"], catalog.calibration_need
    reason = pair_never_fits(planned_model_size(huge, pipeline), recipe, need)
    assert reason.startswith("it needs about") and reason.endswith("Run it on a machine with more memory.")
    assert pair_never_fits(planned_model_size(demo_checkpoint_dir, pipeline), recipe, need) is None

    text = to_markdown(build_report([report_row("fp16", None, None, reason), report_row("int8", None, None)]))
    assert re.search(r"\| fp16 +\| refused \(memory\) +\|", text) and f"- **fp16**: not run: {reason}" in text
    assert re.search(r"\| int8 +\| not run +\|", text) and "**int8**" not in text


def test_metrics_with_a_standard_error_show_it_in_their_cell():
    row = {"recipe": "r", "status": "published", "file_bytes": 10, "mean_kl": 0.00032, "mean_kl_error": 0.00004}
    table = to_markdown(build_report([row]))
    assert "0.00032 ± 0.00004" in table and "mean_kl_error" not in table


def test_labels_of_recipes_of_about_the_same_size_and_quality_go_one_below_the_other():
    """Three int8 recipes a few kB and a few thousandths of perplexity apart; the float file at the right edge."""
    import numpy as np

    file_mb, ppl_ratio = np.array([10.0, 10.1, 10.05, 40.0, 20.0]), np.array([1.01, 1.011, 1.012, 1.0, 1.3])
    offsets = label_offsets(file_mb, ppl_ratio)
    assert [dy for _, dy in offsets[:3]] == [4.0, -6.0, -16.0]  # a line (10 points) apart
    assert offsets[3] == (-4.0, 4.0) and offsets[4] == (4.0, 4.0)  # the right edge's label to its left


def test_task_scores_show_their_error_and_their_change_from_float_in_points():
    """Each recipe's evaluation records the float model's scores it was gated against: the table shows them first,
    and each recipe's change from them (the float recipe's own bundle included)."""
    rows = [
        {"recipe": r, "status": "published", "file_bytes": size, "task_demo_cloze_acc": acc}
        | {"task_demo_cloze_acc_error": 0.05, "float_task_demo_cloze_acc": 0.6, "float_task_demo_cloze_acc_error": 0.05}
        for r, size, acc in (("float", 20, 0.6), ("dynamic_int4_block32", 10, 0.5))
    ]
    table = to_markdown(build_report(rows))
    assert "| (float model)        | 0.600 ± 0.050         |" in table
    assert "| float                | 0.600 ± 0.050 (+0.0)  |" in table
    assert "| dynamic_int4_block32 | 0.500 ± 0.050 (-10.0) |" in table


def test_the_all_models_report_of_models_without_reports_is_an_empty_table():
    # every model's report run failed (or none ran yet): the table has its columns and no row
    text = to_markdown(build_report([]).assign(model=None))
    assert text.startswith("| model   | recipe   | status") and "Not published" not in text
