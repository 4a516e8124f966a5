"""The rebuild plan on hand-made states: the earliest stage whose input changed."""

from edge_quant_pipeline.graph import MODEL_ASSETS
from edge_quant_pipeline.staleness import ModelState, RecipeState, plan_rebuild

FRESH_MODEL = ModelState(current_hash="c1", converted_hash="c1")
FRESH_RECIPE = RecipeState(current_hash="r1", resolved_hash="r1")
ALL_PUBLISHED = {(m, r) for m in ("m1", "m2") for r in ("a", "b")}


def plan(models=None, recipes=None, settled=ALL_PUBLISHED, rebuild_all=False):
    return plan_rebuild(
        {"m1": FRESH_MODEL, "m2": FRESH_MODEL, **(models or {})},
        {"a": FRESH_RECIPE, "b": FRESH_RECIPE, **(recipes or {})},
        settled,
        rebuild_all,
    )


def test_nothing_changed_plans_nothing():
    assert plan().empty


def test_an_edited_recipe_is_resolved_again_and_nothing_else():
    result = plan(
        recipes={"b": RecipeState(current_hash="r2", resolved_hash="r1")},
        settled=ALL_PUBLISHED - {("m1", "b"), ("m2", "b")},
    )
    assert (result.convert, result.resolve, result.quantize) == ({}, ["b"], [])
    assert result.affected_pairs(["m1", "m2"], ["a", "b"]) == [("m1", "b"), ("m2", "b")]


def test_new_checkpoint_bytes_or_exporter_convert_everything():
    for stale in (ModelState("c2", "c1"), ModelState("c1", "c1", changed_code=("checkpoint",))):
        assert plan(models={"m2": stale}).convert == {"m2": MODEL_ASSETS}


def test_a_toolchain_upgrade_or_new_export_settings_reconvert_without_rehashing():
    stale = ModelState("c1", "c1", changed_code=("float_tflite", "float_reference"))
    assert plan(models={"m2": stale}).convert == {"m2": ("float_tflite", "float_reference")}


def test_a_new_eval_text_rebuilds_the_reference_not_the_export_and_every_pair_of_the_model():
    result = plan(models={"m1": ModelState("c1", "c1", changed_code=("float_reference",))})
    assert result.convert == {"m1": ("float_reference",)}
    assert result.affected_pairs(["m1", "m2"], ["a", "b"]) == [("m1", "a"), ("m1", "b")]


def test_a_failed_pair_is_quantized_again_on_its_own():
    result = plan(settled=ALL_PUBLISHED - {("m1", "a")})
    assert (result.convert, result.resolve, result.quantize) == ({}, [], [("m1", "a")])


def test_rebuild_all():
    result = plan(rebuild_all=True)
    assert (result.convert, result.resolve) == ({"m1": MODEL_ASSETS, "m2": MODEL_ASSETS}, ["a", "b"])
