"""Every scheme and algorithm on both ops that hold weights, for real on the demo model. What the recipe language
accepts quantizes, holds what it asked for (conformance) and runs in LiteRT; what it refuses, ai-edge-quantizer or
the runtime really refuse (they raise, write something else, or cannot prepare the file). An upgrade that changes
either side fails here, naming the combination."""

import math
import re

import numpy as np
import pytest

from edge_quant_pipeline.quantize.apply import quantize_tflite
from edge_quant_pipeline.quantize.calibration import quantizer_calibration
from edge_quant_pipeline.quantize.conformance import check_conformance, stored_as
from edge_quant_pipeline.quantize.recipes import RecipeError, parse_recipe
from edge_quant_pipeline.quantize.schemes import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    NOT_OFFERED,
    SCHEMES,
    Op,
    Quantization,
    refusal,
)
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe
from edge_quant_pipeline.runtime.session import InterpreterSession, RuntimeRejectedError
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.weights import read_weights

pytestmark = pytest.mark.matrix

COMBINATIONS = [
    (scheme, algorithm, op)
    for scheme, definition in SCHEMES.items()
    for algorithm in ([DEFAULT_ALGORITHM] if definition.is_float else ALGORITHMS)
    for op in Op
    if not (definition.block_size == 256)  # 256 does not divide the demo's hidden size of 128
]
# The fields that put a choice on one op: the layers of every block, or the embedding (and its tied LM head).
FIELDS = {Op.FULLY_CONNECTED: ("attention", "feedforward"), Op.EMBEDDING_LOOKUP: ("embedding",)}
COMPONENTS = {Op.FULLY_CONNECTED: {"attention", "feedforward"}, Op.EMBEDDING_LOOKUP: {"embedding", "lm_head"}}


def runs(tflite) -> bool:
    """Prefill and decode in LiteRT, with finite logits."""
    try:
        with InterpreterSession(tflite, ExportSettings(), 2) as session:
            logits = session.score(np.arange(40, 40 + 40, dtype=np.int32))
    except RuntimeRejectedError:
        return False
    return bool(np.isfinite(logits).all())


@pytest.mark.parametrize("scheme, algorithm, op", COMBINATIONS, ids=lambda v: getattr(v, "value", v))
def test_what_is_accepted_works_and_what_is_refused_fails_for_real(
    demo_export, demo_calibration, tmp_path, scheme, algorithm, op
):
    architecture, float_tflite = demo_export
    quantization = Quantization(scheme, algorithm)
    output = tmp_path / "model.tflite"
    if refusal(quantization, op) is None:
        recipe = parse_recipe("r", dict.fromkeys(FIELDS[op], quantization.name), "test")
        calibration = (
            quantizer_calibration(demo_calibration, float_tflite, recipe.needs_hessians)
            if recipe.needs_calibration
            else None
        )
        quantize_tflite(float_tflite, ai_edge_quantizer_recipe(recipe, architecture.tied_lm_head), output, calibration)
        rows = check_conformance(recipe, read_weights(output), architecture.shape)
        assert all(r.ok for r in rows), [
            (r.component, r.block, str(r.expected), str(r.actual)) for r in rows if not r.ok
        ]
        assert runs(output)
        return
    # Refused: ai-edge-quantizer raises, or writes something other than what was asked, or LiteRT cannot run it.
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    try:
        manager = recipe_manager.RecipeManager()
        manager.add_quantization_config(
            ".*", qtyping.TFLOperationName(op.value), quantization.op_config(), quantization.algorithm_key
        )
        result = quantizer.Quantizer(float_tflite, manager.get_quantization_recipe())
        calibration = quantizer_calibration(demo_calibration, float_tflite, True) if result.need_calibration else None
        output.write_bytes(bytes(result.quantize(calibration, enable_progress_report=False).quantized_model))
    except (ValueError, RuntimeError, TypeError):
        return
    held = {(w.dtype, w.granularity, w.compute) for w in read_weights(output) if w.component in COMPONENTS[op]}
    if held != {tuple(stored_as(scheme))[:3]} or not runs(output):
        return
    pytest.fail(
        f"ai-edge-quantizer and LiteRT now take {quantization.name} on {op.value}: lift the refusal in schemes.py"
    )


