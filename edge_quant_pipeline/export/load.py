"""A checkpoint loaded as the float PyTorch model an exporter takes: litert-torch's rebuild from its own layers,
or transformers' own model; a tensor that is missing, unused or of the wrong shape is named with its file."""

from __future__ import annotations

import json
import mmap
import re
import warnings
from pathlib import Path
from typing import Any

from edge_quant_pipeline.checkpoints.validate import Checkpoint, CheckpointError, weight_files
from edge_quant_pipeline.export.architectures import Architecture, architecture_for
from edge_quant_pipeline.export.exporters import per_layer_embeddings

# Tensors a checkpoint may hold that no model needs: RoPE frequencies (older transformers saved
# them) and, when the LM head is tied to the embedding, a copy of the embedding under its name.
_RECOMPUTED_SUFFIX = "rotary_emb.inv_freq"
_TIED_HEAD = "lm_head.weight"
# How much of the float32 model is loaded between two releases of the checkpoint's mapped pages (about half as
# many bytes of a bfloat16 checkpoint stay mapped at most).
_RELEASE_EVERY_BYTES = 512 * 2**20
# safetensors' dtype names, as torch names them; a file with another (float8...) is read whole instead.
_SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# torch's load_state_dict error for one tensor (litert-torch's name for it, then both shapes).
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(.*?)\]\)"
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
        self.maps: list[mmap.mmap] = []
        self.loaded_bytes = 0  # of float32 parameters, since the mapped pages were last released
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

    def _read(self, file: Path) -> dict[str, Any]:
        import torch

        try:
            if file.suffix == ".safetensors":
                return self._mapped(file)
            state = torch.load(file, map_location="cpu", weights_only=True)
            return state.get("model_state_dict", state)  # a training loop's layout, which litert-torch accepts
        except Exception as error:  # safetensors, pickle and zip errors have no common base
            raise CheckpointError(
                f"{file}: cannot be read ({type(error).__name__}: {error}). Re-save or re-copy it."
            ) from None

    def _mapped(self, file: Path) -> dict[str, Any]:
        """The file's tensors as views of its pages, mapped read-only: nothing is copied until the model's
        float32 parameters take them, and ``release`` hands the pages read so far back (the checkpoint's bytes
        never sit in memory beside the whole float32 model)."""
        import torch
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(file, "pt"):  # checks the header and that every tensor lies within the file
            pass
        with file.open("rb") as handle:
            pages = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        start = 8 + int.from_bytes(pages[:8], "little")
        entries = {n: e for n, e in json.loads(pages[8:start]).items() if n != "__metadata__"}
        if any(e["dtype"] not in _SAFETENSORS_DTYPES for e in entries.values()):
            return load_file(file)
        self.maps.append(pages)
        tensors = {}
        for name, entry in entries.items():
            dtype = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            if begin == end:
                tensors[name] = torch.empty(entry["shape"], dtype=dtype)
                continue
            with warnings.catch_warnings():  # read-only on purpose: the model copies, nobody writes
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                view = torch.frombuffer(pages, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
            tensors[name] = view.reshape(entry["shape"])
        return tensors

    def loaded(self, module: Any, _incompatible_keys: Any) -> None:
        """A ``load_state_dict`` post-hook: once the modules loaded since the last release hold
        ``_RELEASE_EVERY_BYTES`` of parameters, release the pages (each release walks the whole mapping)."""
        self.loaded_bytes += sum(p.nbytes for p in module.parameters(recurse=False))
        if self.loaded_bytes >= _RELEASE_EVERY_BYTES:
            self.release()

    def release(self) -> None:
        """Drop the mapped pages from this process's memory (they stay in the page cache, read again if used)."""
        for pages in self.maps:
            pages.madvise(mmap.MADV_DONTNEED)
        self.loaded_bytes = 0

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
    from litert_torch.generative.utilities import loader as loading_utils

    architecture = architecture_of(checkpoint)
    if kv_cache_len > architecture.model_config.max_seq_len:
        raise CheckpointError(
            f"{checkpoint.path}: a KV cache of {kv_cache_len} tokens is longer than the "
            f"{architecture.model_config.max_seq_len} tokens this model attends over (max_position_embeddings; "
            "sliding_window for a family whose window litert-torch does not model; original_max_position_embeddings "
            "for LongRoPE); use a shorter kv_cache_len."
        )
    weights = _Weights(weight_files(checkpoint.path), architecture.tied_lm_head)
    config = architecture.model_config
    try:
        # model_builder.build_decoder_only_model, with the mapped pages released as each module takes its weights
        model = architecture.model_class(config, kv_cache_len)
        hooks = [module.register_load_state_dict_post_hook(weights.loaded) for module in model.modules()]
        loading_utils.ModelLoader(str(checkpoint.path), architecture.tensor_names, weights).load(
            model, strict=not config.lm_head_share_weight_with_embedding
        )
        for hook in hooks:
            hook.remove()
        weights.release()
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError) as error:
        raise _weights_error(checkpoint, weights, error) from None
    if problem := _weights_error(checkpoint, weights, None):
        raise problem
    return model.eval()


