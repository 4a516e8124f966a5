"""Every supported family, as transformers saves it, rebuilt by litert-torch computes the same logits.

Each test builds a tiny random model with transformers (no downloads), saves it with
``save_pretrained`` and loads the folder the way the pipeline does.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE, move_off_initial_values
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from edge_quant_pipeline.checkpoints.validate import CheckpointError, read_checkpoint
from edge_quant_pipeline.evaluate.metrics import compare
from edge_quant_pipeline.evaluate.reference import float_window_logits
from edge_quant_pipeline.export.architectures import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    architecture_for,
)
from edge_quant_pipeline.export.generative import IN_PROCESS_PARAMETERS, export_float_tflite, export_rebuilt_tflite
from edge_quant_pipeline.export.load import architecture_of, load_float_model
from edge_quant_pipeline.quantize.apply import quantize_tflite
from edge_quant_pipeline.quantize.conformance import check_conformance
from edge_quant_pipeline.quantize.recipes import parse_recipe
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe
from edge_quant_pipeline.runtime.session import InterpreterSession
from edge_quant_pipeline.shapes import ExportSettings, ModelShape
from edge_quant_pipeline.weights import read_weights

pytestmark = pytest.mark.families

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
# Gemma 2/3 scale attention by query_pre_attn_scalar, which litert-torch supports only when it equals head_dim.
# Windows of 4 tokens make the 24-token inputs below exercise both local and global layers.
GEMMA_SANDWICH = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(head_dim=16)),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, GEMMA_SANDWICH),
    "gemma3_text": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(GEMMA_SANDWICH, layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi": (PhiConfig, PhiForCausalLM, dict(partial_rotary_factor=0.5)),  # Phi-2's is 0.4 of its head_dim of 80
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(partial_rotary_factor=0.5)),  # partial RoPE, as in Phi-4-mini
}
# Scaled RoPE as Phi-3.5/4-mini configure it (Llama 3's: conftest.LLAMA3_ROPE), with an original context short
# enough that the scaling changes the frequencies these tiny models use.
LONGROPE = dict(
    rope_parameters=dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=[1.0, 1.5, 2.0, 3.0],  # one per rotated pair: head_dim 16 x partial_rotary_factor 0.5 / 2
        long_factor=[4.0, 5.0, 6.0, 7.0],
        partial_rotary_factor=0.5,
    ),
    original_max_position_embeddings=64,  # with max_position_embeddings 256: attention scaled by 1.15
)
KV_CACHE_LEN = 64


def tiny_config(family: str, **overrides):
    config_class, _, fields = FAMILIES[family]
    return config_class(**{**TINY, **fields, **overrides})


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    # eager attention is transformers' reference math (its SDPA path cannot softcap, which Gemma 2 needs)
    model = FAMILIES[family][1](tiny_config(family, attn_implementation="eager", **overrides))
    return move_off_initial_values(model.eval())


def max_logit_diff(checkpoint_dir, reference: torch.nn.Module) -> float:
    from litert_torch.generative.layers import kv_cache

    checkpoint = read_checkpoint(checkpoint_dir)
    ours = load_float_model(checkpoint, kv_cache_len=KV_CACHE_LEN)
    tokens = torch.randint(TINY["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = kv_cache.KVCache.from_model_config(KV_CACHE_LEN, architecture_of(checkpoint).model_config)
        logits = ours(tokens.int(), torch.arange(tokens.shape[1], dtype=torch.int), cache)["logits"]
        expected = reference(tokens).logits
    return (logits - expected).abs().max().item()


def test_every_supported_family_is_tested():
    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize(
    "family, overrides",
    [
        pytest.param("llama", dict(tie_word_embeddings=True), id="llama-tied"),
        pytest.param("llama", dict(tie_word_embeddings=False), id="llama-untied"),
        pytest.param("llama", LLAMA3_ROPE, id="llama-llama3-rope"),
        pytest.param("phi3", LONGROPE, id="phi3-longrope"),
        *(pytest.param(family, {}, id=family) for family in FAMILIES if family != "llama"),
    ],
)
def test_rebuilt_model_matches_transformers(tmp_path, family, overrides):
    reference = tiny_model(family, **overrides)
    reference.save_pretrained(tmp_path)
    assert max_logit_diff(tmp_path, reference) < 1e-4
    assert architecture_of(read_checkpoint(tmp_path)).shape == ModelShape(
        num_layers=2,
        tied_lm_head=reference.config.tie_word_embeddings,
        reduction_dims={"embedding": (64,), "attention": (64, 64), "feedforward": (64, 128), "lm_head": (64,)},
    )


@pytest.mark.parametrize("family, scaling", [("llama", LLAMA3_ROPE), ("phi3", LONGROPE)])
def test_rope_scaling_is_what_makes_them_match(tmp_path, family, scaling):
    """The same weights under plain RoPE compute other logits, so the match above is the scaling's."""
    scaled = tiny_model(family, **scaling)
    scaled.save_pretrained(tmp_path)
    plain = FAMILIES[family][1](tiny_config(family, attn_implementation="eager")).eval()
    plain.load_state_dict(scaled.state_dict())
    assert max_logit_diff(tmp_path, plain) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_as_float32(tmp_path, dtype):
    """As most checkpoints ship: litert-torch's loader casts each tensor to its float32 layers; the rebuilt
    model computes what transformers computes in float32 from the same (rounded) weights."""
    tiny_model("qwen2").to(dtype).save_pretrained(tmp_path)
    assert str(dtype).removeprefix("torch.") == read_checkpoint(tmp_path).hf_config["dtype"]
    # transformers' own float32 model of the stored weights (its RoPE tables computed in float32, as ours)
    reference = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert max_logit_diff(tmp_path, reference) < 1e-4


