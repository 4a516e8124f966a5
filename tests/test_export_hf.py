"""Families through litert-torch's ``export_hf`` (transformers' own modeling code), as the pipeline runs it.

Each family is a tiny random model written by transformers (every parameter moved off its initial value, as
``test_architectures.py`` does) with a tokenizer beside it, because ``export_hf`` reads one. The exported file
runs in the LiteRT runtime against transformers' own float32 logits, generates greedily as transformers
does, and takes a whole-model and a selective recipe whose conformance check passes.

Gemma 4 comes as Google ships it, a ``Gemma4ForConditionalGeneration`` (here without vision or audio towers),
with per-layer embeddings, so its embedding lookups are files of their own (``embedders.py``).
"""

import hashlib
import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE, metadata, move_off_initial_values
from transformers import AutoConfig, AutoModelForCausalLM

from edge_quant_pipeline import tflite_file
from edge_quant_pipeline.checkpoints.validate import read_checkpoint
from edge_quant_pipeline.config import ArtifactStore, EvaluationConfig, PipelineConfig
from edge_quant_pipeline.embedders import embedders_of
from edge_quant_pipeline.evaluate.export_proof import prove_export
from edge_quant_pipeline.evaluate.metrics import compare
from edge_quant_pipeline.evaluate.reference import TransformersModel
from edge_quant_pipeline.export.architectures import UnsupportedArchitectureError
from edge_quant_pipeline.export.exporters import (
    EXPORT_HF_MODEL_TYPES,
    per_layer_embeddings,
    plan_export,
    plan_export_apart,
)
from edge_quant_pipeline.export.hf import export_hf_tflite
from edge_quant_pipeline.export.load import load_language_model, load_transformers_model, per_layer_table
from edge_quant_pipeline.export.lookup_table import write_lookup_tflite
from edge_quant_pipeline.quantize.apply import quantize_model, quantize_tflite
from edge_quant_pipeline.quantize.conformance import check_conformance
from edge_quant_pipeline.quantize.lookup import quantize_lookup_tflite
from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES, parse_recipe
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe, embedder_quantizer_recipe
from edge_quant_pipeline.runs.launch import materialize
from edge_quant_pipeline.runtime.session import InterpreterSession
from edge_quant_pipeline.settings import EXPORT_HF, GENERATIVE_API, ExporterSettingError
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.synthetic import TRAIN_TEXT, make_tokenizer
from edge_quant_pipeline.weights import read_weights

pytestmark = pytest.mark.families

