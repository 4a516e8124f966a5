"""The recipe language on real converted models: every scheme, per-block maps,
model-dependent validation, and conformance read back from the .tflite."""

import pytest

from edge_quant_pipeline.checkpoints import architecture_of, load_float_model, read_checkpoint
from edge_quant_pipeline.conformance import check_conformance, stored_as
from edge_quant_pipeline.convert import ExportSettings, export_float_tflite, quantize_tflite
from edge_quant_pipeline.recipes import SCHEMES, RecipeError, ai_edge_quantizer_recipe, parse_recipe, validate_for_model
from edge_quant_pipeline.weights import read_weights


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_checkpoint_dir):
    """The demo model exported once; tests quantize it with their own recipes."""
    checkpoint = read_checkpoint(demo_checkpoint_dir)
    architecture = architecture_of(checkpoint)
    model = load_float_model(checkpoint, ExportSettings.kv_cache_len)
    float_tflite = export_float_tflite(
        model, architecture.model_config, ExportSettings(), tmp_path_factory.mktemp("conformance") / "float.tflite"
    )
    return architecture, float_tflite


def quantize(demo, recipe, tmp_path):
    architecture, float_tflite = demo
    validate_for_model(recipe, architecture.shape)
    output = quantize_tflite(
        float_tflite, ai_edge_quantizer_recipe(recipe, architecture.tied_lm_head), tmp_path / f"{recipe.name}.tflite"
    )
    return check_conformance(recipe, read_weights(output), architecture.shape)


FITTING_SCHEMES = [s for s in SCHEMES if s != "int4_dynamic_block256"]  # 256 does not divide hidden=128


@pytest.mark.parametrize("scheme", FITTING_SCHEMES)
def test_every_scheme_as_default_is_what_the_file_holds(demo, tmp_path, scheme):
    rows = quantize(demo, parse_recipe("r", {"default": scheme}, "test"), tmp_path)
    assert len(rows) == 1 + 4 + 4 + 1  # embedding, 4 attention, 4 feed-forward, lm head
    assert all(row.ok for row in rows), [r for r in rows if not r.ok]
    assert {row.actual for row in rows} == {stored_as(scheme)}


def test_per_block_and_per_component_schemes(demo, tmp_path):
    recipe = parse_recipe(
        "mixed",
        {
            "default": "int8_dynamic",
            "embedding": "fp16",
            "attention": {0: "int4_dynamic_block32", 3: "int8_weight_only"},
            "feedforward": {1: "int4_dynamic_block128", 2: "fp16"},
        },
        "test",
    )
    rows = {(r.component, r.block): r for r in quantize(demo, recipe, tmp_path)}
    assert all(r.ok for r in rows.values()), [r for r in rows.values() if not r.ok]
    assert rows[("attention", 0)].actual == ("INT4", "blockwise_32", "integer")
    assert rows[("attention", 1)].actual == ("INT8", "channelwise", "integer")  # default
    assert rows[("attention", 3)].actual == ("INT8", "channelwise", "float")
    assert rows[("feedforward", 1)].actual == ("INT4", "blockwise_128", "integer")
    assert rows[("feedforward", 2)].actual == ("FLOAT16", "none", "float")
    assert rows[("embedding", None)].actual == rows[("lm_head", None)].actual == ("FLOAT16", "none", "float")


def test_conformance_catches_a_model_that_does_not_follow_its_recipe(demo, tmp_path):
    int8 = parse_recipe("int8", {"default": "int8_dynamic"}, "test")
    architecture, float_tflite = demo
    claimed = parse_recipe("claimed", {"default": "int8_dynamic", "feedforward": "fp16"}, "test")
    output = quantize_tflite(
        float_tflite, ai_edge_quantizer_recipe(int8, architecture.tied_lm_head), tmp_path / "x.tflite"
    )
    failing = [r for r in check_conformance(claimed, read_weights(output), architecture.shape) if not r.ok]
    assert {(r.component, r.block) for r in failing} == {("feedforward", b) for b in range(4)}
    assert failing[0].expected == ("FLOAT16", "none", "float") and failing[0].actual[0] == "INT8"


def test_upstream_translation_alone_ignores_selective_rules(demo, tmp_path):
    """Why our translation scopes its rules itself: litert-torch 0.10's scopes miss its op names."""
    from ai_edge_quantizer import quantizer
    from upstream_recipes import upstream_rules

    architecture, float_tflite = demo
    recipe = parse_recipe("sel", {"default": "fp16", "feedforward": "int8_dynamic"}, "test")
    rules = upstream_rules(recipe, architecture.model_config, retargeted=False)
    output = tmp_path / "upstream.tflite"
    output.write_bytes(bytes(quantizer.Quantizer(float_tflite.read_bytes(), rules).quantize().quantized_model))
    feedforward = {
        r.actual
        for r in check_conformance(recipe, read_weights(output), architecture.shape)
        if r.component == "feedforward"
    }
    assert feedforward == {("FLOAT16", "none", "float")}  # the default, not the int8 the recipe asked for


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"default": "fp16", "attention": {4: "int8_dynamic"}},
            "field 'attention': block index 4 is outside the model, which has 4 blocks (allowed indices: 0-3)",
        ),
        (
            {"default": "int4_dynamic_block256"},
            "field 'default': int4_dynamic_block256 needs the embedding weights' input size divisible by 256, but this "
            "model's is 128. int4 schemes that fit: int4_dynamic_block32, int4_dynamic_block64, int4_dynamic_block128",
        ),
        (
            {"default": "fp16", "feedforward": {2: "int4_dynamic_block256"}},
            "field 'feedforward.2': int4_dynamic_block256 needs the feedforward weights' input size divisible by 256",
        ),
    ],
)
def test_model_dependent_validation_names_field_value_and_allowed(demo, body, message):
    architecture, _ = demo
    with pytest.raises(RecipeError, match="recipe 'bad'") as error:
        validate_for_model(parse_recipe("bad", body, "test"), architecture.shape)
    assert message in str(error.value)
