"""Recipe catalog: parsing, validation messages, canonical hashing, translation to ai-edge-quantizer."""

import json
from pathlib import Path

import pytest

from edge_quant_pipeline.quantize.catalog import CalibrationNeed, load_catalog
from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES, RecipeError, parse_recipe
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe

REPO = Path(__file__).parent.parent


def test_catalog_has_builtins_and_the_selective_example():
    catalog = load_catalog(REPO / "recipes.yaml")
    assert list(BUILTIN_RECIPES) == [
        "float",
        "dynamic_int8",
        "weight_only_int8",
        "fp16",
        "dynamic_int4_block32",
        "dynamic_int4_block128",
    ]
    selective = catalog.get("selective_fp16_int8")
    assert selective.spec() == {
        "default": "fp16",
        "embedding": "int8_dynamic",
        "attention": "int8_weight_only",
        "feedforward": "int8_dynamic",
    }
    assert catalog.errors == {}


@pytest.mark.parametrize(
    "added, need",
    [
        ("", CalibrationNeed.NONE),  # the shipped catalog: calibration runs nothing
        ("  s: {default: int8_static_a16, embedding: int8_dynamic}\n", CalibrationNeed.RANGES),
        ("  g: {default: int4_dynamic_block32+gptq, embedding: int8_dynamic}\n", CalibrationNeed.HESSIANS),
        ("  b: {search: {max_mean_kl: 0.01, schemes: [int8_dynamic, int4_dynamic+gptq]}}\n", CalibrationNeed.HESSIANS),
        ("  broken: {default: int8_static_a16, attention: nonsense}\n", CalibrationNeed.NONE),  # fails alone
    ],
)
def test_calibration_computes_what_the_catalogs_recipes_need(tmp_path, added, need):
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text((REPO / "recipes.yaml").read_text() + added)
    assert load_catalog(recipes).calibration_need is need


def test_hash_depends_on_spec_only():
    a = parse_recipe("a", {"default": "fp16", "attention": {1: "int8_dynamic", 0: "fp16"}}, "x.yaml")
    b = parse_recipe("b", {"attention": {0: "fp16", 1: "int8_dynamic"}, "default": "fp16", "description": "d"}, "y")
    c = parse_recipe("c", {"default": "fp16", "attention": {0: "fp16", 1: "int8_weight_only"}}, "x.yaml")
    assert a.spec_hash == b.spec_hash != c.spec_hash


@pytest.mark.parametrize(
    "body, message",
    [
        ({"defualt": "fp16"}, "unknown key(s) defualt. Allowed keys: description, gates, default"),
        ({"default": "int3"}, "field 'default': unknown scheme 'int3'. Allowed schemes: int8_dynamic"),
        ({"embedding": {0: "fp16"}}, "per-block map is only allowed for attention and feedforward"),
        ({"attention": {"first": "fp16"}}, "block index 'first' is not a non-negative integer"),
        ({"feedforward": {2: "int9"}}, "field 'feedforward.2': unknown scheme 'int9'"),
        ({"description": "nothing"}, "sets no scheme"),
    ],
)
def test_validation_names_recipe_field_and_allowed_values(body, message):
    with pytest.raises(RecipeError, match="recipe 'bad'") as error:
        parse_recipe("bad", body, "recipes.yaml")
    assert message in str(error.value)


def test_a_bad_recipe_fails_alone(tmp_path):
    path = tmp_path / "recipes.yaml"
    path.write_text("recipes:\n  good: {default: fp16}\n  bad: {default: int3}\n  fp16: {default: fp16}\n")
    catalog = load_catalog(path)
    assert "good" in catalog.recipes
    assert set(catalog.errors) == {"bad", "fp16"}
    assert catalog.names == [*BUILTIN_RECIPES, "good", "bad"]
    with pytest.raises(RecipeError, match="unknown scheme 'int3'"):
        catalog.get("bad")
    with pytest.raises(RecipeError, match="built in"):
        catalog.get("fp16")


@pytest.fixture(scope="module")
def tiny_model_config():
    from edge_quant_pipeline.export.architectures import architecture_for
    from edge_quant_pipeline.settings import DEMO_CHECKPOINT_DIR

    config = DEMO_CHECKPOINT_DIR / "tiny-llama-bytes" / "config.json"
    return architecture_for(json.loads(config.read_text()), config).model_config


