"""Fidelity of a candidate's next-token distributions to the float model's, accumulated window by window.

Like llama.cpp's KL-divergence mode, nothing of size tokens x vocabulary is ever held: each window's
logits are folded into running sums, in float64 and a few rows at a time, and only one float32 KL value
per position is kept (for its percentiles). What is scored, per window of ``n`` tokens ``t_0 ... t_{n-1}``
with logits ``l_0 ... l_{n-1}`` (``l_i`` predicts ``t_{i+1}``):

- KL(float || candidate) and top-1 agreement: at every position ``i`` (``n`` per window);
- perplexity and the change in the probability of the true next token: at ``i < n-1`` (``n-1`` per window);
- logit SQNR: over every logit of every position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Rows of a (positions, vocab) block converted to float64 at once: about 32 MB per array.
_BLOCK_ELEMENTS = 1 << 22


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _row_blocks(rows: int, vocab: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // vocab)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def target_nll_sum(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    """Sum of -log p(t_{i+1}) over the positions of one window that have a next token, and their count."""
    total = 0.0
    for rows in _row_blocks(len(tokens) - 1, logits.shape[-1]):
        log_probs = log_softmax(logits[rows])
        total -= float(np.take_along_axis(log_probs, tokens[1:][rows, None], axis=-1).sum())
    return total, len(tokens) - 1


@dataclass(frozen=True)
class Fidelity:
    """Teacher-forced agreement with the float model over the same windows."""

    perplexity: float
    perplexity_ratio: float  # vs the PyTorch float model
    mean_kl: float  # KL(float || candidate) of next-token distributions, nats
    p99_kl: float
    max_kl: float
    top1_agreement: float  # fraction of positions whose most likely token matches float's
    delta_p_correct: float  # mean change in the probability of the true next token
    logits_sqnr_db: float  # signal-to-quantization-noise ratio of the logits


@dataclass
class FidelityAccumulator:
    """Running sums over windows; ``add`` one window's logits at a time, then ``result``."""

    nll: float = 0.0
    targets: int = 0
    delta_p: float = 0.0
    top1_matches: int = 0
    signal: float = 0.0
    noise: float = 0.0
    kl: list[np.ndarray] = field(default_factory=list)  # float32, one value per position

    def add(self, logits: np.ndarray, reference: np.ndarray, tokens: np.ndarray) -> None:
        """One window: candidate and float logits of shape (len(tokens), vocab), and its tokens."""
        for rows in _row_blocks(len(tokens), logits.shape[-1]):
            self._add_block(logits[rows], reference[rows], tokens[rows][1:], tokens[rows.stop : rows.stop + 1])

    def _add_block(self, logits: np.ndarray, reference: np.ndarray, next_in_block, next_after) -> None:
        # Targets: the next token of every row but a window's last, which has none.
        targets = np.concatenate([next_in_block, next_after])
        log_p, log_q = log_softmax(reference), log_softmax(logits)
        p = np.exp(log_p)
        self.kl.append(np.maximum((p * (log_p - log_q)).sum(axis=-1), 0.0).astype(np.float32))
        self.top1_matches += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        scored = np.arange(len(targets))
        self.nll -= float(log_q[scored, targets].sum())
        self.delta_p += float((np.exp(log_q[scored, targets]) - p[scored, targets]).sum())
        self.targets += len(targets)
        reference64 = reference.astype(np.float64)
        self.signal += float(np.square(reference64).sum())
        self.noise += float(np.square(logits.astype(np.float64) - reference64).sum())

    def result(self, reference_perplexity: float) -> Fidelity:
        kl = np.concatenate(self.kl).astype(np.float64)
        perplexity = float(np.exp(self.nll / self.targets))
        return Fidelity(
            perplexity=perplexity,
            perplexity_ratio=perplexity / reference_perplexity,
            mean_kl=float(kl.mean()),
            p99_kl=float(np.percentile(kl, 99)),
            max_kl=float(kl.max()),
            top1_agreement=self.top1_matches / len(kl),
            delta_p_correct=self.delta_p / self.targets,
            logits_sqnr_db=float(10 * np.log10(self.signal / self.noise)) if self.noise else float("inf"),
        )


def perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
    """exp of the mean next-token negative log-likelihood over windows (logits: windows x positions x vocab)."""
    sums = [target_nll_sum(w_logits, w_tokens) for w_logits, w_tokens in zip(logits, windows, strict=True)]
    return float(np.exp(sum(s for s, _ in sums) / sum(n for _, n in sums)))


def compare(logits: np.ndarray, reference: np.ndarray, windows: np.ndarray) -> Fidelity:
    """The accumulator over arrays already in memory (small models and tests)."""
    accumulator = FidelityAccumulator()
    for w_logits, w_reference, w_tokens in zip(logits, reference, windows, strict=True):
        accumulator.add(w_logits, w_reference, w_tokens)
    return accumulator.result(perplexity(reference, windows))


@dataclass(frozen=True)
class GenerationAgreement:
    """Free-running greedy decoding compared token by token with the float model's."""

    agreement: float  # fraction of generated tokens equal to float's at the same position
    first_divergence: float  # mean index of the first differing token (= length if none)
    min_first_divergence: int


def compare_generation(tokens: np.ndarray, reference: np.ndarray) -> GenerationAgreement:
    same = tokens == reference
    first = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    return GenerationAgreement(float(same.mean()), float(np.mean(first)), int(min(first)))