def test_sharded_safetensors(tmp_path):
    reference = tiny_model("llama")
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    assert max_logit_diff(tmp_path, reference) < 1e-4


def test_pytorch_model_bin(tmp_path):
    """The layout transformers < 5 wrote by default; transformers 5 only reads it, so it is written by hand."""
    reference = tiny_model("qwen2")
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    # the Trainer leaves this beside the weights; it is not a state dict and must not be read as one
    (tmp_path / "training_args.bin").write_bytes(b"pickled TrainingArguments")
    assert max_logit_diff(tmp_path, reference) < 1e-4


def test_unknown_model_type_lists_supported_ones(tmp_path):
    supported = "llama, qwen2, qwen3, gemma, gemma2, gemma3_text, phi, phi3"
    with pytest.raises(
        UnsupportedArchitectureError, match=f"'mamba' is not supported. Supported model types: {supported}"
    ):
        architecture_for({"model_type": "mamba"}, tmp_path / "config.json")


@pytest.mark.parametrize(
    "family, overrides, reason",
    [
        ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=5e5, factor=4.0)), "RoPE scaling 'yarn'"),
        ("gemma2", dict(rope_parameters=dict(rope_type="linear", factor=8.0)), "RoPE scaling 'linear'"),
        ("phi", dict(qk_layernorm=True), "qk_layernorm"),
        ("gemma2", dict(query_pre_attn_scalar=24), "query_pre_attn_scalar 24 differs from head_dim 16"),
        ("gemma3_text", dict(final_logit_softcapping=30.0), "no final logit softcap"),
        ("phi3", dict(hidden_act="gelu"), "SiLU-GLU only"),
    ],
)
def test_configs_litert_torch_would_compute_differently_are_refused(tmp_path, family, overrides, reason):
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        architecture_for({**tiny_config(family).to_dict(), **overrides}, tmp_path / "config.json")


def test_rope_bases_from_configs_written_before_transformers_5(tmp_path):
    """They keep RoPE bases at the top level, Gemma 3's local one as rope_local_base_freq."""
    config = {k: v for k, v in tiny_config("gemma3_text").to_dict().items() if k != "rope_parameters"}
    config.update(rope_theta=5e5, rope_local_base_freq=2e4)
    model_config = architecture_for(config, tmp_path / "config.json").model_config
    assert [model_config.block_config(i).attn_config.rotary_base for i in range(2)] == [2e4, 5e5]


def test_rope_scaling_from_configs_written_before_transformers_5(tmp_path):
    """They call it rope_scaling, and Phi-3.5 keeps original_max_position_embeddings at the top level."""
    reference = tiny_model("phi3", **LONGROPE)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    scaling = config.pop("rope_parameters")
    config.update(
        rope_theta=scaling.pop("rope_theta"),
        partial_rotary_factor=scaling.pop("partial_rotary_factor"),
        original_max_position_embeddings=scaling.pop("original_max_position_embeddings", 64),
        rope_scaling={"type": scaling.pop("rope_type"), **scaling},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert max_logit_diff(tmp_path, reference) < 1e-4


def test_kv_cache_longer_than_the_short_longrope_range(tmp_path):
    """Past original_max_position_embeddings transformers switches to long_factor, which one export cannot."""
    tiny_model("phi3", **{**LONGROPE, "original_max_position_embeddings": 32}).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="KV cache of 64 tokens is longer than the 32 tokens"):
        load_float_model(read_checkpoint(tmp_path), kv_cache_len=KV_CACHE_LEN)