def load_transformers_model(checkpoint: Checkpoint):
    """transformers' own model of the checkpoint in float32, with eager attention (its reference math): the
    float model of a checkpoint that ``export_hf`` exports."""
    try:
        model = load_language_model(checkpoint.path, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{checkpoint.path}: transformers cannot load this checkpoint: {error}") from None
    return model.eval()


def load_language_model(path: Path | str, load=None, config=None, **kwargs):
    """transformers' causal LM of the checkpoint in float32, as the pipeline exports it: a multimodal checkpoint's
    vision and audio towers are not built (only its language model is exported), and a per-layer embedding table
    (Gemma 4 E2B's is 262,144 x 8,960) stays in the checkpoint's dtype, half its float32 size: the rows looked up
    from it are exactly the float32 table's (a bfloat16 value is a float32 one; its scale, a power of two,
    multiplies exactly). ``load``: the ``from_pretrained`` to call (litert-torch's, in ``export/hf.py``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(path)
    for tower in ("vision_config", "audio_config"):
        if getattr(config, tower, None) is not None:
            setattr(config, tower, None)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "torch_dtype")}
    if not per_layer_embeddings(config.to_dict()):
        return (load or AutoModelForCausalLM.from_pretrained)(path, config=config, dtype=torch.float32, **kwargs)
    # Loaded as stored, then cast to float32 tensor by tensor but for the table: the float32 table never exists.
    # (As stored: config.json's dtype, read from the file, since litert-torch sets the config's to float32.)
    model = (load or AutoModelForCausalLM.from_pretrained)(path, config=config, dtype=_stored_dtype(path), **kwargs)
    table = per_layer_table(model)
    table._apply = lambda fn, recurse=True: table  # .float() leaves it as loaded
    model.float()
    del table._apply  # (a cycle through the module, which would keep it past the model's end until a collection)
    for module in model.modules():  # a scale made at init in the load's dtype: Gemma's sqrt(hidden) in float32
        if hasattr(module, "scalar_embed_scale") and module is not table:
            module.embed_scale = torch.tensor(module.scalar_embed_scale, dtype=torch.float32)
    return model


def _stored_dtype(path: Path | str):
    import torch

    stored = json.loads((Path(path) / "config.json").read_text())
    text = stored.get("text_config") or stored
    name = next((c.get(k) for c in (text, stored) for k in ("dtype", "torch_dtype") if c.get(k)), "float32")
    return getattr(torch, name)


def per_layer_table(model):
    """Gemma 4's per-layer embedding lookup (E2B, E4B), or None."""
    return next((m for name, m in model.named_modules() if name.endswith("embed_tokens_per_layer")), None)
