"""Find, validate, hash and load checkpoints in the Hugging Face layout.

A checkpoint is a directory holding ``config.json`` and its weights
(``*.safetensors`` or ``pytorch_model*.bin``, either one file or the shards
``save_pretrained`` writes next to an index). Its identity for the pipeline is
the directory name, made safe for a Dagster partition key, and its version is
a hash of the bytes of every file in it.

People and training jobs write into the watched folder, so everything here
expects bad input: each problem is a ``CheckpointError`` naming the file and the
fix, and one bad folder never hides the others.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_quant_pipeline.checkpoints.digest import file_sha256, hash_checkpoint
from edge_quant_pipeline.settings import GENERATIVE_API
from edge_quant_pipeline.shapes import ModelShape

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILE = "tokenizer.json"  # what evaluation tokenizes with and bundles carry
UNREADABLE = "unreadable-"  # the start of the version of a checkpoint that fails the cheap checks (look_again)
# Dagster multi-partition keys use "|" as a separator and refuse "..." in any partition key.
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+|\.{2,}")
ID_RULE = "letters, digits, '_', '-' and single '.' of ASCII; every other run of characters becomes '-'"
# config.json fields that size the model: a string or a zero here would surface deep in torch.
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def language_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields: config.json's own, or its ``text_config``'s for a multimodal checkpoint
    (Gemma 4 as Google ships it: ``Gemma4ForConditionalGeneration``, which may hold no vision or audio tower)."""
    return hf_config.get("text_config") or hf_config


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
    exporter: str = GENERATIVE_API  # set with ``shape``: exporters.plan_export
    # False for a family no test here covers (export_hf's generic path): each of its exports is proven
    # (evaluate/export_proof.py)
    proven_family: bool = True
    parameters: int = 0  # counted from the weight files' headers (0: read before they were counted)
    # sha256 of tokenizer.json, which evaluation and bundles tokenize with; None: none (byte-level, or read before
    # it was hashed). Covered by ``content_hash`` too; kept apart so the manifest can say which tokenizer it was.
    tokenizer_hash: str | None = None

    @property
    def work_key(self) -> str:
        """The folder of this version's intermediate files; the two exporters' files never mix."""
        return self.content_hash[:16] + ("" if self.exporter == GENERATIVE_API else f"-{self.exporter}")

    @property
    def vocab_size(self) -> int:
        return int(language_config(self.hf_config)["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(language_config(self.hf_config).get("num_hidden_layers", 1))

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in weight_files(self.path))


def model_id_for(checkpoint_dir: Path) -> str:
    """A partition-key-safe name: Dagster multi-partition keys use ``|`` as a separator."""
    model_id = _UNSAFE_ID_CHARS.sub("-", checkpoint_dir.name).strip("-.")
    if not model_id:
        raise CheckpointError(
            f"{checkpoint_dir}: no model id can be made from this folder name (ids keep {ID_RULE}). "
            "Rename the folder, for example to model-1."
        )
    return model_id


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files if there are any, else the ``.bin`` ones: like transformers, and because a
    folder holding both has the same weights twice."""
    for pattern in WEIGHT_PATTERNS:
        if files := sorted(checkpoint_dir.glob(pattern)):
            return files
    return []


def _check_links(checkpoint_dir: Path) -> None:
    """Everything a checkpoint is made of must live in the folder the pipeline watches: a link out of it
    would make the pipeline read, hash and publish files nobody put there, and change behind its back."""
    root = checkpoint_dir.parent.resolve()
    for path in (checkpoint_dir, *checkpoint_dir.rglob("*")):
        if not path.is_symlink():
            continue
        try:
            target = path.resolve()
        except RuntimeError:  # a loop of links
            target = None
        if target is None or not target.is_relative_to(root):
            what = f"a symbolic link to {target}, outside the watched folder {root}" if target else "a loop of links"
            raise CheckpointError(
                f"{path}: {what}. Links out of the watched folder are refused; replace the link with a copy of what "
                "it points to (cp -rL)."
            )


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a folder, pipe or broken link); put the file itself here.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); the copy or save did not finish. Copy or save it again.")


def _read_config(checkpoint_dir: Path) -> dict[str, Any]:
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        raise CheckpointError(
            f"{config_path}: missing. A checkpoint needs the config.json that save_pretrained writes."
        )
    _check_file(config_path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error}). Re-save the checkpoint.") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path}: holds a JSON {type(config).__name__}, not the object save_pretrained writes. "
            "Re-save the checkpoint."
        )
    if bad := [f"{k}={config[k]!r}" for k in _SIZE_FIELDS if config.get(k) is not None and not _is_size(config[k])]:
        raise CheckpointError(
            f"{config_path}: {', '.join(bad)}: sizes must be positive integers. Re-save the checkpoint."
        )
    return config


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_index(checkpoint_dir: Path) -> None:
    """A sharded checkpoint whose copy is not finished lacks shards its index names."""
    for index in checkpoint_dir.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"{index}: not a shard index with a weight_map ({type(error).__name__}: {error}). "
                "Re-save the checkpoint."
            ) from None
        if missing := sorted(s for s in shards if not (checkpoint_dir / s).is_file()):
            raise CheckpointError(
                f"{index}: names {', '.join(missing)}, missing from {checkpoint_dir}. Copy the missing shards."
            )


def _check_weight_file(path: Path) -> None:
    """Read only the header (safetensors) or the zip directory at the end (torch.save), so a truncated
    or corrupt file fails here in milliseconds, whatever its size, and not deep in torch."""
    _check_file(path)
    size = path.stat().st_size
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                handle.keys()
        else:
            zipfile.ZipFile(path).close()
    except Exception as error:  # safetensors raises its own SafetensorError; zipfile BadZipFile and OSErrors
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch (torch.save)"
        raise CheckpointError(
            f"{path}: not a readable {kind} file ({size:,} bytes; {error}): truncated or corrupt, "
            "for example by a copy that did not finish. Re-save or re-copy it."
        ) from None


def validate_checkpoint(checkpoint_dir: Path) -> dict[str, Any]:
    """Every check that reads no tensor data (links, config.json, weight files, shard index, headers);
    returns the parsed config.json. Cheap whatever the checkpoint's size: the sensor runs it before hashing.
    Raises OSError when a file vanishes while it is checked."""
    _check_links(checkpoint_dir)
    hf_config = _read_config(checkpoint_dir)
    weights = weight_files(checkpoint_dir)
    if not weights:
        raise CheckpointError(
            f"{checkpoint_dir}: no weights found (expected {' or '.join(WEIGHT_PATTERNS)} next to config.json)."
        )
    _check_index(checkpoint_dir)
    for path in weights:
        _check_weight_file(path)
    return hf_config


_BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


# A multimodal checkpoint's encoders (Gemma 4's vision and audio towers and their projections): the pipeline
# exports its language model only, and never loads these.
_ENCODER_WEIGHTS = re.compile(r"(^|\.)(vision_tower|audio_tower|embed_vision|embed_audio)\.")


def count_parameters(checkpoint_dir: Path, hf_config: dict[str, Any]) -> int:
    """The language model's, from the safetensors headers (exact, no tensor data read; a multimodal checkpoint's
    encoders not counted); a ``.bin`` checkpoint by its size and the dtype config.json names."""
    from safetensors import safe_open

    files = weight_files(checkpoint_dir)
    if files[0].suffix != ".safetensors":
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        return sum(f.stat().st_size for f in files) // _BYTES_PER_ELEMENT.get(dtype, 4)
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            names = [name for name in handle.keys() if not _ENCODER_WEIGHTS.search(name)]
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
    return total


def read_checkpoint(checkpoint_dir: Path) -> Checkpoint:
    """Validate the layout, then hash the bytes. No torch: sensors and rebuild plans call it;
    ``architecture_of`` then checks that litert-torch can rebuild the model."""
    try:
        hf_config = validate_checkpoint(checkpoint_dir)
        parameters = count_parameters(checkpoint_dir, hf_config)
        content_hash = hash_checkpoint(checkpoint_dir)
    except OSError as error:  # a file vanished or changed while it was read, or permissions
        raise CheckpointError(
            f"{error.filename or checkpoint_dir}: could not be read ({error.strerror}). If the checkpoint is still "
            "being written, this passes once it holds still; otherwise fix the file's permissions."
        ) from None
    return Checkpoint(
        model_id=model_id_for(checkpoint_dir),
        path=checkpoint_dir,
        content_hash=content_hash,
        hf_config=hf_config,
        parameters=parameters,
        tokenizer_hash=file_sha256(checkpoint_dir / TOKENIZER_FILE),
    )
