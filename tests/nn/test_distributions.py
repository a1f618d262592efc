"""Distributions against torch.distributions (log-probabilities, entropies, KLs), sampling statistics
against their exact moments, and gradients through samples and masked classes."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.nn.distributions import Bernoulli, Categorical, Normal

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"

RNG = np.random.default_rng(0)


def f32(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a, jnp.float32)


def t64(a: np.ndarray) -> Any:
    """The array as a float64 torch tensor."""
    import torch

    return torch.as_tensor(np.asarray(a, np.float64))


def test_normal_matches_torch() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    td = pytest.importorskip("torch.distributions", reason=NEEDS_TORCH)
    mean, log_std, x = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5)) * 0.5, RNG.normal(size=(3, 5)) * 2
    mean2, log_std2 = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5)) * 0.5
    ours, other = Normal(f32(mean), f32(log_std)), Normal(f32(mean2), f32(log_std2))
    theirs, their_other = td.Normal(t64(mean), t64(np.exp(log_std))), td.Normal(t64(mean2), t64(np.exp(log_std2)))
    np.testing.assert_allclose(ours.log_prob(f32(x)), theirs.log_prob(t64(x)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.entropy(), theirs.entropy().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.kl(other), td.kl_divergence(theirs, their_other).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.mode(), f32(mean))
    # From the log-variance and against the standard prior: the VAE's KL term.
    logvar = 2 * log_std
    prior = td.Normal(torch.zeros(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64))
    np.testing.assert_allclose(
        Normal.from_logvar(f32(mean), f32(logvar)).kl(Normal.standard(f32(mean))),
        td.kl_divergence(theirs, prior).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_normal_samples_are_reparameterized() -> None:
    mean, log_std = f32(np.array([1.5, -2.0])), f32(np.array([0.0, np.log(0.25)]))
    samples = jax.vmap(lambda k: Normal(mean, log_std).sample(k))(jax.random.split(jax.random.key(0), 100_000))
    # 100k draws: standard errors of the mean 0.0032 and 0.0008.
    np.testing.assert_allclose(samples.mean(axis=0), [1.5, -2.0], atol=0.015)
    np.testing.assert_allclose(samples.std(axis=0), [1.0, 0.25], rtol=0.01)
    # d sample / d mean = 1 and d sample / d log_std = std * eps = sample - mean, exactly.
    key = jax.random.key(1)
    sample = Normal(mean, log_std).sample(key)
    d_mean, d_log_std = jax.grad(lambda m, s: Normal(m, s).sample(key).sum(), argnums=(0, 1))(mean, log_std)
    np.testing.assert_array_equal(d_mean, jnp.ones(2))
    np.testing.assert_allclose(d_log_std, sample - mean, rtol=1e-6)


def test_normal_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"Normal mean and log_std must have one shape; got \(2,\) and \(3,\)"):
        Normal(jnp.zeros(2), jnp.zeros(3))


def test_categorical_matches_torch() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    td = pytest.importorskip("torch.distributions", reason=NEEDS_TORCH)
    logits, logits2 = RNG.normal(size=(4, 6)) * 2, RNG.normal(size=(4, 6)) * 2
    value = RNG.integers(0, 6, size=4)
    ours, other = Categorical(f32(logits)), Categorical(f32(logits2))
    theirs, their_other = td.Categorical(logits=t64(logits)), td.Categorical(logits=t64(logits2))
    np.testing.assert_allclose(
        ours.log_prob(jnp.asarray(value)), theirs.log_prob(torch.as_tensor(value)).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(ours.entropy(), theirs.entropy().numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.kl(other), td.kl_divergence(theirs, their_other).numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.probs, np.asarray(theirs.probs), rtol=1e-5)
    np.testing.assert_array_equal(ours.mode(), np.argmax(logits, axis=-1))


def test_categorical_with_ruled_out_classes_has_finite_values_and_gradients() -> None:
    td = pytest.importorskip("torch.distributions", reason=NEEDS_TORCH)
    logits = f32(np.array([[0.3, -jnp.inf, 1.2, -jnp.inf], [2.0, 0.0, -1.0, 0.5]]))
    other = f32(np.array([[1.0, 0.0, 0.0, -jnp.inf], [0.0, 0.0, 0.0, 0.0]]))
    theirs = td.Categorical(logits=t64(np.asarray(logits)))
    np.testing.assert_allclose(Categorical(logits).entropy(), theirs.entropy().numpy(), rtol=1e-5)
    # torch's KL gives nan for 0 log(0 / 0); the masked class contributes 0, as the definition has it.
    p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    log_q = np.asarray(jax.nn.log_softmax(other, axis=-1), np.float64)
    expected = [
        np.sum([pk * (np.log(pk) - lq) for pk, lq in zip(pr, lr) if pk > 0])
        for pr, lr in zip(p.tolist(), log_q.tolist())
    ]
    np.testing.assert_allclose(Categorical(logits).kl(Categorical(other)), expected, rtol=1e-5)
    assert float(Categorical(other).kl(Categorical(logits))[0]) == np.inf  # other allows a class logits rules out

    def loss(x: jax.Array) -> jax.Array:
        return (Categorical(x).entropy() + Categorical(x).kl(Categorical(other))).sum()

    grads = jax.grad(loss)(logits)
    assert bool(jnp.all(jnp.isfinite(grads)))
    assert float(grads[0, 1]) == 0.0 and float(grads[0, 3]) == 0.0


def test_categorical_samples_follow_the_probabilities() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    dist = Categorical(f32(np.log(probs)))
    samples = jax.vmap(dist.sample)(jax.random.split(jax.random.key(0), 100_000))
    frequencies = np.bincount(np.asarray(samples), minlength=4) / samples.shape[0]
    np.testing.assert_allclose(frequencies, probs, atol=0.006)  # 4 standard errors at p = 0.4


def test_bernoulli_matches_torch_and_is_stable_at_large_logits() -> None:
    td = pytest.importorskip("torch.distributions", reason=NEEDS_TORCH)
    logits, logits2 = RNG.normal(size=7) * 3, RNG.normal(size=7) * 3
    value = RNG.integers(0, 2, size=7).astype(np.float64)
    ours, other = Bernoulli(f32(logits)), Bernoulli(f32(logits2))
    theirs, their_other = td.Bernoulli(logits=t64(logits)), td.Bernoulli(logits=t64(logits2))
    np.testing.assert_allclose(ours.log_prob(f32(value)), theirs.log_prob(t64(value)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.entropy(), theirs.entropy().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.kl(other), td.kl_divergence(theirs, their_other).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.mode(), logits > 0)
    # sigmoid(100) is 1 in float32; log P(0) is still -100, not -inf.
    assert float(Bernoulli(f32(np.array(100.0))).log_prob(jnp.float32(0.0))) == pytest.approx(-100.0)
    samples = jax.vmap(Bernoulli(f32(np.array(np.log(0.3 / 0.7)))).sample)(jax.random.split(jax.random.key(0), 50_000))
    assert abs(float(samples.mean()) - 0.3) < 0.01  # 5 standard errors
