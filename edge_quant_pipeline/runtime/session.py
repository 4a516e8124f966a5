"""One ``.tflite`` in the LiteRT runtime: its prefill and decode signatures, with the KV cache carried from
call to call as an on-device runtime carries it.

It runs on LiteRT's ``CompiledModel`` API (XNNPACK on the CPU), as LiteRT-LM does, with an XNNPACK weight
cache: the weights are packed once, into memory that both signatures share. Without it (the legacy
``Interpreter``) each signature packs its own copy, and a float model needs about three times its file size
in memory (6.1 GB for a 2 GB file, against 2.5 GB here). The cache is XNNPACK's in-memory file (``:memory``),
not a file on disk: one on disk was as large as the packed model (9 GB for a float Gemma 4 E2B, unlinked but
held open, beside the work folder's files: it filled the disk), for the same peak RSS (the SmolLM2-135M shape's
float file: 0.99 GB either way, loaded in 0.9 s against 1.4 s).

The KV cache stays in the runtime's buffers: each call writes the updated cache into a second set of
buffers, which the next call reads (the two sets swap), so no cache is copied through Python.

A Generative API export writes the KV cache at ``input_pos`` (a dynamic update slice starting at
``input_pos[0]``) and takes its causal mask rows at ``input_pos``, so its prefill signature scores any
``prefill_len`` consecutive tokens at any offset of the cache: teacher-forced scoring needs one call per
``prefill_len`` tokens, not one per token.

An ``export_hf`` export differs in what its signatures take and give, read from the file: a ``mask`` input
(added to the attention scores) and a prefill that returns no logits, only the KV cache (the runtime samples
from decode). There, every position is scored through decode, one token per call, as a phone generates.
Where the embedding lookups are files of their own (``embedders.py``), they run first, on the tokens, and
the model takes their outputs instead of the tokens.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge_quant_pipeline.embedders import EMBEDDER_INPUTS, embedders_of, signature_for
from edge_quant_pipeline.memory import return_freed_memory
from edge_quant_pipeline.shapes import ExportSettings

# XNNPACK's weight cache in an in-memory file (memfd): shared by the signatures, never on disk (module docstring).
WEIGHT_CACHE = ":memory"


class RuntimeRejectedError(RuntimeError):
    """The LiteRT runtime could not prepare or run the model."""


def causal_mask(positions: np.ndarray, cache_len: int) -> np.ndarray:
    """The ``mask`` input of an ``export_hf`` signature, (1, 1, len(positions), cache_len): 0 where a query may
    attend a cache slot (at or before its own position), the most negative float32 elsewhere. A model's
    sliding window is applied inside the graph, on top of this."""
    allowed = np.arange(cache_len)[None] <= positions[:, None]
    return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]


class Embedders:
    """The embedders beside a model (``embedders.py``), in the LiteRT interpreter: tokens in, the model's
    embedding inputs out. Without embedders, the model takes the tokens themselves."""

    def __init__(self, tflite: Path, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreters = {
            role: Interpreter(model_path=str(path), num_threads=num_threads)
            for role, path in embedders_of(tflite).items()
        }
        self._runners: dict[tuple[str, int], object] = {}

    def inputs(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        if not self._interpreters:
            return {"tokens": tokens[None].astype(np.int32)}
        return {EMBEDDER_INPUTS[role]: self._run(role, tokens) for role in self._interpreters}

    def _run(self, role: str, tokens: np.ndarray) -> np.ndarray:
        key = (role, len(tokens))
        if key not in self._runners:
            self._runners[key] = self._interpreters[role].get_signature_runner(signature_for(role, len(tokens)))
        return self._runners[key](token_ids=tokens[None].astype(np.int32))["embeddings"]


class _NativeStderr:
    """LiteRT's C++ runtime logs accelerator registration and teardown to file descriptor 2 around every model
    it loads and runs; this keeps that out of the terminal and the run logs, and keeps its error lines for the
    messages of the errors they explain."""

    def __init__(self):
        self._sink = tempfile.TemporaryFile(mode="w+")

    @contextmanager
    def captured(self) -> Iterator[None]:
        saved = os.dup(2)
        os.dup2(self._sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def errors(self) -> str:
        self._sink.seek(0)
        return " ".join(line for line in self._sink.read().splitlines() if "ERROR" in line)


class _Signature:
    """One signature's input and output buffers, by name."""

    def __init__(self, model, key: str):
        self.key, self.index = key, model.get_signature_index(key)
        names = model.get_signature_list()[key]
        self.inputs = dict(zip(names["inputs"], model.create_input_buffers(self.index), strict=True))
        self.outputs = dict(zip(names["outputs"], model.create_output_buffers(self.index), strict=True))
        self.input_shapes = {n: d["shape"] for n, d in model.get_input_tensor_details(key).items()}
        outputs = model.get_output_tensor_details(key)
        self.logits_shape = tuple(outputs["logits"]["shape"]) if "logits" in outputs else None


