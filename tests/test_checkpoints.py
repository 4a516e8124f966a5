"""Checkpoint discovery, validation and hashing on real files."""

import json
import os
import shutil
from pathlib import Path

import pytest

from edge_quant_pipeline.checkpoints import digest
from edge_quant_pipeline.checkpoints.digest import hash_checkpoint
from edge_quant_pipeline.checkpoints.folders import find_checkpoints, scan_checkpoints
from edge_quant_pipeline.checkpoints.validate import CheckpointError, count_parameters, model_id_for, read_checkpoint
from edge_quant_pipeline.export.architectures import UnsupportedArchitectureError
from edge_quant_pipeline.export.load import architecture_of, load_float_model


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


def test_a_hash_is_remembered_until_a_file_is_written_again(checkpoint_copy, tmp_path, monkeypatch):
    """A re-run does not read the checkpoint again; a file written again, even with its size and modification time
    put back (``cp -p``, ``rsync -t``), is read again: its change time moved."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "_SETTLE_NS", 0)  # the copy was just written; nothing writes it in this tick
    first = hash_checkpoint(checkpoint_copy)
    (remembered,) = (tmp_path / "cache" / "edge-quant" / "checkpoint-sha256").iterdir()
    remembered.write_text("0" * 64)  # what is remembered is what a re-run gets, without reading the files
    assert hash_checkpoint(checkpoint_copy) == "0" * 64
    weights = checkpoint_copy / "model.safetensors"
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hash_checkpoint(checkpoint_copy) not in (first, "0" * 64)


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

    from edge_quant_pipeline.export.load import architecture_of

    checkpoint = read_checkpoint(demo_checkpoint_dir)
    ours = load_float_model(checkpoint, kv_cache_len=128)
    theirs = LlamaForCausalLM.from_pretrained(demo_checkpoint_dir).eval()
    tokens = torch.tensor([list(b"The lighthouse keeper walked down to the river.")])
    with torch.inference_mode():
        cache = kv_cache.KVCache.from_model_config(128, architecture_of(checkpoint).model_config)
        logits = ours(tokens.int(), torch.arange(tokens.shape[1], dtype=torch.int), cache)["logits"]
        expected = theirs(tokens).logits
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name, model_id", [("v1...final", "v1-final"), ("a∕b", "a-b"), ("run 3 (best)", "run-3-best")])
def test_names_dagster_would_refuse_become_safe_ids(tmp_path, name, model_id):
    assert model_id_for(tmp_path / name) == model_id


def test_a_name_without_ascii_is_refused_with_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"模型: no model id can be made from this folder name .* Rename"):
        model_id_for(tmp_path / "模型")


def test_scan_refuses_colliding_and_nameless_folders_and_keeps_the_rest(checkpoint_copy):
    root = checkpoint_copy.parent
    for name in ["a b", "a-b", "模型"]:
        shutil.copytree(checkpoint_copy, root / name)
    (root / "notes.txt").write_text("not a checkpoint")
    scan = scan_checkpoints(root)
    assert scan.found == {"copy": checkpoint_copy}
    assert sorted(r.path.name for r in scan.refused) == ["a b", "a-b", "模型"]
    assert "folders 'a b' and 'a-b' both make the model id 'a-b'" in scan.refusal_for("a-b")


def test_links_inside_the_watched_folder_are_followed_and_links_out_are_refused(checkpoint_copy, tmp_path):
    weights = checkpoint_copy / "model.safetensors"
    inside = checkpoint_copy.parent / "shared.safetensors"
    weights.rename(inside)
    weights.symlink_to(inside)
    assert read_checkpoint(checkpoint_copy).model_id == "copy"

    outside = tmp_path / "elsewhere.safetensors"
    inside.rename(outside)
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(
        CheckpointError, match=rf"{weights}: a symbolic link to {outside}, outside the watched folder .*cp -rL"
    ):
        read_checkpoint(checkpoint_copy)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"config\.json: empty file \(0 bytes\)"),
        ("[1, 2]", r"config\.json: holds a JSON list, not the object"),
        ('{"model_type": "llama", "num_attention_heads": 0}', r"num_attention_heads=0: sizes must be positive"),
    ],
)
def test_config_json_that_is_not_a_config(checkpoint_copy, content, message):
    (checkpoint_copy / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(checkpoint_copy)


def test_a_shard_missing_from_its_index_is_named(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").rename(checkpoint_copy / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: names model-00002-of-00002\.safetensors, missing"):
        read_checkpoint(checkpoint_copy)


def test_a_truncated_torch_file_fails_before_torch_reads_it(checkpoint_copy):
    import torch
    from safetensors.torch import load_file

    weights = checkpoint_copy / "model.safetensors"
    torch.save(load_file(weights), checkpoint_copy / "pytorch_model.bin")
    weights.unlink()
    cut = checkpoint_copy / "pytorch_model.bin"
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch \(torch\.save\) file"):
        read_checkpoint(checkpoint_copy)


def edit_tensors(checkpoint_dir, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, checkpoint_dir / "model.safetensors", metadata={"format": "pt"})


UP_PROJ = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(UP_PROJ), rf"no tensor '{UP_PROJ}', which it needs"),
        (
            lambda t: t.update({"model.layers.4.self_attn.o_proj.weight": t["model.norm.weight"].clone()}),
            r"1 tensor\(s\) it does not use: model\.layers\.4\.self_attn\.o_proj\.weight\. .*num_hidden_layers",
        ),
        (
            lambda t: t.update({UP_PROJ: t[UP_PROJ][:10].clone()}),
            rf"'{UP_PROJ}' \(in model\.safetensors\) has shape \[10, 128\] where config\.json implies \[384, 128\]",
        ),
    ],
    ids=["missing", "extra", "misshapen"],
)
def test_tensors_that_do_not_fit_the_config_are_named_with_their_file(checkpoint_copy, edit, message):
    edit_tensors(checkpoint_copy, edit)
    weights = checkpoint_copy / "model.safetensors"
    with pytest.raises(CheckpointError, match=rf"^{weights}: weights do not match config\.json .*{message}"):
        load_float_model(read_checkpoint(checkpoint_copy), kv_cache_len=128)


def test_tensors_no_model_needs_are_accepted(checkpoint_copy):
    """RoPE frequencies (older transformers saved them) and a tied LM head's copy of the embedding."""
    edit_tensors(
        checkpoint_copy,
        lambda t: t.update(
            {
                "lm_head.weight": t["model.embed_tokens.weight"].clone(),
                "model.layers.0.self_attn.rotary_emb.inv_freq": t["model.norm.weight"][:16].clone(),
            }
        ),
    )
    load_float_model(read_checkpoint(checkpoint_copy), kv_cache_len=128)