PER_BLOCK = {
    "default": "fp16",
    "attention": {3: "int8_weight_only", 0: "int4_dynamic_block32"},
    "feedforward": "int8_dynamic",
}


@pytest.mark.parametrize(
    "recipe",
    [*load_catalog(REPO / "recipes.yaml").recipes.values(), parse_recipe("per_block", PER_BLOCK, "test")],
    ids=lambda r: r.name,
)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_rules_are_litert_torchs_with_todays_op_names(tiny_model_config, recipe, tied):
    """Our translation writes what litert-torch's translate_recipe writes, scopes retargeted."""
    from dataclasses import replace

    from upstream_recipes import upstream_rules

    model_config = replace(tiny_model_config, lm_head_share_weight_with_embedding=tied)
    expected = [] if recipe.is_float else upstream_rules(recipe, model_config)
    assert ai_edge_quantizer_recipe(recipe, tied) == expected


def test_upstream_scopes_all_have_a_retarget():
    """A litert-torch upgrade that writes a new scope fails here, not silently in a recipe."""
    from upstream_recipes import retarget_scope

    assert retarget_scope("StatefulPartitionedCall") == "logits_output|Linear_lm_head"
    assert retarget_scope(r"transformer_blocks\[3\]/litert_torch.generative.layers.feed_forward") == (
        r"(?:TransformerBlock|Gemma2Block|DecoderBlock|DecoderLayer)_3/"
        r"(?:litert_torch\.generative\.layers\.feed_forward\.|[\w.]*MLP_mlp)"
    )
    with pytest.raises(AssertionError, match="does not know"):
        retarget_scope("some_new_layer_name")


def test_editing_recipes_yaml_touches_only_the_edited_recipes(tmp_path):
    """What a code-location reload sees: new partitions appear, untouched recipes keep their version."""
    path = tmp_path / "recipes.yaml"
    path.write_text((REPO / "recipes.yaml").read_text())
    before = load_catalog(path)
    path.write_text(
        path.read_text().replace("attention: int8_weight_only", "attention: fp16")
        + "  ffn_int4:\n    default: int8_dynamic\n    feedforward: {0: int4_dynamic_block32}\n"
    )
    after = load_catalog(path)
    assert after.names == before.names + ["ffn_int4"]
    changed = {n for n in before.names if before.get(n).spec_hash != after.get(n).spec_hash}
    assert changed == {"selective_fp16_int8"}


def test_gates_default_then_file_then_recipe(tmp_path):
    from edge_quant_pipeline.gates import DEFAULT_GATES

    path = tmp_path / "recipes.yaml"
    path.write_text(
        "gates: {min_top1_agreement: 0.9}\n"
        "recipes:\n  strict: {default: fp16, gates: {max_perplexity_ratio: 1.01}}\n"
        "  typo: {default: fp16, gates: {max_perplexity: 1.01}}\n"
    )
    catalog = load_catalog(path)
    assert catalog.get("fp16").gates == {**DEFAULT_GATES, "min_top1_agreement": 0.9}
    assert catalog.get("strict").gates == {**DEFAULT_GATES, "min_top1_agreement": 0.9, "max_perplexity_ratio": 1.01}
    with pytest.raises(RecipeError, match="unknown gate.s. max_perplexity; allowed gates: max_perplexity_ratio"):
        catalog.get("typo")
    assert catalog.get("fp16").spec_hash == BUILTIN_RECIPES["fp16"].spec_hash  # gates do not change the model


def test_gate_results_read_as_sentences():
    from edge_quant_pipeline.gates import check_gates

    results = check_gates(
        {"perplexity_ratio": 1.2, "top1_agreement": 0.95}, {"max_perplexity_ratio": 1.1, "min_top1_agreement": 0.9}
    )
    assert [r.passed for r in results] == [False, True]
    assert str(results[0]) == "perplexity_ratio = 1.2 (fails max_perplexity_ratio 1.1)"


