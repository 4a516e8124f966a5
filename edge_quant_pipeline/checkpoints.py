"""Find, validate, hash and load checkpoints in the Hugging Face layout.

A checkpoint is a directory holding ``config.json`` and its weights
(``*.safetensors`` or ``pytorch_model*.bin``, either one file or the shards
``save_pretrained`` writes next to an index). Its identity for the pipeline is
the directory name, made safe for a Dagster partition key, and its version is
a hash of the bytes of every file in it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_quant_pipeline.architectures import Architecture, ModelShape, architecture_for

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint on disk, identified by the hash of its bytes."""

    model_id: str
    path: Path
    content_hash: str
    hf_config: dict[str, Any]
    # Set by the `checkpoint` asset once litert-torch accepted the architecture, so later
    # steps can validate recipes without importing litert-torch (and torch) again.
    shape: ModelShape | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])


def model_id_for(checkpoint_dir: Path) -> str:
    """A partition-key-safe name: Dagster multi-partition keys use ``|`` as a separator."""
    model_id = _UNSAFE_ID_CHARS.sub("-", checkpoint_dir.name).strip("-.")
    if not model_id:
        raise CheckpointError(f"{checkpoint_dir}: cannot derive a model id from this directory name; rename it.")
    return model_id


def find_checkpoints(root: Path) -> dict[str, Path]:
    """Every direct subdirectory of ``root`` that holds a ``config.json``, by model id."""
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: checkpoint directory does not exist. Set EDGE_QUANT_CHECKPOINT_DIR to a "
            "directory holding one folder per checkpoint."
        )
    return {model_id_for(d): d for d in sorted(root.iterdir()) if (d / "config.json").is_file()}


def hash_checkpoint(checkpoint_dir: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in checkpoint_dir.rglob("*") if p.is_file()):
        digest.update(file.relative_to(checkpoint_dir).as_posix().encode() + b"\0")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files if there are any, else the ``.bin`` ones: like transformers, and because a
    folder holding both has the same weights twice."""
    for pattern in WEIGHT_PATTERNS:
        if files := sorted(checkpoint_dir.glob(pattern)):
            return files
    return []


def _state_dict_loader(files: list[Path]) -> Callable[[str], dict[str, Any]]:
    """Reads exactly ``files``: litert-torch's own loader globs every ``*.bin`` in the folder, which
    takes in e.g. the ``training_args.bin`` that the transformers Trainer leaves beside the weights."""

    def load(_checkpoint_path: str) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for file in files:
            if file.suffix == ".safetensors":
                state.update(load_file(file))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        return state

    return load


def _read_config(checkpoint_dir: Path) -> dict[str, Any]:
    config_path = checkpoint_dir / "config.json"
    try:
        return json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{config_path}: missing. A checkpoint needs the config.json that save_pretrained writes."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error}). Re-save the checkpoint.") from None


def _check_safetensors_header(path: Path) -> None:
    """Read only the header, so a truncated or corrupt file fails here and not deep in torch."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own SafetensorError and OSErrors
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}). Re-save or re-copy it.") from None


def read_checkpoint(checkpoint_dir: Path) -> Checkpoint:
    """Validate the layout and hash the bytes. Cheap (no torch): sensors and rebuild plans call it;
    ``architecture_of`` then checks that litert-torch can rebuild the model."""
    hf_config = _read_config(checkpoint_dir)
    weights = weight_files(checkpoint_dir)
    if not weights:
        raise CheckpointError(
            f"{checkpoint_dir}: no weights found (expected {' or '.join(WEIGHT_PATTERNS)} next to config.json)."
        )
    for path in weights:
        if path.suffix == ".safetensors":
            _check_safetensors_header(path)
    return Checkpoint(
        model_id=model_id_for(checkpoint_dir),
        path=checkpoint_dir,
        content_hash=hash_checkpoint(checkpoint_dir),
        hf_config=hf_config,
    )


def architecture_of(checkpoint: Checkpoint) -> Architecture:
    return architecture_for(checkpoint.hf_config, checkpoint.path / "config.json")


def load_float_model(checkpoint: Checkpoint, kv_cache_len: int):
    """Rebuild the checkpoint as a litert-torch ``DecoderOnlyModel`` (float32, eval mode).

    ``kv_cache_len`` sizes the causal-mask cache, which must cover the KV cache
    used at export and evaluation time.
    """
    from litert_torch.generative.utilities import model_builder

    architecture = architecture_of(checkpoint)
    if kv_cache_len > architecture.model_config.max_seq_len:
        raise CheckpointError(
            f"{checkpoint.path}: a KV cache of {kv_cache_len} tokens is longer than the "
            f"{architecture.model_config.max_seq_len} tokens this model attends over (max_position_embeddings, or "
            "sliding_window for a family whose window litert-torch does not model); use a shorter kv_cache_len."
        )
    try:
        return model_builder.build_decoder_only_model(
            str(checkpoint.path),
            architecture.model_config,
            architecture.tensor_names,
            model_class=architecture.model_class,
            custom_loader=_state_dict_loader(weight_files(checkpoint.path)),
            mask_cache_size=kv_cache_len,
        )
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{checkpoint.path}: weights do not match config.json for a {checkpoint.hf_config.get('model_type')!r} "
            f"model ({type(error).__name__}: {error}). Check that config.json belongs to these weights."
        ) from None
