"""The metric functions on hand-made numbers, where the right answer is known, and the streaming
accumulator against the one-shot formulas it replaced."""

import numpy as np
import pytest

from edge_quant_pipeline.evaluate import metrics
from edge_quant_pipeline.evaluate.metrics import FidelityAccumulator, compare, compare_generation, perplexity


def test_identical_logits_have_zero_kl_and_full_agreement():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 16)).astype(np.float32)
    windows = rng.integers(0, 16, size=(2, 8))
    fidelity = compare(logits, logits, windows)
    assert fidelity.perplexity_ratio == 1.0 and fidelity.max_kl == 0.0
    assert fidelity.top1_agreement == 1.0 and fidelity.delta_p_correct == 0.0
    assert fidelity.logits_sqnr_db == float("inf")


def test_uniform_logits_have_perplexity_of_the_vocabulary():
    assert perplexity(np.zeros((1, 5, 256)), np.zeros((1, 5), int)) == pytest.approx(256)


def test_sqnr_of_known_noise():
    reference = np.ones((1, 4, 8))
    fidelity = compare(reference + 0.1, reference, np.zeros((1, 4), int))
    assert fidelity.logits_sqnr_db == pytest.approx(20.0)  # 10 log10(1 / 0.01)


def test_a_mean_and_its_error_as_llama_cpp_reports_them():
    """Four KL values 0, 0, 0, 4: mean 1, population variance 3, error sqrt(3 / 3) = 1; the same for top-1
    agreement on 1 of 4 positions: sqrt(0.25 * 0.75 / 3)."""
    assert metrics.mean_error(4.0, 16.0, 4) == pytest.approx(1.0)
    assert metrics.mean_error(5.0, 25.0, 1) == 0.0
    same = np.zeros((1, 4, 3))
    same[0, 0, 1] = 1.0  # position 0 agrees on token 1; the others disagree below
    other = np.zeros((1, 4, 3))
    other[0, :, 1] = 1.0
    same[0, 1:, 2] = 5.0
    fidelity = compare(same, other, np.zeros((1, 4), int))
    assert fidelity.top1_agreement == 0.25
    assert fidelity.top1_agreement_error == pytest.approx(np.sqrt(0.25 * 0.75 / 3))


def test_generation_agreement_and_first_divergence():
    reference = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    tokens = np.array([[1, 2, 9, 4], [5, 6, 7, 8]])
    result = compare_generation(tokens, reference)
    assert result.agreement == pytest.approx(7 / 8)
    assert (result.first_divergence, result.min_first_divergence) == (3.0, 2)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def one_shot(logits: np.ndarray, reference: np.ndarray, windows: np.ndarray) -> dict[str, float]:
    """The formulas over whole (windows, positions, vocab) arrays, as evaluation computed them before it streamed."""
    log_p, log_q = log_softmax(reference), log_softmax(logits)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)
    targets = windows[:, 1:, None]
    p_correct = np.exp(np.take_along_axis(log_p[:, :-1], targets, axis=-1))
    q_correct = np.exp(np.take_along_axis(log_q[:, :-1], targets, axis=-1))
    nll = -np.take_along_axis(log_q[:, :-1], targets, axis=-1)
    ref_nll = -np.take_along_axis(log_p[:, :-1], targets, axis=-1)
    noise = np.square(logits.astype(np.float64) - reference).sum()
    ratio = float(np.exp(nll.mean()) / np.exp(ref_nll.mean()))
    same_top1 = (logits.argmax(-1) == reference.argmax(-1)).ravel()
    delta_p = (q_correct - p_correct).ravel()
    rms = np.sqrt(np.mean(delta_p**2))
    return dict(
        perplexity=float(np.exp(nll.mean())),
        perplexity_ratio=ratio,
        perplexity_ratio_error=ratio * standard_error(nll - ref_nll),
        mean_kl=float(kl.mean()),
        mean_kl_error=standard_error(kl),
        median_kl=float(np.median(kl)),
        p99_kl=float(np.percentile(kl, 99)),
        p999_kl=float(np.percentile(kl, 99.9)),
        max_kl=float(kl.max()),
        top1_agreement=float(same_top1.mean()),
        top1_agreement_error=standard_error(same_top1.astype(float)),
        delta_p_correct=float(delta_p.mean()),
        delta_p_correct_error=standard_error(delta_p),
        rms_delta_p=float(rms),
        rms_delta_p_error=float(standard_error(delta_p**2) / (2 * rms)),  # d sqrt(x) = dx / (2 sqrt(x))
        logits_sqnr_db=float(10 * np.log10(np.square(reference.astype(np.float64)).sum() / noise)),
    )


def standard_error(values: np.ndarray) -> float:
    values = np.ravel(values)
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


@pytest.mark.parametrize("vocab", [50, 3000])
def test_streamed_equals_one_shot(monkeypatch, vocab):
    """Chunk by chunk, and within a chunk a few rows at a time (blocks of 3 here), the accumulator gives the
    one-shot numbers."""
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3 * vocab)
    rng = np.random.default_rng(1)
    reference = rng.normal(scale=3, size=(5, 24, vocab)).astype(np.float32)
    logits = (reference + rng.normal(scale=0.3, size=reference.shape)).astype(np.float32)
    windows = rng.integers(0, vocab, size=(5, 24))
    accumulator = FidelityAccumulator()
    for w in range(len(windows)):  # in chunks of 5 positions, the last one shorter and ending its window
        for start in range(0, 24, 5):
            rows = slice(start, start + 5)
            accumulator.add(logits[w, rows], reference[w, rows], windows[w, start + 1 : start + 6])
    streamed = vars(accumulator.result(perplexity(reference, windows)))
    assert streamed == pytest.approx(one_shot(logits, reference, windows), rel=1e-6)