def test_mapped_tensors_are_the_files_tensors_and_their_pages_are_released(tmp_path):
    """The export reads a checkpoint as views of its mapped pages (export/load.py): every dtype a checkpoint holds,
    an empty tensor among them, reads as safetensors itself reads it, and a release drops the pages read."""
    import torch
    from safetensors.torch import load_file, save_file

    from edge_quant_pipeline.export.load import _Weights

    torch.manual_seed(0)
    tensors = {
        "embed.weight": torch.randn(4096, 1024).to(torch.bfloat16),  # 8 MB
        "norm.weight": torch.randn(1024),
        "half": torch.randn(3, 5).half(),
        "positions": torch.arange(7),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    file = tmp_path / "model.safetensors"
    save_file(tensors, file)
    weights = _Weights([file], tied_lm_head=False)
    mapped = weights(str(tmp_path))
    expected = load_file(file)
    assert mapped.keys() == expected.keys()
    for name, tensor in expected.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name

    def resident_file_kb() -> int:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssFile:"))

    weights.release()
    before = resident_file_kb()
    mapped["embed.weight"].float().sum()  # reads its 8 MB of pages
    read = resident_file_kb()
    weights.release()
    assert read - before > 4000 and resident_file_kb() < read - 4000


def test_a_multimodal_checkpoint_counts_its_language_models_parameters(tmp_path):
    """Gemma 4 as Google ships it: the towers (and their projections into the language model) are never loaded."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {
        "model.language_model.layers.0.mlp.up_proj.weight": np.zeros((4, 5), np.float32),
        "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight": np.zeros((7, 3), np.float32),
        "model.audio_tower.layers.0.norm.weight": np.zeros(11, np.float32),
        "model.embed_vision.embedding_projection.weight": np.zeros(13, np.float32),
        "model.embed_audio.embedding_projection.weight": np.zeros(17, np.float32),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert count_parameters(tmp_path, {"model_type": "gemma4"}) == 20
