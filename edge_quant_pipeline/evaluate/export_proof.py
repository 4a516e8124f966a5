"""The proof, per checkpoint, that an export computes what transformers computes, for a family no test here covers.

A checkpoint of a family that neither the Generative API rebuild nor the ``export_hf`` families proven by
``tests/test_export_hf.py`` take goes through ``export_hf``'s generic path: transformers' own modeling code with
litert-torch's attention and KV cache swapped in. Nothing here has shown that this is right for that family, so
every such export proves it before any recipe uses it: the same probe tokens go through transformers' own float32
model and through the exported file in the LiteRT interpreter, twice (one decode call per token from an empty
cache, and as the runtime generates: prefill, then decode), and the largest logit difference must stay within
``RELATIVE_TOLERANCE`` of the largest logit. The proven families differ by about 1e-6 of it (2e-6 on logits of
about 3); a wrong op (a scale left out, another RoPE) moves logits by a tenth of their size or more.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.evaluate.reference import TransformersModel
from edge_quant_pipeline.export.load import load_transformers_model
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
    """Two prefill chunks of random tokens (at most the KV cache): both signatures, and positions past prefill."""
    length = min(settings.kv_cache_len, 2 * settings.prefill_len)
    return np.random.default_rng(_PROBE_SEED).integers(0, vocab_size, length, dtype=np.int32)


def prove_export(checkpoint: Checkpoint, tflite: Path, settings: ExportSettings, num_threads: int) -> ExportProof:
    """Compare ``tflite`` with transformers' own model of ``checkpoint``; the two are never in memory together."""
    tokens = probe_tokens(checkpoint.vocab_size, settings)
    model = TransformersModel(load_transformers_model(checkpoint))
    expected = model.window_logits(tokens)
    del model
    gc.collect()
    with InterpreterSession(tflite, settings, num_threads=num_threads) as session:
        passes = [_decoded(session, tokens), _generated(session, tokens)]
    return _compare(expected, passes)


def _decoded(session: InterpreterSession, tokens: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Every position as teacher-forced scoring computes it (``score``: prefill chunks where prefill gives
    logits, decode otherwise)."""
    labels = ["prefill" if session.prefill_scores else "decode"] * len(tokens)
    return session.score(tokens), labels


def _generated(session: InterpreterSession, tokens: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Positions as generation computes them: one prefill, then decode on the cache prefill wrote. Without
    prefill logits, the prompt's last token is decoded again (it writes the same cache entry), as ``greedy`` does."""
    p = session.prefill_len
    prefilled = session.prefill(tokens[:p])
    start = p if prefilled is not None else p - 1
    rows = [session.decode(int(tokens[pos]), pos)[None] for pos in range(start, len(tokens))]
    logits = np.full((len(tokens), rows[0].shape[-1]), np.nan, np.float32)  # positions it does not compute
    logits[start:] = np.concatenate(rows)
    if prefilled is not None:
        logits[:p] = prefilled
    return logits, ["prefill"] * start + ["decode after prefill"] * (len(tokens) - start)


def _compare(expected: np.ndarray, passes: list[tuple[np.ndarray, list[str]]]) -> ExportProof:
    scale = float(np.abs(expected).max())
    per_pass = [np.nan_to_num(np.abs(logits - expected).max(axis=-1), nan=0.0) for logits, _ in passes]
    worst_pass = int(np.argmax([d.max() for d in per_pass]))
    diffs, labels = per_pass[worst_pass], passes[worst_pass][1]
    position = int(diffs.argmax())
    failing = np.flatnonzero(np.maximum.reduce(per_pass) > RELATIVE_TOLERANCE * scale)
    return ExportProof(
        max_abs_diff=float(diffs[position]),
        logit_scale=scale,
        position=position,
        computed_by=labels[position],
        first_failing=int(failing[0]) if failing.size else None,
        positions=len(expected),
    )
