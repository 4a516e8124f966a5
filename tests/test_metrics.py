"""The metric functions on hand-made numbers, where the right answer is known."""

import numpy as np
import pytest

from edge_quant_pipeline.evaluate import compare, compare_generation, perplexity


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


def test_generation_agreement_and_first_divergence():
    reference = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    tokens = np.array([[1, 2, 9, 4], [5, 6, 7, 8]])
    result = compare_generation(tokens, reference)
    assert result.agreement == pytest.approx(7 / 8)
    assert (result.first_divergence, result.min_first_divergence) == (3.0, 2)