VOCAB = 512  # the byte-level tokenizer's 256 bytes, its merges and its end-of-text token
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    bos_token_id=None,
    pad_token_id=None,
)
GEMMA4_LAYERS = dict(
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention"] * 2,
    sliding_window=4,
    global_head_dim=32,
    pad_token_id=0,  # Gemma 4's forward needs one
)
FAMILIES = {
    "qwen3": {},
    # windows of 4 tokens, so that the 32-token windows below cross both kinds of layer
    "gemma3_text": dict(
        query_pre_attn_scalar=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
    "llama": LLAMA3_ROPE,
    "smollm3": dict(num_hidden_layers=4),  # every 4th layer has no RoPE
    "ministral3": {},
    # as E2B: per-layer embeddings, global layers with their own head size, the last blocks reusing the KV
    # cache of earlier ones, and those blocks' feed-forward twice as wide
    "gemma4": dict(
        GEMMA4_LAYERS,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
    ),
    "gemma4_text": dict(GEMMA4_LAYERS, hidden_size_per_layer_input=0),  # as the large Gemma 4: no PLE
}
SETTINGS = ExportSettings(prefill_len=8, kv_cache_len=32)
SELECTIVE = {
    "default": "fp16",
    "embedding": "int8_dynamic",
    "attention": {1: "int8_weight_only"},
    "feedforward": "int8_dynamic",
}


def tiny_config(model_type: str, **overrides):
    fields = {**TINY, **FAMILIES.get(model_type, {}), **overrides}
    if model_type == "gemma4":
        text_config = AutoConfig.for_model("gemma4_text", **fields).to_dict()
        return AutoConfig.for_model("gemma4", text_config=text_config, vision_config=None, audio_config=None)
    return AutoConfig.for_model(model_type, **fields)


def write_tiny_checkpoint(model_type: str, folder, **overrides):
    torch.manual_seed(0)
    tokenizer = make_tokenizer(VOCAB)
    config = tiny_config(model_type, eos_token_id=tokenizer.eos_token_id, **overrides)
    move_off_initial_values(AutoModelForCausalLM.from_config(config).eval()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", FAMILIES)
def test_export_hf_matches_transformers_in_the_runtime_and_takes_recipes(tmp_path, model_type):
    folder = write_tiny_checkpoint(model_type, tmp_path / model_type)
    checkpoint = read_checkpoint(folder)
    plan = plan_export(checkpoint.hf_config, folder / "config.json", EXPORT_HF)
    tflite = tmp_path / "float.tflite"
    embedders = per_layer_embeddings(checkpoint.hf_config)
    # the child's peak RSS in MB: torch and a model
    assert export_hf_tflite(folder, SETTINGS, tflite, externalize_embedder=embedders) > 500
    assert sorted(embedders_of(tflite)) == (["embedder", "per_layer_embedder"] if embedders else [])

    reference = TransformersModel(load_transformers_model(checkpoint))
    windows = np.random.default_rng(0).integers(0, VOCAB, (3, SETTINGS.kv_cache_len), dtype=np.int32)
    with InterpreterSession(tflite, SETTINGS, num_threads=2) as session:
        assert not session.prefill_scores  # export_hf's prefill fills the KV cache only: scored through decode
        logits = np.stack([session.score(w) for w in windows])
        generated = session.greedy(windows[0, : SETTINGS.prefill_len], 16)
    expected = np.stack([reference.window_logits(w) for w in windows])
    assert np.abs(logits - expected).max() < 1e-4
    fidelity = compare(logits, expected, windows)
    assert fidelity.perplexity_ratio == pytest.approx(1.0, abs=0.01) and fidelity.top1_agreement > 0.99
    assert generated.tolist() == reference.greedy(windows[:1, : SETTINGS.prefill_len], 16)[0].tolist()

    for name, body in (("dynamic_int8", {"default": "int8_dynamic"}), ("selective", SELECTIVE)):
        recipe = parse_recipe(name, body, "test")
        quantizer_recipe = ai_edge_quantizer_recipe(recipe, plan.shape.tied_lm_head)
        quantized = quantize_model(
            tflite, quantizer_recipe, embedder_quantizer_recipe(recipe), tmp_path / f"{name}.tflite"
        )
        weights = read_weights(quantized)
        rows = check_conformance(recipe, weights, plan.shape)
        assert [r for r in rows if not r.ok] == [], name
        # an embedder holds the embedding: quantized as the recipe's embedding, and checked with it above
        assert {w.file for w in weights if w.component == "embedding"} == set(embedders_of(tflite) or ["model"])
        assert {(r.component, r.block) for r in rows} >= {("attention", b) for b in range(plan.shape.num_layers)}


def test_an_export_of_a_family_no_test_covers_is_proven_against_transformers(tmp_path):
    """OLMo 2 through export_hf's generic path: its export matches its own checkpoint, and the same proof
    refuses it as the export of a checkpoint whose last block differs (an export that computes something else)."""
    folder = write_tiny_checkpoint("olmo2", tmp_path / "olmo2")
    checkpoint = read_checkpoint(folder)
    plan = plan_export(checkpoint.hf_config, folder / "config.json")
    assert (plan.exporter, plan.proven_family) == (EXPORT_HF, False)
    tflite = tmp_path / "float.tflite"
    export_hf_tflite(folder, SETTINGS, tflite)

    proof = prove_export(checkpoint, tflite, SETTINGS, num_threads=2)
    assert proof.passed and proof.max_abs_diff < 1e-4 and proof.positions == SETTINGS.kv_cache_len

    other = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # OLMo 2 normalizes the feed-forward's output: a new direction, not a new scale
        other.model.layers[-1].mlp.down_proj.weight.add_(torch.randn(other.model.layers[-1].mlp.down_proj.weight.shape))
    other.save_pretrained(tmp_path / "other")
    make_tokenizer(VOCAB).save_pretrained(tmp_path / "other")
    refused = prove_export(read_checkpoint(tmp_path / "other"), tflite, SETTINGS, num_threads=2)
    assert not refused.passed and refused.max_abs_diff > 100 * refused.tolerance
    assert refused.first_failing == 0  # every position: the last block computes every one
    assert f"largest |logit difference| {refused.max_abs_diff:.3g} at position {refused.position}" in (
        refused.describe()
    )


def test_a_bfloat16_per_layer_table_stays_bfloat16_and_the_logits_are_the_float32_models(tmp_path):
    """Gemma 4 E2B's table is 2.35B parameters: loaded as stored, it costs half its float32 copy, and its rows
    are the same numbers. Hidden size 48: sqrt(48), the embedding's scale, is not a bfloat16 number, and must not
    become one on the way (it is made at init in the load's dtype)."""
    folder = write_tiny_checkpoint("gemma4", tmp_path / "float32", hidden_size=48)
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bfloat16")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "bfloat16", dtype=torch.float32)

    model = load_language_model(tmp_path / "bfloat16")
    table = per_layer_table(model).weight
    assert table.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p is not table} == {torch.float32}
    tokens = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, expected(tokens).logits)


