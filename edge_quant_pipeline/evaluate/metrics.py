"""Fidelity of a candidate's next-token distributions to the float model's, accumulated chunk by chunk.

Like llama.cpp's KL-divergence mode, nothing of size tokens x vocabulary is ever held: the logits of a few
positions at a time are folded into running sums, in float64, and only one float32 KL value per position is
kept (for its percentiles). What is scored, per window of ``n`` tokens ``t_0 ... t_{n-1}``
with logits ``l_0 ... l_{n-1}`` (``l_i`` predicts ``t_{i+1}``):

- KL(float || candidate) and top-1 agreement: at every position ``i`` (``n`` per window);
- perplexity and the change in the probability of the true next token: at ``i < n-1`` (``n-1`` per window);
- logit SQNR: over every logit of every position.

Each mean comes with its standard error, as llama.cpp's ``--kl-divergence`` reports them: the error of a mean over
``n`` values is their standard deviation over sqrt(n - 1); the perplexity ratio's is propagated from the mean of
per-token log ratios (exp(mean) x its error), top-1 agreement's is binomial, and the RMS of Δp's from the mean of
Δp². Positions are treated as independent samples, which neighbouring tokens of one text are not quite: the errors
say whether two recipes differ beyond the noise of this text, not how they would score on another.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# Rows of a (positions, vocab) block converted to float64 at once: about 32 MB per array.
_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(rows: int, vocab: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // vocab)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _logsumexp(logits64: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: log(sum(exp(l))), and exp(l - max) with its row sums (the probabilities, undivided)."""
    peak = logits64.max(axis=-1, keepdims=True)
    shifted = np.exp(logits64 - peak)
    total = shifted.sum(axis=-1)
    return np.log(total) + peak[:, 0], shifted, total


