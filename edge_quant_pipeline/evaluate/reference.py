"""The eval text as windows of tokens, and what the float PyTorch model does on them.

The float reference is a folder, written once per checkpoint and read by every recipe's evaluation:

- ``logits.npy``: the PyTorch model's logits at every position of every window, float32 exactly as torch
  computed them, shape (windows, window_len, vocab). It is written a window at a time and read a chunk of
  positions at a time, with plain file reads (no memory map, whose pages would count towards the reader's
  RSS), so memory holds one window's logits at most, whatever the number of windows or the vocabulary;
- ``tokens.npz``: the windows' tokens, the generation prompts and the model's greedy continuations;
- ``summary.json``: the float model's perplexity over the windows and their token count, written last.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_quant_pipeline.atomic import atomic_path
from edge_quant_pipeline.checkpoints.validate import TOKENIZER_FILE
from edge_quant_pipeline.evaluate.metrics import target_nll_sum
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.workstore import SharedFiles

LOGITS_FILE, TOKENS_FILE, SUMMARY_FILE = "logits.npy", "tokens.npz", "summary.json"
GENERATION_PROMPTS = 4
GENERATION_TOKENS = 64


class EvalTextError(ValueError):
    """The eval text cannot be scored with this checkpoint; the message names the file and the fix."""


def tokenize(text_path: Path, checkpoint_dir: Path, vocab_size: int) -> np.ndarray:
    """With the checkpoint's ``tokenizer.json`` when it has one; byte-level otherwise (the demo model)."""
    if not text_path.is_file():
        raise EvalTextError(f"{text_path}: the eval text does not exist. Set EDGE_QUANT_EVAL_TEXT to a text file.")
    tokenizer_file = checkpoint_dir / TOKENIZER_FILE
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        return np.array(Tokenizer.from_file(str(tokenizer_file)).encode(text_path.read_text()).ids, np.int32)
    if vocab_size < 256:
        raise EvalTextError(
            f"{checkpoint_dir}: no tokenizer.json, and a vocabulary of {vocab_size} is too small for byte-level "
            "evaluation. Save the model's tokenizer next to it (tokenizer.save_pretrained)."
        )
    return np.frombuffer(text_path.read_bytes(), dtype=np.uint8).astype(np.int32)


def eval_windows(tokens: np.ndarray, window_len: int, max_tokens: int, text_path: Path) -> np.ndarray:
    """Non-overlapping windows of ``window_len`` tokens, shape (windows, window_len)."""
    usable = min(len(tokens), max_tokens) // window_len * window_len
    if usable == 0:
        raise EvalTextError(
            f"{text_path}: {len(tokens)} tokens with this checkpoint's tokenizer (eval_max_tokens {max_tokens}); "
            f"evaluation needs at least {window_len} (one window of kv_cache_len tokens). Use a longer text."
        )
    return tokens[:usable].reshape(-1, window_len)


def generation_length(settings: ExportSettings) -> int:
    return min(GENERATION_TOKENS, settings.kv_cache_len - settings.prefill_len)