@pytest.mark.parametrize("name", ["int8_dynamic_block32", "int4_weight_only_block32", "int2_dynamic_block32"])
def test_schemes_not_offered_fail_for_real_and_say_why(demo_export, tmp_path, name):
    """What a user might reach for and the toolchain does not do: the name is refused with the reason, and the
    reason holds (the policy refuses it, or the runtime cannot prepare what ai-edge-quantizer writes)."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    with pytest.raises(RecipeError, match=re.escape(f"unknown scheme '{name}' ({NOT_OFFERED[name]})")):
        parse_recipe("r", {"default": name}, "test")
    bits, granularity, weight_only = {
        "int8_dynamic_block32": (8, "BLOCKWISE_32", False),
        "int4_weight_only_block32": (4, "BLOCKWISE_32", True),
        "int2_dynamic_block32": (2, "BLOCKWISE_32", False),
    }[name]
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(
            num_bits=bits, symmetric=True, granularity=qtyping.QuantGranularity[granularity]
        ),
        compute_precision=qtyping.ComputePrecision.FLOAT if weight_only else qtyping.ComputePrecision.INTEGER,
        explicit_dequantize=weight_only,
    )
    manager = recipe_manager.RecipeManager()
    try:
        manager.add_quantization_config(".*", qtyping.TFLOperationName.FULLY_CONNECTED, config)
    except ValueError as error:
        assert "Unsupported op" in str(error)
        return
    output = tmp_path / "model.tflite"
    recipe = manager.get_quantization_recipe()
    output.write_bytes(bytes(quantizer.Quantizer(demo_export[1], recipe).quantize().quantized_model))
    assert not runs(output)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"default": "int4_dynamic_block32+gptq"},
            "field 'default': int4_dynamic_block32+gptq on the embedding (EMBEDDING_LOOKUP): ai-edge-quantizer's "
            "gptq algorithm does not handle EMBEDDING_LOOKUP; give the embedding its own scheme, for example "
            "embedding: int8_dynamic.",
        ),
        (
            {"default": "int8_dynamic", "embedding": "int8_static_a8"},
            "field 'embedding': int8_static_a8 on the embedding (EMBEDDING_LOOKUP): ai-edge-quantizer's policy does "
            "not allow it for EMBEDDING_LOOKUP.",
        ),
        (
            {"feedforward": {1: "int4_dynamic_block64+mse"}},
            "field 'feedforward.1': int4_dynamic_block64+mse on the fully-connected layers (FULLY_CONNECTED): "
            "ai-edge-quantizer refuses it: its MSE algorithm supports int8 and int4 per channel only.",
        ),
        (
            {"attention": "int8_weight_only+hadamard"},
            "its Hadamard rotation supports dynamic schemes only",
        ),
        ({"default": "int4_dynamic+gtpq"}, "unknown algorithm 'gtpq' in 'int4_dynamic+gtpq'. Algorithms: min_max,"),
        ({"default": "fp16+gptq"}, "fp16 casts weights to float16; it takes no algorithm (got 'fp16+gptq')."),
        ({"default": "int8_dynamic", "search": {"max_mean_kl": 0.01}}, "'search' chooses every component's scheme"),
        ({"search": {"max_mean_kl": 0.01, "max_perplexity_ratio": 1.1, "schemes": ["int8_dynamic"]}}, "exactly one"),
        ({"search": {"max_perplexity_ratio": 0.9, "schemes": ["int8_dynamic"]}}, "must be a number above 1"),
        ({"search": {"max_mean_kl": 0.01, "schemes": []}}, "'schemes' must list the candidate schemes"),
        (
            {"search": {"max_mean_kl": 0.01, "schemes": ["int8_static_a8"]}},
            "none of int8_static_a8 applies to the embedding",
        ),
        ({"search": {"max_mean_kl": 0.01, "schemes": ["int8_dynamic"], "tokens": 5}}, "unknown key(s) tokens"),
    ],
)
def test_refusals_name_recipe_field_op_and_fix(body, message):
    with pytest.raises(RecipeError, match="recipe 'bad'") as error:
        parse_recipe("bad", body, "recipes.yaml")
    assert message in str(error.value)


def test_algorithms_hash_into_the_spec_and_the_default_is_not_written():
    plain = parse_recipe("a", {"default": "int4_dynamic_block32"}, "x")
    explicit = parse_recipe("b", {"default": "int4_dynamic_block32+min_max"}, "x")
    gptq = parse_recipe("c", {"default": "int4_dynamic_block32+gptq", "embedding": "int4_dynamic_block32"}, "x")
    assert explicit.default == "int4_dynamic_block32" and plain.spec_hash == explicit.spec_hash
    assert gptq.spec()["default"] == "int4_dynamic_block32+gptq" and gptq.spec_hash != plain.spec_hash
    assert gptq.needs_calibration and gptq.needs_hessians and not plain.needs_calibration
    budget = parse_recipe("d", {"search": {"max_mean_kl": 0.01, "schemes": ["int8_dynamic", "int4_dynamic"]}}, "x")
    assert budget.gates["max_mean_kl"] == 0.01 and budget.spec()["search"]["schemes"] == [
        "int8_dynamic",
        "int4_dynamic",
    ]
    assert math.isclose(
        parse_recipe("e", {"search": {**budget.search.spec(), "max_mean_kl": 0.02}}, "x").search.budget, 0.02
    )


BLOCKWISE = [name for name, scheme in SCHEMES.items() if scheme.block_size]


@pytest.fixture(scope="module")
def padded_export(tmp_path_factory):
    """A checkpoint as transformers writes one with a padding token: the embedding's padding row is all zeros,
    every block of it. Widths of 256, so that every block size divides them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_quant_pipeline.checkpoints.validate import read_checkpoint
    from edge_quant_pipeline.export.generative import export_float_tflite
    from edge_quant_pipeline.export.load import architecture_of, load_float_model

    folder = tmp_path_factory.mktemp("padded")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert not model.model.embed_tokens.weight[0].any()  # transformers' own initialisation
    model.save_pretrained(folder / "checkpoint")
    checkpoint = read_checkpoint(folder / "checkpoint")
    settings = ExportSettings(prefill_len=8, kv_cache_len=32)
    float_model = load_float_model(checkpoint, settings.kv_cache_len)
    model_config = architecture_of(checkpoint).model_config
    return export_float_tflite(float_model, model_config, settings, folder / "float.tflite"), settings


