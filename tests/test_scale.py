"""Checkpoints as they ship and vocabularies as large as Gemma's: a bfloat16 checkpoint written by
``save_pretrained`` (tokenizer, generation config and chat template beside it) with a 262,144-token vocabulary,
through the whole graph, with evaluation memory bounded by a window of logits, not eval tokens x vocabulary."""

import json

import dagster as dg
import pytest
from conftest import metadata

from edge_quant_pipeline.config import ArtifactStore, EvaluationConfig, PipelineConfig
from edge_quant_pipeline.evaluate.reference import LOGITS_FILE
from edge_quant_pipeline.runs.launch import materialize
from edge_quant_pipeline.synthetic import TRAIN_TEXT, write_checkpoint

pytestmark = pytest.mark.graph

MODEL, VOCAB = "wide-vocab", 262_144
SHAPE = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
RECIPES = ["float", "dynamic_int8"]
MB = 2**20


@pytest.fixture(scope="module")
def wide_vocab_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    checkpoint = write_checkpoint(SHAPE, root / "checkpoints" / MODEL, dtype="bfloat16")
    pipeline = PipelineConfig(
        checkpoint_dir=str(root / "checkpoints"),
        artifact_store=ArtifactStore(url=str(root / "artifacts")),
        work_dir=str(root / "work"),
        # long enough for 2,048 tokens: 16 windows of 128; no tasks (the golden build scores them: test_bundle.py)
        evaluation=EvaluationConfig(text=str(TRAIN_TEXT), tasks=[]),
    )
    with dg.instance_for_test() as instance:
        summary = materialize(instance, pipeline, [MODEL], RECIPES, jobs=2)
        yield instance, summary, checkpoint


def test_a_bfloat16_checkpoint_as_save_pretrained_writes_it_goes_through(wide_vocab_run):
    instance, summary, checkpoint = wide_vocab_run
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja"} <= {p.name for p in checkpoint.iterdir()}
    assert summary.failures == 0, [o.failures for o in summary.outcomes]
    float_eval = metadata(instance, "evaluation", f"{MODEL}|float")
    assert float_eval["eval_tokens"] == 2048  # tokenized with the checkpoint's tokenizer.json
    assert float_eval["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3) and float_eval["top1_agreement"] > 0.999


def test_evaluation_memory_follows_a_window_not_the_eval_text(wide_vocab_run):
    """Holding every window's logits for both models in float64, as evaluation once did, takes
    windows x positions x vocab x 8 bytes (4.3 GB here) per array; evaluation now stays far below one."""
    instance, _, _ = wide_vocab_run
    one_array_mb = 2048 * VOCAB * 8 / MB
    for recipe in RECIPES:
        evaluation = metadata(instance, "evaluation", f"{MODEL}|{recipe}")
        assert evaluation["step_peak_rss_mb"] < one_array_mb / 4, evaluation["step_peak_rss_mb"]
        assert evaluation["step_peak_rss_mb"] <= evaluation["step_estimated_peak_mb"]
    reference = metadata(instance, "float_reference", MODEL)
    assert reference["step_peak_rss_mb"] < one_array_mb / 2  # torch is imported in that process: 1-1.5 GB


def test_the_reference_is_stored_window_by_window_in_float32(wide_vocab_run):
    instance, _, _ = wide_vocab_run
    reference = metadata(instance, "float_reference", MODEL)["reference"]
    import numpy as np

    stored = np.load(f"{reference}/{LOGITS_FILE}", mmap_mode="r")
    assert stored.shape == (16, 128, VOCAB) and stored.dtype == np.float32