def test_a_lookup_table_streamed_to_its_file_looks_up_the_tables_rows(tmp_path):
    """The table lies past the flatbuffer (a buffer with an offset, as TFLite reads models above 2 GB)."""
    table = torch.randn(3000, 3 * 8).to(torch.bfloat16)
    output = tmp_path / "lookup.tflite"
    write_lookup_tflite(table, 4.0, (3, 8), {"decode_lookup": 1, "prefill_lookup_8": 8}, output)
    assert table.numel() * 4 < output.stat().st_size < table.numel() * 4 + 64 * 1024

    from ai_edge_litert.interpreter import Interpreter

    tokens = np.array([[2999, 0, 17, 3, 1500, 1, 2, 2999]], dtype=np.int32)
    expected = (table.float()[torch.from_numpy(tokens).long()] * 4).reshape(1, 8, 3, 8).numpy()
    interpreter = Interpreter(model_path=str(output))
    rows = interpreter.get_signature_runner("prefill_lookup_8")(token_ids=tokens)["embeddings"]
    np.testing.assert_array_equal(rows, expected)
    row = interpreter.get_signature_runner("decode_lookup")(token_ids=tokens[:, -1:])["embeddings"]
    np.testing.assert_array_equal(row, expected[:, -1:])


@pytest.mark.parametrize("recipe", ["dynamic_int8", "dynamic_int4_block32", "fp16", "weight_only_int8"])
def test_a_lookup_quantized_a_slice_of_rows_at_a_time_looks_up_what_the_whole_one_does(tmp_path, recipe):
    """Every row, in slices of 400 rows (the last one shorter), a zero row among them (int4's clamped scale). A slice
    is large enough (more than 256 kB quantized, int4's too) that ai-edge-quantizer writes its buffers past its
    flatbuffer, as it does at real size; and every buffer of the float file lies past its flatbuffer too, as
    litert-torch writes Gemma 4 E2B's 1.6 GB embedder."""
    table = torch.randn(1000, 3 * 512)
    table[5] = 0
    source = tmp_path / "lookup.tflite"
    write_lookup_tflite(table, 4.0, (3, 512), {"prefill_lookup_8": 8}, source)
    every_buffer_past_the_flatbuffer(source)
    embedder_recipe = embedder_quantizer_recipe(BUILTIN_RECIPES[recipe])
    whole = quantize_tflite(source, embedder_recipe, tmp_path / "whole.tflite")
    sliced = quantize_lookup_tflite(
        source, lambda f, o: quantize_tflite(f, embedder_recipe, o), tmp_path / "sliced.tflite", slice_bytes=400 * 6144
    )
    # Each slice's file is replaced by the next: none stays open, keeping its disk (apply._mapped_files_closed).
    assert [name for name in open_file_names() if name.startswith(str(tmp_path)) and "(deleted)" in name] == []

    from ai_edge_litert.interpreter import Interpreter

    every_row = np.arange(1000, dtype=np.int32).reshape(-1, 1, 8)
    looked_up = []
    for file in (whole, sliced):
        lookup = Interpreter(model_path=str(file)).get_signature_runner("prefill_lookup_8")
        looked_up.append(np.stack([lookup(token_ids=tokens)["embeddings"] for tokens in every_row]))
    np.testing.assert_array_equal(looked_up[0], looked_up[1])


