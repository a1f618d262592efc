"""Metrics against their definitions: masked accuracies, perplexity and bits, and the expected
calibration error against a direct loop over bins (Guo et al. 2017, equation 3)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from xax.nn.losses import IGNORE_INDEX, cross_entropy
from xax.nn.metrics import bits_per_token, calibration_error, perplexity, token_accuracy, top_k_accuracy


def test_accuracy_perplexity_and_bits() -> None:
    logits = jnp.array([[[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    labels = jnp.array([[1, 2, IGNORE_INDEX]])
    assert float(token_accuracy(logits, labels)) == pytest.approx(0.5)
    assert float(token_accuracy(logits, jnp.full((1, 3), IGNORE_INDEX))) == 0.0  # nothing counted
    loss = cross_entropy(logits, labels)
    assert float(perplexity(loss)) == pytest.approx(float(np.exp(loss)), rel=1e-6)
    uniform = cross_entropy(jnp.zeros((4, 5)), jnp.arange(4))
    assert float(perplexity(uniform)) == pytest.approx(5.0, rel=1e-6)
    assert float(bits_per_token(uniform)) == pytest.approx(math.log2(5.0), rel=1e-6)


def test_top_k_accuracy_counts_ties_for_the_label() -> None:
    logits = jnp.array([[0.1, 0.5, 0.3, 0.9], [2.0, 2.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    labels = jnp.array([2, 1, IGNORE_INDEX])
    # Row 0: label 2 is third (0.9 and 0.5 above it); row 1: nothing strictly above the tied label.
    assert [float(top_k_accuracy(logits, labels, k)) for k in (1, 2, 3, 4)] == [0.5, 0.5, 1.0, 1.0]
    np.testing.assert_allclose(top_k_accuracy(logits[:1], labels[:1], 1), token_accuracy(logits[:1], labels[:1]))
    with pytest.raises(ValueError, match=r"top_k_accuracy: k=5 must lie in \[1, 4\]"):
        top_k_accuracy(logits, labels, 5)


def ece_by_loop(logits: np.ndarray, labels: np.ndarray, num_bins: int) -> float:
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    confidence, predicted = probs.max(axis=-1), probs.argmax(axis=-1)
    total = 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        members = (confidence > low) & (confidence <= high)
        if members.any():
            accuracy = np.mean(predicted[members] == labels[members])
            total += members.sum() / len(labels) * abs(accuracy - confidence[members].mean())
    return total


@pytest.mark.parametrize("num_bins", [1, 5, 15])
def test_calibration_error_is_the_binned_gap(num_bins: int) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)) * 3
    labels = rng.integers(0, 10, size=500)
    got = float(calibration_error(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), num_bins))
    assert got == pytest.approx(ece_by_loop(logits, labels, num_bins), rel=1e-5, abs=1e-6)
    # Ignored positions leave the value as if they were absent.
    padded_labels = jnp.concatenate([jnp.asarray(labels), jnp.full((20,), IGNORE_INDEX)])
    padded_logits = jnp.concatenate([jnp.asarray(logits, jnp.float32), jnp.zeros((20, 10))])
    assert float(calibration_error(padded_logits, padded_labels, num_bins)) == pytest.approx(got, rel=1e-6)


def test_confident_and_right_is_calibrated() -> None:
    logits = jnp.eye(4) * 50.0  # confidence 1.0, always right
    assert float(calibration_error(logits, jnp.arange(4))) == pytest.approx(0.0, abs=1e-6)
    assert float(calibration_error(logits, jnp.array([1, 2, 3, 0]))) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="num_bins=0 must be at least 1"):
        calibration_error(logits, jnp.arange(4), 0)