_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class FloatReference:
    """The float reference folder, and the float model's perplexity over its windows."""

    path: Path
    perplexity: float
    eval_tokens: int
    shared: SharedFiles | None = None  # where the next step finds it, when steps share no disk (workstore.py)

    @classmethod
    def load(cls, path: Path) -> "FloatReference":
        """The reference a ``float_reference`` step left in ``path``."""
        try:
            summary = json.loads((path / SUMMARY_FILE).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no float reference for these settings; materialize float_reference first (edge-quant run "
                "makes it, unless --convert-only)."
            ) from None
        return cls(path, summary["perplexity"], summary["eval_tokens"])

    def tokens(self) -> dict[str, np.ndarray]:
        """``windows``, ``prompts`` and ``continuations``: small integer arrays."""
        with np.load(self.path / TOKENS_FILE) as data:
            return {key: data[key] for key in data.files}

    @contextmanager
    def logits(self) -> Iterator["StoredLogits"]:
        """The stored float logits, open for reading a few positions at a time."""
        with (self.path / LOGITS_FILE).open("rb") as stream:
            yield StoredLogits(stream)


class StoredLogits:
    """Reads rows of the (windows, positions, vocab) float32 ``.npy`` with plain reads."""

    def __init__(self, stream):
        self.stream = stream
        version = np.lib.format.read_magic(stream)
        self.shape, _, self.dtype = _READ_HEADER[version](stream)
        self.offset = stream.tell()

    def rows(self, window: int, start: int, count: int) -> np.ndarray:
        """Positions ``start ... start + count - 1`` of ``window``, shape (count, vocab)."""
        _, positions, vocab = self.shape
        self.stream.seek(self.offset + (window * positions + start) * vocab * self.dtype.itemsize)
        return np.fromfile(self.stream, dtype=self.dtype, count=count * vocab).reshape(count, vocab)


class _LogitsWriter:
    """Writes a (windows, positions, vocab) float32 ``.npy`` one window at a time."""

    def __init__(self, stream, shape: tuple[int, int, int]):
        self.stream = stream
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(stream, header)

    def write(self, window_logits: np.ndarray) -> None:
        np.ascontiguousarray(window_logits, dtype=np.float32).tofile(self.stream)


def float_window_logits(model, model_config, window: np.ndarray, kv_cache_len: int) -> np.ndarray:
    """The PyTorch model's logits at every position of one window, from an empty KV cache, (len, vocab) float32."""
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils

    cache = kv_utils.KVCache.from_model_config(kv_cache_len, model_config)
    with torch.inference_mode():
        positions = torch.arange(len(window), dtype=torch.int)
        return model(torch.from_numpy(window)[None].int(), positions, cache)["logits"][0].float().numpy()


@dataclass
class RebuiltModel:
    """The float model as litert-torch's Generative API rebuilt it (what ``generative_api`` exports)."""

    model: Any
    model_config: Any
    kv_cache_len: int

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        return float_window_logits(self.model, self.model_config, window, self.kv_cache_len)

    def greedy(self, prompts: np.ndarray, length: int) -> np.ndarray:
        """Greedy continuations with the model's KV cache, as the interpreter's ``greedy`` does; the prompts go
        as one batch, so decoding reads the weights once per step for all of them."""
        import torch
        from litert_torch.generative.layers import kv_cache as kv_utils

        cache = kv_utils.KVCache.from_model_config(self.kv_cache_len, self.model_config, batch_size=len(prompts))
        tokens = []
        with torch.inference_mode():
            positions = torch.arange(prompts.shape[1], dtype=torch.int)
            out = self.model(torch.from_numpy(prompts).int(), positions, cache)
            for pos in range(prompts.shape[1], prompts.shape[1] + length):
                tokens.append(out["logits"][:, -1].argmax(-1).int())
                out = self.model(tokens[-1][:, None], torch.tensor([pos], dtype=torch.int), out["kv_cache"])
        return torch.stack(tokens, dim=1).numpy().astype(np.int32)


@dataclass
class TransformersModel:
    """The float model as transformers runs it, in float32 (what ``export_hf`` exports)."""

    model: Any  # a transformers PreTrainedModel for causal LM

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(window)[None].long()).logits[0].float().numpy()

    def greedy(self, prompts: np.ndarray, length: int) -> np.ndarray:
        import torch

        tokens = []
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(prompts).long(), use_cache=True)
            for _ in range(length):
                tokens.append(out.logits[:, -1].argmax(-1))
                out = self.model(input_ids=tokens[-1][:, None], cache=out.cache, use_cache=True)
        return torch.stack(tokens, dim=1).numpy().astype(np.int32)


class FloatModel(Protocol):
    def window_logits(self, window: np.ndarray) -> np.ndarray: ...

    def greedy(self, prompts: np.ndarray, length: int) -> np.ndarray: ...


def build_float_reference(
    float_model: FloatModel, windows: np.ndarray, settings: ExportSettings, output: Path
) -> FloatReference:
    """Run the float model over every window (teacher-forced) and greedily from a few prompts; save both."""
    nll, targets = 0.0, 0
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / LOGITS_FILE) as partial, partial.open("wb") as stream:
        writer = None
        for window in windows:
            logits = float_model.window_logits(window)
            writer = writer or _LogitsWriter(stream, (len(windows), *logits.shape))
            writer.write(logits)
            window_nll, window_targets = target_nll_sum(logits, window)
            nll, targets = nll + window_nll, targets + window_targets
    prompts = windows[:GENERATION_PROMPTS, : settings.prefill_len]
    continuations = float_model.greedy(prompts, generation_length(settings))
    with atomic_path(output / TOKENS_FILE) as partial:
        np.savez(partial, windows=windows, prompts=prompts, continuations=continuations)
    reference = FloatReference(output, float(np.exp(nll / targets)), int(windows.size))
    with atomic_path(output / SUMMARY_FILE) as partial:
        partial.write_text(json.dumps({"perplexity": reference.perplexity, "eval_tokens": reference.eval_tokens}))
    return reference