def open_file_names() -> list[str]:
    names = []
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            names.append(os.readlink(descriptor))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return names


def every_buffer_past_the_flatbuffer(path):
    pages = tflite_file.mapped(path)
    model = tflite_file.read_structure(pages)
    used = [i for i, b in enumerate(model.buffers) if b.offset > 1 or (b.data is not None and len(b.data))]
    data = {i: tflite_file.buffer_array(pages, model, i).tobytes() for i in used}
    tflite_file.write(model, {i: (len(data[i]), lambda i=i: [data[i]]) for i in used}, path)


def test_auto_takes_the_rebuild_where_it_fits_and_export_hf_where_it_does_not(tmp_path):
    llama = AutoConfig.for_model("llama", **TINY).to_dict()
    assert plan_export(llama, tmp_path / "config.json").exporter == GENERATIVE_API
    assert plan_export(llama, tmp_path / "config.json", EXPORT_HF).exporter == EXPORT_HF
    # a RoPE scaling the rebuild's layers lack: transformers' own modules compute it
    yarn = {**llama, "rope_parameters": dict(rope_type="yarn", rope_theta=1e4, factor=4.0)}
    assert plan_export(yarn, tmp_path / "config.json").exporter == EXPORT_HF
    with pytest.raises(UnsupportedArchitectureError, match="RoPE scaling 'yarn'"):
        plan_export(yarn, tmp_path / "config.json", GENERATIVE_API)
    smollm3 = AutoConfig.for_model("smollm3", **TINY).to_dict()
    assert plan_export(smollm3, tmp_path / "config.json").exporter == EXPORT_HF


def test_a_plan_made_in_a_child_is_the_plan_made_here(tmp_path):
    """Large checkpoints are planned in a child process (its imports stay out of the process that exports next):
    the same plan, and the same refusal."""
    llama = AutoConfig.for_model("llama", **TINY).to_dict()
    yarn = {**llama, "rope_parameters": dict(rope_type="yarn", rope_theta=1e4, factor=4.0)}
    assert plan_export_apart(yarn, tmp_path / "config.json") == plan_export(yarn, tmp_path / "config.json")
    with pytest.raises(UnsupportedArchitectureError, match=r"config.json: .* RoPE scaling 'yarn'"):
        plan_export_apart(yarn, tmp_path / "config.json", GENERATIVE_API)


