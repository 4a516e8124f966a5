"""The recipe language on real converted models: per-block maps, model-dependent validation, and conformance read
back from the .tflite (every scheme and algorithm alone: tests/test_schemes.py)."""

import pytest

from edge_quant_pipeline.quantize.apply import quantize_tflite
from edge_quant_pipeline.quantize.calibration import quantizer_calibration
from edge_quant_pipeline.quantize.conformance import Storage, check_conformance
from edge_quant_pipeline.quantize.recipes import RecipeError, parse_recipe
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe, validate_for_model
from edge_quant_pipeline.weights import read_weights


def quantize(demo_export, recipe, tmp_path):
    architecture, float_tflite = demo_export
    validate_for_model(recipe, architecture.shape)
    output = quantize_tflite(
        float_tflite, ai_edge_quantizer_recipe(recipe, architecture.tied_lm_head), tmp_path / f"{recipe.name}.tflite"
    )
    return check_conformance(recipe, read_weights(output), architecture.shape)


def test_per_block_and_per_component_schemes(demo_export, tmp_path):
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
    rows = {(r.component, r.block): r for r in quantize(demo_export, recipe, tmp_path)}
    assert all(r.ok for r in rows.values()), [r for r in rows.values() if not r.ok]
    assert rows[("attention", 0)].actual == Storage("INT4", "blockwise_32", "integer")
    assert rows[("attention", 1)].actual == Storage("INT8", "channelwise", "integer")  # default
    assert rows[("attention", 3)].actual == Storage("INT8", "channelwise", "float")
    assert rows[("feedforward", 1)].actual == Storage("INT4", "blockwise_128", "integer")
    assert rows[("feedforward", 2)].actual == Storage("FLOAT16", "none", "float")
    assert rows[("embedding", None)].actual == rows[("lm_head", None)].actual == Storage("FLOAT16", "none", "float")


def test_algorithms_and_static_schemes_per_block_are_what_the_file_holds(demo_export, demo_calibration, tmp_path):
    """GPTQ, a Hadamard rotation and static int16 activations, each on its own blocks, beside the default: the
    file shows the rotation and the static activations where they were asked for, and nowhere else."""
    architecture, float_tflite = demo_export
    recipe = parse_recipe(
        "algorithms",
        {
            "default": "int8_dynamic",
            "attention": {0: "int4_dynamic_block32+gptq", 1: "int4_dynamic+hadamard"},
            "feedforward": {2: "int8_static_a16", 3: "int4_dynamic+octav"},
        },
        "test",
    )
    statistics = quantizer_calibration(demo_calibration, float_tflite, recipe.needs_hessians)
    output = quantize_tflite(
        float_tflite, ai_edge_quantizer_recipe(recipe, architecture.tied_lm_head), tmp_path / "x.tflite", statistics
    )
    rows = {(r.component, r.block): r for r in check_conformance(recipe, read_weights(output), architecture.shape)}
    assert all(r.ok for r in rows.values()), [r for r in rows.values() if not r.ok]
    assert rows[("attention", 0)].actual == Storage("INT4", "blockwise_32", "integer")
    assert rows[("attention", 1)].actual == Storage("INT4", "channelwise", "integer", "hadamard")
    assert rows[("feedforward", 2)].actual == Storage("INT8", "channelwise", "static a16")
    assert rows[("attention", 2)].actual == Storage("INT8", "channelwise", "integer")
    # a claim the file does not bear out fails: the rotation where none was asked, static where dynamic was
    claimed = parse_recipe("claimed", {"default": "int8_dynamic", "attention": {1: "int4_dynamic"}}, "test")
    failing = [r for r in check_conformance(claimed, read_weights(output), architecture.shape) if not r.ok]
    assert {(r.component, r.block) for r in failing} >= {("attention", 1), ("feedforward", 2)}


def test_conformance_catches_a_model_that_does_not_follow_its_recipe(demo_export, tmp_path):
    int8 = parse_recipe("int8", {"default": "int8_dynamic"}, "test")
    architecture, float_tflite = demo_export
    claimed = parse_recipe("claimed", {"default": "int8_dynamic", "feedforward": "fp16"}, "test")
    output = quantize_tflite(
        float_tflite, ai_edge_quantizer_recipe(int8, architecture.tied_lm_head), tmp_path / "x.tflite"
    )
    failing = [r for r in check_conformance(claimed, read_weights(output), architecture.shape) if not r.ok]
    assert {(r.component, r.block) for r in failing} == {("feedforward", b) for b in range(4)}
    assert failing[0].expected == Storage("FLOAT16", "none", "float") and failing[0].actual.dtype == "INT8"


def test_upstream_translation_alone_ignores_selective_rules(demo_export, tmp_path):
    """Why our translation scopes its rules itself: litert-torch 0.10's scopes miss its op names."""
    from ai_edge_quantizer import quantizer
    from upstream_recipes import upstream_rules

    architecture, float_tflite = demo_export
    recipe = parse_recipe("sel", {"default": "fp16", "feedforward": "int8_dynamic"}, "test")
    rules = upstream_rules(recipe, architecture.model_config, retargeted=False)
    output = tmp_path / "upstream.tflite"
    output.write_bytes(bytes(quantizer.Quantizer(float_tflite.read_bytes(), rules).quantize().quantized_model))
    feedforward = {
        r.actual
        for r in check_conformance(recipe, read_weights(output), architecture.shape)
        if r.component == "feedforward"
    }
    assert feedforward == {Storage("FLOAT16", "none", "float")}  # the default, not the int8 the recipe asked for


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
            "model's is 128. Blockwise schemes that fit: int4_dynamic_block32, int4_dynamic_block64, "
            "int4_dynamic_block128; or use a per-channel scheme.",
        ),
        (
            {"default": "fp16", "feedforward": {2: "int4_dynamic_block256"}},
            "field 'feedforward.2': int4_dynamic_block256 needs the feedforward weights' input size divisible by 256",
        ),
    ],
)
def test_model_dependent_validation_names_field_value_and_allowed(demo_export, body, message):
    architecture, _ = demo_export
    with pytest.raises(RecipeError, match="recipe 'bad'") as error:
        validate_for_model(parse_recipe("bad", body, "test"), architecture.shape)
    assert message in str(error.value)
