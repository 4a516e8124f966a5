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

import hashlib
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_quant_pipeline.architectures import Architecture, ModelShape, architecture_for, language_config
from edge_quant_pipeline.exporters import GENERATIVE_API

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILE = "tokenizer.json"  # what evaluation tokenizes with and bundles carry
UNREADABLE = "unreadable-"  # the start of the version of a checkpoint that fails the cheap checks (look_again)
# Dagster multi-partition keys use "|" as a separator and refuse "..." in any partition key.
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+|\.{2,}")
ID_RULE = "letters, digits, '_', '-' and single '.' of ASCII; every other run of characters becomes '-'"
# Tensors a checkpoint may hold that no model needs: RoPE frequencies (older transformers saved
# them) and, when the LM head is tied to the embedding, a copy of the embedding under its name.
_RECOMPUTED_SUFFIX = "rotary_emb.inv_freq"
_TIED_HEAD = "lm_head.weight"
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
# torch's load_state_dict error for one tensor (litert-torch's name for it, then both shapes).
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(.*?)\]\)"
)


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


@dataclass(frozen=True)
class RefusedFolder:
    """A folder of the watched directory that cannot become a model; ``reason`` names it and the fix."""

    path: Path
    model_id: str | None  # the id it would share with another folder, if any
    reason: str


@dataclass(frozen=True)
class CheckpointScan:
    found: dict[str, Path]  # usable checkpoint folders by model id
    refused: list[RefusedFolder]

    def refusal_for(self, model_id: str) -> str | None:
        return next((r.reason for r in self.refused if r.model_id == model_id), None)


def model_id_for(checkpoint_dir: Path) -> str:
    """A partition-key-safe name: Dagster multi-partition keys use ``|`` as a separator."""
    model_id = _UNSAFE_ID_CHARS.sub("-", checkpoint_dir.name).strip("-.")
    if not model_id:
        raise CheckpointError(
            f"{checkpoint_dir}: no model id can be made from this folder name (ids keep {ID_RULE}). "
            "Rename the folder, for example to model-1."
        )
    return model_id


def _holds_config(folder: Path) -> bool:
    """Raises OSError for a folder that cannot be looked into (permissions)."""
    return folder.is_dir() and (folder / "config.json").is_file()


def scan_checkpoints(root: Path) -> CheckpointScan:
    """Every direct subfolder of ``root`` that holds a ``config.json``: usable ones by model id, and the
    ones refused because their name makes no id, or the same id as another folder's."""
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: checkpoint directory does not exist. Set EDGE_QUANT_CHECKPOINT_DIR to a "
            "directory holding one folder per checkpoint."
        )
    by_id: dict[str, list[Path]] = {}
    refused: list[RefusedFolder] = []
    for folder in sorted(root.iterdir()):
        try:
            if _holds_config(folder):
                by_id.setdefault(model_id_for(folder), []).append(folder)
        except CheckpointError as error:
            refused.append(RefusedFolder(folder, None, str(error)))
        except OSError as error:
            reason = f"{folder}: cannot be read ({error.strerror}); fix its permissions."
            refused.append(RefusedFolder(folder, None, reason))
    for model_id, folders in by_id.items():
        if len(folders) > 1:  # picking one would silently publish the other's weights under this id
            names = " and ".join(repr(f.name) for f in folders)
            reason = (
                f"{root}: folders {names} both make the model id {model_id!r} ({ID_RULE}); neither is converted. "
                "Rename all but one of them."
            )
            refused += [RefusedFolder(folder, model_id, reason) for folder in folders]
    return CheckpointScan({m: f[0] for m, f in by_id.items() if len(f) == 1}, refused)


def find_checkpoints(root: Path) -> dict[str, Path]:
    """The usable checkpoint folders of ``root`` by model id (see ``scan_checkpoints`` for the refused ones)."""
    return scan_checkpoints(root).found


