"""Checkpoint discovery, validation and hashing on real files."""

import json
import shutil

import pytest

from edge_quant_pipeline.architectures import UnsupportedArchitectureError
from edge_quant_pipeline.checkpoints import (
    CheckpointError,
    architecture_of,
    find_checkpoints,
    hash_checkpoint,
    load_float_model,
    model_id_for,
    read_checkpoint,
)


@pytest.fixture
def checkpoint_copy(tmp_path, demo_checkpoint_dir):
    copy = tmp_path / "models" / "copy"
    shutil.copytree(demo_checkpoint_dir, copy)
    return copy


@pytest.mark.parametrize("name, model_id", [("tiny-llama", "tiny-llama"), ("a|b c", "a-b-c"), ("ünï", "n")])
def test_model_ids_are_partition_safe(tmp_path, name, model_id):
    assert model_id_for(tmp_path / name) == model_id


def test_find_checkpoints_skips_folders_without_config(checkpoint_copy):
    (checkpoint_copy.parent / "notes").mkdir()
    assert find_checkpoints(checkpoint_copy.parent) == {"copy": checkpoint_copy}


def test_hash_changes_with_one_byte(checkpoint_copy):
    before = hash_checkpoint(checkpoint_copy)
    weights = checkpoint_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert hash_checkpoint(checkpoint_copy) != before


def test_truncated_safetensors_names_the_file(checkpoint_copy):
    weights = checkpoint_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        read_checkpoint(checkpoint_copy)


def test_missing_weights_and_bad_config(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_checkpoint(checkpoint_copy)
    (checkpoint_copy / "model.safetensors").unlink()
    (checkpoint_copy / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        read_checkpoint(checkpoint_copy)


def test_unknown_architecture_lists_supported_ones(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(UnsupportedArchitectureError, match="'mamba' is not supported. Supported model types: llama"):
        architecture_of(read_checkpoint(checkpoint_copy))


def test_weights_that_do_not_match_config(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(CheckpointError, match="weights do not match config.json"):
        load_float_model(read_checkpoint(checkpoint_copy), kv_cache_len=128)


def test_rebuilt_model_matches_transformers(demo_checkpoint_dir):
    """litert-torch's rebuild of the checkpoint computes what transformers computes."""
    import torch
    from litert_torch.generative.layers import kv_cache
    from transformers import LlamaForCausalLM

    from edge_quant_pipeline.checkpoints import architecture_of

    checkpoint = read_checkpoint(demo_checkpoint_dir)
    ours = load_float_model(checkpoint, kv_cache_len=128)
    theirs = LlamaForCausalLM.from_pretrained(demo_checkpoint_dir).eval()
    tokens = torch.tensor([list(b"The lighthouse keeper walked down to the river.")])
    with torch.inference_mode():
        cache = kv_cache.KVCache.from_model_config(128, architecture_of(checkpoint).model_config)
        logits = ours(tokens.int(), torch.arange(tokens.shape[1], dtype=torch.int), cache)["logits"]
        expected = theirs(tokens).logits
    assert (logits - expected).abs().max().item() < 1e-4