def target_nll_sum(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    """Sum of -log p(t_{i+1}) over the positions of one window that have a next token, and their count."""
    total, targets = 0.0, tokens[1:]
    for rows in _row_blocks(len(targets), logits.shape[-1]):
        block = logits[rows].astype(np.float64)
        lse, _, _ = _logsumexp(block)
        total -= float((block[np.arange(len(block)), targets[rows]] - lse).sum())
    return total, len(targets)


def mean_error(total: float, squares: float, n: int) -> float:
    """The standard error of a mean from the sum of ``n`` values and of their squares (0 for fewer than 2)."""
    if n < 2:
        return 0.0
    mean = total / n
    return math.sqrt(max(squares / n - mean * mean, 0.0) / (n - 1))


@dataclass(frozen=True)
class Fidelity:
    """Teacher-forced agreement with the float model over the same windows; ``*_error``: standard errors."""

    perplexity: float
    perplexity_ratio: float  # vs the PyTorch float model
    perplexity_ratio_error: float
    mean_kl: float  # KL(float || candidate) of next-token distributions, nats
    mean_kl_error: float
    median_kl: float
    p99_kl: float
    p999_kl: float
    max_kl: float
    top1_agreement: float  # fraction of positions whose most likely token matches float's
    top1_agreement_error: float
    delta_p_correct: float  # mean change in the probability of the true next token
    delta_p_correct_error: float
    rms_delta_p: float  # root mean square of that change
    rms_delta_p_error: float
    logits_sqnr_db: float  # signal-to-quantization-noise ratio of the logits


@dataclass(frozen=True)
class _BlockSums:
    kl: np.ndarray
    top1_matches: int
    nll: float
    reference_nll: float
    log_ratio_squares: float  # sum of (log p - log q)^2 of the true next tokens
    delta_p: float
    delta_p_squares: float
    delta_p_fourths: float
    targets: int
    signal: float
    noise: float


def _block_sums(logits: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> _BlockSums:
    # With lse = log(sum(exp(l))): log p = l_ref - lse_ref and log q = l - lse, so
    # KL(p || q) = sum p * (l_ref - l) - (lse_ref - lse): no array of log-probabilities is made.
    reference64, logits64 = reference.astype(np.float64), logits.astype(np.float64)
    lse_p, p_undivided, p_total = _logsumexp(reference64)
    lse_q, _, _ = _logsumexp(logits64)
    difference = reference64 - logits64
    kl = np.einsum("ij,ij->i", p_undivided, difference) / p_total - (lse_p - lse_q)
    scored = np.arange(len(targets))
    log_q_true = logits64[scored, targets] - lse_q[scored]
    log_p_true = reference64[scored, targets] - lse_p[scored]
    delta_p = np.exp(log_q_true) - np.exp(log_p_true)
    return _BlockSums(
        kl=np.maximum(kl, 0.0).astype(np.float32),
        top1_matches=int((logits.argmax(-1) == reference.argmax(-1)).sum()),
        nll=-float(log_q_true.sum()),
        reference_nll=-float(log_p_true.sum()),
        log_ratio_squares=float(np.square(log_p_true - log_q_true).sum()),
        delta_p=float(delta_p.sum()),
        delta_p_squares=float(np.square(delta_p).sum()),
        delta_p_fourths=float(np.power(delta_p, 4).sum()),
        targets=len(targets),
        signal=float(np.einsum("ij,ij->", reference64, reference64)),
        noise=float(np.einsum("ij,ij->", difference, difference)),
    )


@dataclass
class FidelityAccumulator:
    """Running sums; ``add`` the logits of some consecutive positions at a time (a chunk), then ``result``."""

    nll: float = 0.0
    reference_nll: float = 0.0  # the float model's, on the same positions
    log_ratio_squares: float = 0.0
    targets: int = 0
    delta_p: float = 0.0
    delta_p_squares: float = 0.0
    delta_p_fourths: float = 0.0
    top1_matches: int = 0
    signal: float = 0.0
    noise: float = 0.0
    kl: list[np.ndarray] = field(default_factory=list)  # float32, one value per position

    def add(self, logits: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> None:
        """Candidate and float logits of shape (positions, vocab), and the true next token of each position that
        has one: all of them, or all but the last when the chunk ends its window."""
        blocks = [(logits[rows], reference[rows], targets[rows]) for rows in _row_blocks(len(logits), logits.shape[-1])]
        if len(blocks) == 1:
            sums = [_block_sums(*blocks[0])]
        else:  # numpy releases the GIL in its loops: blocks side by side on the cores
            with ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1)) as pool:
                sums = list(pool.map(lambda block: _block_sums(*block), blocks))
        for block in sums:
            self.kl.append(block.kl)
            self.top1_matches += block.top1_matches
            self.nll += block.nll
            self.reference_nll += block.reference_nll
            self.log_ratio_squares += block.log_ratio_squares
            self.delta_p += block.delta_p
            self.delta_p_squares += block.delta_p_squares
            self.delta_p_fourths += block.delta_p_fourths
            self.targets += block.targets
            self.signal += block.signal
            self.noise += block.noise

    def add_window(self, logits: np.ndarray, reference: np.ndarray, tokens: np.ndarray) -> None:
        """All positions of one window at once."""
        self.add(logits, reference, tokens[1:])

    def result(self, reference_perplexity: float | None = None) -> Fidelity:
        """``reference_perplexity``: the float model's on the same positions; by default from the reference logits
        that were added."""
        kl = np.concatenate(self.kl).astype(np.float64)
        n, positions = self.targets, len(kl)
        perplexity = float(np.exp(self.nll / n))
        if reference_perplexity is None:
            reference_perplexity = float(np.exp(self.reference_nll / n))
        ratio = perplexity / reference_perplexity
        top1 = self.top1_matches / positions
        rms_dp = math.sqrt(self.delta_p_squares / n)
        median, p99, p999 = np.percentile(kl, [50, 99, 99.9])
        return Fidelity(
            perplexity=perplexity,
            perplexity_ratio=ratio,
            perplexity_ratio_error=ratio * mean_error(self.nll - self.reference_nll, self.log_ratio_squares, n),
            mean_kl=float(kl.mean()),
            mean_kl_error=mean_error(float(kl.sum()), float(np.square(kl).sum()), positions),
            median_kl=float(median),
            p99_kl=float(p99),
            p999_kl=float(p999),
            max_kl=float(kl.max()),
            top1_agreement=top1,
            top1_agreement_error=math.sqrt(top1 * (1 - top1) / (positions - 1)) if positions > 1 else 0.0,
            delta_p_correct=self.delta_p / n,
            delta_p_correct_error=mean_error(self.delta_p, self.delta_p_squares, n),
            rms_delta_p=rms_dp,
            rms_delta_p_error=0.5 * mean_error(self.delta_p_squares, self.delta_p_fourths, n) / rms_dp
            if rms_dp
            else 0.0,
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
        accumulator.add_window(w_logits, w_reference, w_tokens)
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