@dataclass(frozen=True)
class SeenCheckpoint:
    """A checkpoint folder as a watcher saw it last."""

    signature: str  # names, sizes and mtimes of its files
    content_hash: str | None = None  # its version, once the signature held still between two looks
    problem: str | None = None  # why it fails the checks that read no tensor data


def folder_signature(path: Path) -> str:
    """Raises OSError when a file vanishes between listing and stat."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return json.dumps([(f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def look_again(path: Path, previous: SeenCheckpoint | None) -> SeenCheckpoint:
    """The folder now. It gets a version once its files held still since ``previous``: the sha256 of its bytes
    once the checks that read no tensor data pass; else (it may be GBs of garbage) ``UNREADABLE`` and a hash of
    its signature, with the problem, so its run, which fails at the `checkpoint` step with the reason, is
    requested once per state of the folder. Raises OSError when a file vanishes while it is read."""
    signature = folder_signature(path)
    if previous is None or previous.signature != signature:
        return SeenCheckpoint(signature)  # still being written, or just appeared
    if previous.content_hash:
        return previous
    try:
        validate_checkpoint(path)
    except CheckpointError as error:
        return SeenCheckpoint(signature, UNREADABLE + hashlib.sha256(signature.encode()).hexdigest()[:16], str(error))
    return SeenCheckpoint(signature, hash_checkpoint(path))


def file_sha256(path: Path) -> str | None:
    """None when there is no such file."""
    try:
        with path.open("rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def hash_checkpoint(checkpoint_dir: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order.

    Raises OSError when a file cannot be read or vanishes while it is read.
    """
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


def count_parameters(checkpoint_dir: Path, hf_config: dict[str, Any]) -> int:
    """From the safetensors headers (exact, no tensor data read); a ``.bin`` checkpoint by its size and the
    dtype config.json names."""
    from safetensors import safe_open

    files = weight_files(checkpoint_dir)
    if files[0].suffix != ".safetensors":
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        return sum(f.stat().st_size for f in files) // _BYTES_PER_ELEMENT.get(dtype, 4)
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
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


def architecture_of(checkpoint: Checkpoint) -> Architecture:
    return architecture_for(checkpoint.hf_config, checkpoint.path / "config.json")


class _Weights:
    """A loader for litert-torch that reads exactly ``files`` (its own globs every ``*.bin`` in the folder,
    which takes in e.g. the ``training_args.bin`` the transformers Trainer leaves beside the weights) and
    remembers each tensor's file, so a tensor that is missing, unused or of the wrong shape is reported
    with its file rather than as a torch traceback."""

    def __init__(self, files: list[Path], tied_lm_head: bool):
        self.files, self.tied_lm_head = files, tied_lm_head
        self.origin: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        # litert-torch pops every tensor it uses from this dict: what is left, nothing uses.
        self.state: dict[str, Any] = {}

    def __call__(self, _checkpoint_path: str) -> dict[str, Any]:
        for file in self.files:
            tensors = {n: t for n, t in self._read(file).items() if not self._needed_by_no_model(n)}
            self.origin.update(dict.fromkeys(tensors, file))
            self.shapes.update({name: tuple(tensor.shape) for name, tensor in tensors.items()})
            self.state.update(tensors)
        return self.state

    def _needed_by_no_model(self, name: str) -> bool:
        return name.endswith(_RECOMPUTED_SUFFIX) or (self.tied_lm_head and name == _TIED_HEAD)

    @staticmethod
    def _read(file: Path) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file

        try:
            if file.suffix == ".safetensors":
                return load_file(file)
            state = torch.load(file, map_location="cpu", weights_only=True)
            return state.get("model_state_dict", state)  # a training loop's layout, which litert-torch accepts
        except Exception as error:  # safetensors, pickle and zip errors have no common base
            raise CheckpointError(
                f"{file}: cannot be read ({type(error).__name__}: {error}). Re-save or re-copy it."
            ) from None

    def names(self) -> str:
        return ", ".join(str(f) for f in self.files)

    def misshapen(self, error: Exception) -> list[str]:
        """Each tensor torch refused, by its checkpoint name when exactly one used tensor has that shape
        (litert-torch renames tensors, and fuses some), else by litert-torch's name."""
        found = []
        for internal, shape, expected in _SIZE_MISMATCH.findall(str(error)):
            dims = tuple(int(d) for d in shape.split(", ") if d)
            used = [n for n, s in self.shapes.items() if s == dims and n not in self.state]
            name = f"{used[0]!r} (in {self.origin[used[0]].name})" if len(used) == 1 else internal
            found.append(f"{name} has shape [{shape}] where config.json implies [{expected}]")
        return found

    def unused_by_file(self) -> dict[Path, list[str]]:
        unused: dict[Path, list[str]] = {}
        for name in self.state:
            unused.setdefault(self.origin[name], []).append(name)
        return unused


