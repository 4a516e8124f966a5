"""The failure smoke tests miss (litert-torch#1068: int4 per channel took a Qwen3-0.6B from 50 % to 0 % on GSM8K while
an 8-question smoke test passed): a recipe whose long generations collapse where the float model's do not, refused
by the generation-health gate in LiteRT-LM, through the whole graph."""

import json

import dagster as dg
import pytest
import torch
from conftest import metadata
from transformers import LlamaConfig, LlamaForCausalLM

from edge_quant_pipeline.config import ArtifactStore, EvaluationConfig, PipelineConfig
from edge_quant_pipeline.runs.launch import materialize
from edge_quant_pipeline.synthetic import TRAIN_TEXT, make_tokenizer

# Random weights: the other gates are opened (the collapsed recipe's perplexity ratio is about 3e7), so that the
# health gates (at their defaults) judge alone.
RECIPES = """\
gates: {max_perplexity_ratio: 1.0e+12, min_top1_agreement: 0}
recipes:
  int4_channelwise:
    description: int4 weights, one scale per output channel, dynamic-range compute.
    default: int4_dynamic
"""


def write_collapsing_checkpoint(folder, dead: int = 0, outlier: float = 50.0) -> None:
    """A random Llama whose float generations are varied and which int4 per channel turns into a loop, as large
    weights do to real models: in every layer each weight row's largest entry sits in an input channel that is
    always zero (a norm weight of 0; a value and a feed-forward channel fed by that channel alone), so it changes
    nothing in float; but a per-channel int4 scale set by it rounds the rest of its row to zero, and the model is
    left with its embeddings. Blocks of 32 lose only the block it sits in."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer(512)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # layers that outweigh the embeddings, as trained ones do (0.02 loops in float)
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            layer.input_layernorm.weight[dead] = layer.post_attention_layernorm.weight[dead] = 0
            for fed in (attention.v_proj, mlp.up_proj):
                fed.weight[dead] = 0
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                linear.weight[:, dead] = outlier
            for linear in (attention.o_proj, mlp.down_proj):
                linear.weight[:, dead] = outlier
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.graph
def test_a_recipe_whose_long_generations_collapse_is_refused_by_the_health_gate(tmp_path):
    write_collapsing_checkpoint(tmp_path / "checkpoints" / "collapsing")
    (tmp_path / "recipes.yaml").write_text(RECIPES)
    pipeline = PipelineConfig(
        checkpoint_dir=str(tmp_path / "checkpoints"),
        artifact_store=ArtifactStore(url=str(tmp_path / "artifacts")),
        work_dir=str(tmp_path / "work"),
        evaluation=EvaluationConfig(text=str(TRAIN_TEXT), max_tokens=512, tasks=[]),
        recipes_file=str(tmp_path / "recipes.yaml"),
    )
    recipes = ["float", "int4_channelwise", "dynamic_int4_block32"]
    with dg.instance_for_test() as instance:
        materialize(instance, pipeline, ["collapsing"], recipes, jobs=2)
        health = {r: metadata(instance, "evaluation", f"collapsing|{r}") for r in recipes}
    float_share = health["float"]["float_repeated_ngram_share"]
    assert float_share < 0.2 and health["float"]["litert_lm_repeated_ngram_share"] == float_share
    assert health["int4_channelwise"]["litert_lm_repeated_ngram_share"] > 0.9  # a loop
    assert health["dynamic_int4_block32"]["litert_lm_repeated_ngram_share"] < 0.2
    outcome = tmp_path / "artifacts" / "collapsing"
    failure = json.loads((outcome / "int4_channelwise" / "failed.json").read_text())
    assert failure["stage"] == "quality gate" and "max_repetition_increase" in failure["error"], failure
    assert "max_perplexity_ratio" not in failure["error"]
    for healthy in ("float", "dynamic_int4_block32"):
        assert (outcome / healthy / "latest.json").is_file(), healthy
