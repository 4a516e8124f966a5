"""A checkpoint loaded as the float PyTorch model an exporter takes: litert-torch's rebuild from its own layers,
or transformers' own model; a tensor that is missing, unused or of the wrong shape is named with its file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edge_quant_pipeline.checkpoints.validate import Checkpoint, CheckpointError, weight_files
from edge_quant_pipeline.export.architectures import Architecture, architecture_for

# Tensors a checkpoint may hold that no model needs: RoPE frequencies (older transformers saved
# them) and, when the LM head is tied to the embedding, a copy of the embedding under its name.
_RECOMPUTED_SUFFIX = "rotary_emb.inv_freq"
_TIED_HEAD = "lm_head.weight"
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