def test_kv_cache_longer_than_an_unmodelled_sliding_window(tmp_path):
    tiny_model("phi3", sliding_window=16).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="KV cache of 64 tokens is longer than the 16 tokens"):
        load_float_model(read_checkpoint(tmp_path), kv_cache_len=KV_CACHE_LEN)


# litert-torch's generic model class, families' own (their ops are named after their classes) and scaled RoPE
@pytest.mark.parametrize(
    "family, overrides",
    [("qwen2", {}), ("gemma2", {}), ("gemma3_text", {}), ("llama", LLAMA3_ROPE), ("phi3", LONGROPE), ("phi", {})],
    ids=["qwen2", "gemma2", "gemma3_text", "llama-llama3-rope", "phi3-longrope", "phi"],
)
def test_converted_model_matches_float_in_the_interpreter(tmp_path, family, overrides):
    tiny_model(family, **overrides).save_pretrained(tmp_path / "checkpoint")
    checkpoint = read_checkpoint(tmp_path / "checkpoint")
    settings = ExportSettings(prefill_len=8, kv_cache_len=32)
    model = load_float_model(checkpoint, settings.kv_cache_len)
    model_config = architecture_of(checkpoint).model_config
    tflite = export_float_tflite(model, model_config, settings, tmp_path / "model.tflite")
    windows = np.random.default_rng(0).integers(0, TINY["vocab_size"], (3, settings.kv_cache_len), dtype=np.int32)
    session = InterpreterSession(tflite, settings, num_threads=2)
    logits = np.stack([session.score(w) for w in windows])
    reference = np.stack([float_window_logits(model, model_config, w, settings.kv_cache_len) for w in windows])
    fidelity = compare(logits, reference, windows)
    assert fidelity.perplexity_ratio == pytest.approx(1.0, abs=0.01)
    assert fidelity.top1_agreement > 0.99
    # Chunks of prefill_len at later offsets of the KV cache (sliding windows included) score what
    # decoding token by token scores.
    one_by_one = np.stack([session.decode(int(token), pos) for pos, token in enumerate(windows[0])])
    assert np.abs(logits[0] - one_by_one).max() < 1e-4

    # Per-component and per-block rules find this family's layers (Gemma 3 names its blocks DecoderBlock_N).
    recipe = parse_recipe(
        "selective",
        {
            "default": "fp16",
            "embedding": "int8_dynamic",
            "attention": {1: "int8_weight_only"},
            "feedforward": "int8_dynamic",
        },
        "test",
    )
    quantized = quantize_tflite(
        tflite,
        ai_edge_quantizer_recipe(recipe, model_config.lm_head_share_weight_with_embedding),
        tmp_path / "selective.tflite",
    )
    rows = check_conformance(recipe, read_weights(quantized), architecture_of(checkpoint).shape)
    assert [r for r in rows if not r.ok] == []
    if not model_config.lm_head_share_weight_with_embedding:  # a separate LM head takes a scheme of its own
        recipe = parse_recipe("head", {"default": "int8_dynamic", "lm_head": "int4_dynamic_block32"}, "test")
        quantized = quantize_tflite(tflite, ai_edge_quantizer_recipe(recipe, False), tmp_path / "head.tflite")
        rows = check_conformance(recipe, read_weights(quantized), architecture_of(checkpoint).shape)
        assert [r for r in rows if not r.ok] == []
        assert {r.actual.dtype for r in rows if r.component == "lm_head"} == {"INT4"}


def test_an_export_in_a_child_writes_what_one_in_the_step_writes(tmp_path, demo_checkpoint_dir, demo_export):
    """Models under IN_PROCESS_PARAMETERS export in the step's process, larger ones in a child: the same file."""
    checkpoint = read_checkpoint(demo_checkpoint_dir)
    assert 0 < checkpoint.parameters < IN_PROCESS_PARAMETERS  # the demo goes the in-process way in the pipeline
    uncounted = dataclasses.replace(checkpoint, parameters=0)  # a model whose size is not known goes to a child
    child_peak_mb = export_rebuilt_tflite(uncounted, ExportSettings(), tmp_path / "float.tflite")
    assert child_peak_mb > 500  # measured in the child: torch and litert-torch at least
    assert (tmp_path / "float.tflite").read_bytes() == demo_export[1].read_bytes()