@pytest.mark.parametrize("scheme", BLOCKWISE)
def test_blocks_of_zeros_quantize_into_a_file_xnnpack_runs(padded_export, tmp_path, scheme):
    """ai-edge-quantizer alone writes a zero float16 scale for an all-zero block, which XNNPACK refuses
    ("unsupported scale value (0.000000)"); quantized here, every block gets a normal scale and the file runs."""
    from ai_edge_quantizer import quantizer

    float_tflite, settings = padded_export
    rules = ai_edge_quantizer_recipe(parse_recipe("r", {"default": scheme}, "test"), tied_lm_head=True)
    as_shipped = tmp_path / "as_shipped.tflite"
    as_shipped.write_bytes(quantizer.Quantizer(str(float_tflite), rules).quantize().quantized_model)
    tokens = np.arange(1, 1 + settings.kv_cache_len, dtype=np.int32)
    with pytest.raises(RuntimeRejectedError, match=r"unsupported scale value \(0\.000000\)"):
        with InterpreterSession(as_shipped, settings, 2) as session:
            session.score(tokens)
    quantized = quantize_tflite(float_tflite, rules, tmp_path / "model.tflite")
    with InterpreterSession(quantized, settings, 2) as session:
        assert np.isfinite(session.score(tokens)).all()
