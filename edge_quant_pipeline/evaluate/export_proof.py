"""The proof, per checkpoint, that an export computes what transformers computes, for a family no test here covers.

A checkpoint of a family that neither the Generative API rebuild nor the ``export_hf`` families proven by
``tests/test_export_hf.py`` take goes through ``export_hf``'s generic path: transformers' own modeling code with
litert-torch's attention and KV cache swapped in. Nothing here has shown that this is right for that family, so
every such export proves it before any recipe uses it: the same probe tokens go through transformers' own float32
model and through the exported file in the LiteRT interpreter, a whole KV cache of them (so every sliding window
shorter than it is crossed), twice (as teacher-forced scoring runs the file, and as the runtime generates: prefill,
then decode), and the largest logit difference must stay within ``RELATIVE_TOLERANCE`` of the largest logit; a NaN
fails it. The proven families differ by about 1e-6 of it (2e-6 on logits of about 3); a wrong op (a scale left
out, another RoPE) moves logits by a tenth of their size or more.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.evaluate.reference import TransformersModel
from edge_quant_pipeline.export.load import load_transformers_model
from edge_quant_pipeline.memory import return_freed_memory
from edge_quant_pipeline.runtime.session import InterpreterSession
from edge_quant_pipeline.shapes import ExportSettings

RELATIVE_TOLERANCE = 1e-4
_PROBE_SEED = 0


@dataclass(frozen=True)
class ExportProof:
    """How far the exported file's logits are from transformers' on the probe, and where the farthest are."""

    max_abs_diff: float
    logit_scale: float  # the largest |logit| transformers' model gave on the probe
    position: int  # of the largest difference
    computed_by: str  # how the file computed that position's logits: "prefill", "decode", "decode after prefill"
    first_failing: int | None  # the first position whose difference is above the tolerance
    positions: int  # probe tokens

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE * self.logit_scale

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        where = f"at position {self.position} ({self.computed_by}) of {self.positions} probe tokens"
        failing = self.first_failing
        first = f", first above the tolerance at position {failing}" if failing is not None else ""
        return (
            f"largest |logit difference| {self.max_abs_diff:.3g} {where}{first}; tolerance {RELATIVE_TOLERANCE:g} x "
            f"the largest |logit| {self.logit_scale:.3g} = {self.tolerance:.3g}"
        )

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "export_proof": self.describe(),
            "export_proof_max_abs_diff": self.max_abs_diff,
            "export_proof_tolerance": self.tolerance,
        }


def probe_tokens(vocab_size: int, settings: ExportSettings) -> np.ndarray:
    """A whole KV cache of random tokens: every position the file computes, past any sliding window shorter."""
    return np.random.default_rng(_PROBE_SEED).integers(0, vocab_size, settings.kv_cache_len, dtype=np.int32)


def prove_export(checkpoint: Checkpoint, tflite: Path, settings: ExportSettings, num_threads: int) -> ExportProof:
    """Compare ``tflite`` with transformers' own model of ``checkpoint``; the two are never in memory together."""
    tokens = probe_tokens(checkpoint.vocab_size, settings)
    model = TransformersModel(load_transformers_model(checkpoint))
    expected = model.window_logits(tokens)
    del model
    gc.collect()
    return_freed_memory()
    with InterpreterSession(tflite, settings, num_threads=num_threads) as session:
        passes = [_decoded(session, tokens), _generated(session, tokens)]
    return _compare(expected, passes)


@dataclass(frozen=True)
class _Pass:
    logits: np.ndarray  # (positions computed, vocab)
    first: int  # the position of its first row
    computed_by: list[str]  # per row


def _decoded(session: InterpreterSession, tokens: np.ndarray) -> _Pass:
    """Every position as teacher-forced scoring computes it (``score_chunks``: prefill chunks where prefill gives
    logits, decode otherwise)."""
    chunks = list(session.score_chunks(tokens))
    labels = [("prefill" if len(logits) > 1 else "decode") for _, logits in chunks for _ in logits]
    return _Pass(np.concatenate([logits for _, logits in chunks]), 0, labels)


def _generated(session: InterpreterSession, tokens: np.ndarray) -> _Pass:
    """Positions as generation computes them: one prefill, then decode on the cache prefill wrote. Without
    prefill logits, the prompt's last token is decoded again (it writes the same cache entry), as ``greedy`` does."""
    p, scores = session.prefill_len, session.prefill_scores
    prefilled = session.prefill(tokens[:p])
    start = p if scores else p - 1
    rows = [prefilled] if scores else []
    rows += [session.decode(int(tokens[pos]), pos)[None] for pos in range(start, len(tokens))]
    labels = ["prefill"] * (p if scores else 0) + ["decode after prefill"] * (len(tokens) - start)
    return _Pass(np.concatenate(rows), 0 if scores else start, labels)


def _compare(expected: np.ndarray, passes: list[_Pass]) -> ExportProof:
    """The largest difference over both passes; a NaN the file computed counts as infinitely far."""
    scale = float(np.abs(expected).max())
    worst, failing = (0.0, 0, ""), set()
    for run in passes:
        diffs = np.nan_to_num(np.abs(run.logits - expected[run.first :]).max(axis=-1), nan=np.inf)
        row = int(diffs.argmax())
        if diffs[row] >= worst[0]:
            worst = (float(diffs[row]), run.first + row, run.computed_by[row])
        failing |= {run.first + int(i) for i in np.flatnonzero(diffs > RELATIVE_TOLERANCE * scale)}
    return ExportProof(
        max_abs_diff=worst[0],
        logit_scale=scale,
        position=worst[1],
        computed_by=worst[2],
        first_failing=min(failing, default=None),
        positions=len(expected),
    )