def test_a_significance_gate_fails_only_differences_beyond_the_noise():
    """KL 0.012 ± 0.001 over a 0.010 threshold is 2 standard errors past it: refused when 1.5 are allowed, kept
    when 3 are; without the setting the value alone decides, as before."""
    from edge_quant_pipeline.gates import check_gates

    metrics = {"mean_kl": 0.012, "mean_kl_error": 0.001, "top1_agreement": 0.85, "top1_agreement_error": 0.02}
    plain = check_gates(metrics, {"max_mean_kl": 0.010, "min_top1_agreement": 0.88})
    loose = check_gates(metrics, {"max_mean_kl": 0.010, "min_top1_agreement": 0.88, "significance_sigmas": 3})
    tight = check_gates(metrics, {"max_mean_kl": 0.010, "significance_sigmas": 1.5})
    assert [r.passed for r in plain] == [False, False]
    assert [r.passed for r in loose] == [True, True]
    assert [r.passed for r in tight] == [False]
    assert str(tight[0]) == ("mean_kl = 0.012 ± 0.001 (fails max_mean_kl 0.01, by more than 1.5 standard errors)")


def test_a_task_gate_fails_a_drop_past_its_points_and_past_the_noise():
    """cloze 0.90 ± 0.02 for float and 0.80 ± 0.02 for the recipe: a drop of 10 points, 2.8 points of error. It
    fails 5 points with 2 standard errors; it passes 5 points when 4 standard errors are asked (the noise could
    make it), and 12 points for that task alone; a task float was not scored on is not gated."""
    from edge_quant_pipeline.evaluate.tasks import TaskScore
    from edge_quant_pipeline.gates import GateConfigError, check_task_gates, parse_gates

    recipe = [TaskScore("cloze", "acc", 0.80, 0.02, 400), TaskScore("other", "acc", 0.1, 0.01, 400)]
    float_model = [TaskScore("cloze", "acc", 0.90, 0.02, 400)]

    def passed(gates: dict) -> list[bool]:
        return [r.passed for r in check_task_gates(recipe, float_model, parse_gates("recipe 'x'", gates))]

    assert passed({"max_task_drop_points": 5, "task_drop_sigmas": 2}) == [False]
    assert passed({"max_task_drop_points": 5, "task_drop_sigmas": 4}) == [True]
    assert passed({"max_task_drop_points": 5, "max_task_drop_points.cloze": 12, "task_drop_sigmas": 2}) == [True]
    assert passed({}) == []
    (result,) = check_task_gates(recipe, float_model, {"max_task_drop_points": 5, "task_drop_sigmas": 2})
    assert str(result) == "cloze is 10.0 ± 2.8 points below float (fails max_task_drop_points 5 and 2 standard errors)"
    for typo in ("max_task_drop", "max_task_drop_points.<task>", "max_task_drop_points."):
        with pytest.raises(GateConfigError, match="unknown gate"):
            parse_gates("recipe 'x'", {typo: 5})


def test_long_generations_are_scored_for_collapse_and_gated_against_floats():
    """A generation that loops (the same 4 tokens again and again) repeats most of its 4-grams and has few distinct
    tokens; a healthy one neither. A recipe looping where float does not fails; the same loop in float's own
    generations (as the demo model's greedy ones do) is no reason to fail it."""
    from edge_quant_pipeline.evaluate.health import generation_health
    from edge_quant_pipeline.gates import check_health_gates

    healthy = generation_health([list(range(40)), list(range(100, 140))], [40, 40], 40)
    looping = generation_health([[1, 2, 3, 4] * 10, [5, 6, 7, 8] * 5], [40, 20], 40)
    assert (healthy.repeated_ngram_share, healthy.distinct_token_ratio, healthy.early_stops) == (0.0, 1.0, 0.0)
    assert looping.repeated_ngram_share == pytest.approx((33 / 37 + 13 / 17) / 2)
    assert looping.distinct_token_ratio == pytest.approx(0.15) and (looping.early_stops, looping.mean_tokens) == (
        0.5,
        30,
    )
    gates = {"max_repetition_increase": 0.3, "max_distinct_drop": 0.3, "max_early_stop_increase": 0.5}
    assert [g.passed for g in check_health_gates(looping, healthy, gates)] == [False, False, True]
    assert all(g.passed for g in check_health_gates(looping, looping, gates))
    assert check_health_gates(looping, None, gates) == []  # float not run: not gated
    (repetition, *_) = check_health_gates(looping, healthy, gates)
    assert str(repetition) == "repeated_ngram_share = 0.828 against float's 0.000 (fails max_repetition_increase 0.3)"