def _listing(items: list[str], limit: int = 3) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _weights_error(checkpoint: Checkpoint, weights: _Weights, error: Exception | None) -> CheckpointError | None:
    """What is wrong, per file and tensor, after litert-torch built the model (``error`` None) or failed to."""
    model_type = checkpoint.hf_config.get("model_type")
    mismatch = f"weights do not match config.json (a {model_type!r} model)"
    fix = "Check that config.json belongs to these weights"
    if isinstance(error, KeyError):  # litert-torch looks each tensor it needs up by name
        return CheckpointError(f"{weights.names()}: {mismatch}: no tensor {error.args[0]!r}, which it needs. {fix}.")
    if unused := weights.unused_by_file():
        return CheckpointError(
            "\n".join(
                f"{file}: {mismatch}: {len(names)} tensor(s) it does not use: {_listing(names)}. "
                f"{fix} (for example num_hidden_layers)."
                for file, names in unused.items()
            )
        )
    if error is None:
        return None
    detail = _listing(weights.misshapen(error)) or f"{type(error).__name__}: {error}"
    return CheckpointError(f"{weights.names()}: {mismatch}: {detail}. {fix}.")


def load_float_model(checkpoint: Checkpoint, kv_cache_len: int):
    """Rebuild the checkpoint as a litert-torch ``DecoderOnlyModel`` (float32, eval mode).

    ``kv_cache_len`` sizes the causal-mask cache, which must cover the KV cache
    used at export and evaluation time. Every tensor must be used: an extra one
    means config.json describes a different (e.g. shallower) model.
    """
    from litert_torch.generative.utilities import model_builder

    architecture = architecture_of(checkpoint)
    if kv_cache_len > architecture.model_config.max_seq_len:
        raise CheckpointError(
            f"{checkpoint.path}: a KV cache of {kv_cache_len} tokens is longer than the "
            f"{architecture.model_config.max_seq_len} tokens this model attends over (max_position_embeddings; "
            "sliding_window for a family whose window litert-torch does not model; original_max_position_embeddings "
            "for LongRoPE); use a shorter kv_cache_len."
        )
    weights = _Weights(weight_files(checkpoint.path), architecture.tied_lm_head)
    try:
        model = model_builder.build_decoder_only_model(
            str(checkpoint.path),
            architecture.model_config,
            architecture.tensor_names,
            model_class=architecture.model_class,
            custom_loader=weights,
            mask_cache_size=kv_cache_len,
        )
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError) as error:
        raise _weights_error(checkpoint, weights, error) from None
    if problem := _weights_error(checkpoint, weights, None):
        raise problem
    return model


def load_transformers_model(checkpoint: Checkpoint):
    """transformers' own model of the checkpoint in float32, with eager attention (its reference math): the
    float model of a checkpoint that ``export_hf`` exports."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{checkpoint.path}: transformers cannot load this checkpoint: {error}") from None
    return model.eval()