def test_what_neither_exporter_takes_is_refused_before_any_work(tmp_path):
    olmo2 = AutoConfig.for_model("olmo2", **TINY, architectures=["Olmo2ForCausalLM"]).to_dict()
    assert not plan_export(olmo2, tmp_path / "config.json").proven_family  # proven per checkpoint (above)
    assert plan_export(olmo2, tmp_path / "config.json", EXPORT_HF).exporter == EXPORT_HF
    bert = {**TINY, "model_type": "bert", "architectures": ["BertForMaskedLM"]}
    with pytest.raises(UnsupportedArchitectureError, match=r"\(BertForMaskedLM\) do not name transformers' BertLMHead"):
        plan_export(bert, tmp_path / "config.json")
    with pytest.raises(UnsupportedArchitectureError, match=r"'t5' is not supported: transformers has no decoder-only"):
        plan_export({**TINY, "model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, tmp_path / "c")
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba' is not supported: .*\(none\) do not name"):
        plan_export({**TINY, "model_type": "mamba"}, tmp_path / "config.json")
    # a family only the rebuild knows, with a config it refuses, keeps the rebuild's reason
    with pytest.raises(UnsupportedArchitectureError, match="query_pre_attn_scalar 24 differs"):
        plan_export({**TINY, "model_type": "gemma2", "query_pre_attn_scalar": 24}, tmp_path / "config.json")
    text_only = tiny_config("gemma4_text", hidden_size_per_layer_input=16).to_dict()
    with pytest.raises(UnsupportedArchitectureError, match="Gemma4ForConditionalGeneration checkpoint"):
        plan_export(text_only, tmp_path / "config.json")
    experts = tiny_config("gemma4", enable_moe_block=True, num_experts=4, top_k_experts=2).to_dict()
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        plan_export(experts, tmp_path / "config.json")
    with pytest.raises(ExporterSettingError, match="EDGE_QUANT_EXPORTER='onnx' names no exporter"):
        plan_export({**TINY, "model_type": "llama"}, tmp_path / "config.json", "onnx")


# Through the whole graph: a family no test here covers (OLMo 2: export_hf's generic path, its export proven against
# transformers in the export's step) and one with per-layer embeddings (Gemma 4), both in one launch, as two
# checkpoints in one folder.
GRAPH_FAMILIES = ["olmo2", "gemma4"]


@pytest.fixture(scope="module")
def export_hf_graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-hf-graph")
    for model_type in GRAPH_FAMILIES:
        write_tiny_checkpoint(model_type, root / "checkpoints" / f"tiny-{model_type}")
    pipeline = PipelineConfig(
        checkpoint_dir=str(root / "checkpoints"),
        artifact_store=ArtifactStore(url=str(root / "artifacts")),
        work_dir=str(root / "work"),
        evaluation=EvaluationConfig(text=str(TRAIN_TEXT), max_tokens=512),
    )
    models = [f"tiny-{model_type}" for model_type in GRAPH_FAMILIES]
    with dg.instance_for_test() as instance:
        summary = materialize(instance, pipeline, models, ["float", "selective_fp16_int8"], jobs=2)
        assert summary.failures == 0, [o.failures for o in summary.outcomes]
        yield instance, root


@pytest.mark.graph
@pytest.mark.parametrize("model_type", GRAPH_FAMILIES)
def test_an_export_hf_family_through_the_whole_graph(export_hf_graph, model_type):
    instance, root = export_hf_graph
    model = f"tiny-{model_type}"
    assert metadata(instance, "checkpoint", model)["exporter"] == EXPORT_HF
    proven_family = model_type in EXPORT_HF_MODEL_TYPES
    assert metadata(instance, "checkpoint", model)["proven_family"] == proven_family
    # a family no test covers: its export was compared with transformers' own model, and passed
    export_proof = metadata(instance, "float_tflite", model).get("export_proof_max_abs_diff")
    assert (export_proof is None) == proven_family
    float_eval = metadata(instance, "evaluation", f"{model}|float")
    assert float_eval["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3) and float_eval["top1_agreement"] > 0.999
    # its LiteRT-LM bundle (Gemma 4's with both embedders in it) generates as the interpreter does
    assert float_eval["litert_lm_error"] == "" and float_eval["litert_lm_interpreter_agreement"] == 1.0
    published = metadata(instance, "published_artifact", f"{model}|selective_fp16_int8")
    assert published["exporter"] == EXPORT_HF
    recipe_dir = root / "artifacts" / model / "selective_fp16_int8"
    version = recipe_dir / json.loads((recipe_dir / "latest.json").read_text())["version"]
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["exporter"] == EXPORT_HF and (version / "model.litertlm").is_file() and manifest["bundle_sha256"]
    if not proven_family:
        assert manifest["metrics"]["export_proof_max_abs_diff"] <= manifest["metrics"]["export_proof_tolerance"]
    # the embedders are published beside the model, each with its hash, as LiteRT-LM needs them all
    published_embedders = embedders_of(version / "model.tflite")
    assert sorted(manifest.get("embedder_sha256", {})) == sorted(published_embedders)
    assert bool(published_embedders) == (model_type == "gemma4")
    for role, path in published_embedders.items():
        assert manifest["embedder_sha256"][role] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_proof_counts_a_nan_as_infinitely_far_and_compares_only_computed_positions():
    from edge_quant_pipeline.evaluate.export_proof import _compare, _Pass

    expected = np.ones((4, 3), np.float32)
    generated = _Pass(np.ones((2, 3), np.float32), 2, ["decode after prefill"] * 2)  # from position 2 on
    assert _compare(expected, [_Pass(expected.copy(), 0, ["decode"] * 4), generated]).passed
    broken = expected.copy()
    broken[1, 0] = np.nan
    proof = _compare(expected, [_Pass(broken, 0, ["decode"] * 4), generated])
    assert not proof.passed and (proof.position, proof.first_failing, proof.computed_by) == (1, 1, "decode")