class InterpreterSession:
    """Prefill and decode signatures of one ``.tflite``, with the KV cache carried between calls."""

    def __init__(self, tflite: Path, settings: ExportSettings, num_threads: int):
        from ai_edge_litert import cpu_options, options
        from ai_edge_litert.compiled_model import CompiledModel

        self.tflite, self.prefill_len = tflite, settings.prefill_len
        self._stderr = _NativeStderr()
        cpu = cpu_options.CpuOptions(num_threads=num_threads, xnnpack_weight_cache_path=WEIGHT_CACHE)
        with self._stderr.captured():
            try:
                self._model = CompiledModel.from_file(str(tflite), options=options.Options(cpu_options=cpu))
                self._prefill = _Signature(self._model, settings.prefill_signature)
                self._decode = _Signature(self._model, "decode")
                self._embedders = Embedders(tflite, num_threads)
            except (RuntimeError, ValueError) as error:
                raise RuntimeRejectedError(
                    f"LiteRT could not prepare {tflite}: {error} {self._stderr.errors()}"
                ) from error
        kv_names = [name for name in self._prefill.outputs if name.startswith("kv_cache_")]
        self._kv = {name: self._prefill.outputs.pop(name) for name in kv_names}  # the cache as it is now
        self._spare = {name: self._decode.outputs.pop(name) for name in kv_names}  # where the next call writes
        self._zeros = {name: np.zeros(self._prefill.input_shapes[name], np.float32) for name in kv_names}

    def __enter__(self) -> "InterpreterSession":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the model, its packed weights and buffers now rather than whenever Python collects them, and
        hand the memory back to the kernel (glibc would keep it for reuse: 3.2 GB after a 0.5B model's session)."""
        with self._stderr.captured():
            self._prefill = self._decode = self._kv = self._spare = self._model = self._embedders = None
        return_freed_memory()

    def reset(self) -> None:
        """An empty KV cache: the state before a sequence starts."""
        with self._stderr.captured():
            for name, zeros in self._zeros.items():
                self._kv[name].write(zeros)

    @property
    def prefill_scores(self) -> bool:
        """Whether prefill returns logits for every position it takes (Generative API exports do)."""
        shape = self._prefill.logits_shape
        return shape is not None and shape[1] == self.prefill_len

    def _run(self, signature: _Signature, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
        shape, logits = signature.logits_shape, None
        try:
            with self._stderr.captured():
                token_inputs = self._embedders.inputs(tokens)
                for name, values in token_inputs.items():
                    signature.inputs[name].write(values.reshape(signature.input_shapes[name]))
                signature.inputs["input_pos"].write(positions.astype(np.int32))
                if "mask" in signature.inputs:
                    signature.inputs["mask"].write(causal_mask(positions, int(signature.input_shapes["mask"][-1])))
                names = [n for n in ("input_pos", "mask", *token_inputs) if n in signature.inputs]
                inputs = {**{n: signature.inputs[n] for n in names}, **self._kv}
                self._model.run_by_name(signature.key, inputs, {**signature.outputs, **self._spare})
                if shape is not None:
                    logits = signature.outputs["logits"].read(math.prod(shape), np.float32).reshape(shape)[0]
        except (RuntimeError, ValueError) as error:
            raise RuntimeRejectedError(
                f"LiteRT failed to run {self.tflite}: {error} {self._stderr.errors()}"
            ) from error
        self._kv, self._spare = self._spare, self._kv
        return logits

    def prefill(self, tokens: np.ndarray, start: int = 0) -> np.ndarray | None:
        """Logits for ``prefill_len`` tokens at positions ``start...``, shape (prefill_len, vocab), where the
        signature gives them (``prefill_scores``). ``start`` 0 begins a new sequence; a later start continues the
        one in the KV cache."""
        if start == 0:
            self.reset()
        return self._run(self._prefill, tokens, np.arange(start, start + self.prefill_len))

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._run(self._decode, np.array([token]), np.array([position]))[0]

    def score_chunks(self, tokens: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Teacher-forced logits for every position of one sequence, as (first position, logits) per call: whole
        chunks of ``prefill_len`` through prefill, the rest (fewer than ``prefill_len``) through decode, one
        token each; all of them through decode where prefill gives no logits."""
        p = self.prefill_len
        chunked = len(tokens) // p * p if self.prefill_scores else 0
        if chunked == 0:
            self.reset()
        for start in range(0, chunked, p):
            yield start, self.prefill(tokens[start : start + p], start)
        for pos in range(chunked, len(tokens)):
            yield pos, self.decode(int(tokens[pos]), pos)[None]

    def score(self, tokens: np.ndarray) -> np.ndarray:
        """All of ``score_chunks`` at once, shape (len(tokens), vocab)."""
        return np.concatenate([logits for _, logits in self.score_chunks(tokens)])

    def greedy(self, prompt: np.ndarray, length: int) -> np.ndarray:
        """``length`` tokens generated greedily after a ``prefill_len``-token prompt, through decode."""
        logits, tokens = self.prefill(prompt), []
        # Without prefill logits, decode the prompt's last token again: it writes the same KV cache entry.
        logits = logits[-1] if logits is not None else self.decode(int(prompt[-1]), len(prompt) - 1)
        for pos in range(len(prompt), len(prompt) + length):
            tokens.append(int(logits.argmax()))
            logits = self.decode(tokens[-1], pos)
        return np.array(tokens, dtype=np.int32)
