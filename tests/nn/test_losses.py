"""Cross-entropy (full, projected and chunked) against optax and the naive formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xax.nn.losses import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    cross_entropy,
    projected_cross_entropy,
)

VOCAB, DIM = 11, 6


def _data(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (3, 7, DIM))
    unembedding = jax.random.normal(k2, (VOCAB, DIM))
    labels = jax.random.randint(k3, (3, 7), 0, VOCAB)
    labels = labels.at[0, :2].set(IGNORE_INDEX).at[2, 5].set(IGNORE_INDEX)
    return hidden, unembedding, labels


def _optax_reference(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    valid = labels != IGNORE_INDEX
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.where(valid, labels, 0), VOCAB), smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.sum(valid.astype(jnp.float32))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_optax(smoothing: float) -> None:
    hidden, unembedding, labels = _data()
    logits = hidden @ unembedding.T
    np.testing.assert_allclose(
        float(cross_entropy(logits, labels, label_smoothing=smoothing)),
        float(_optax_reference(logits, labels, smoothing)),
        rtol=1e-6,
    )
    if smoothing == 0.0:
        valid = labels != IGNORE_INDEX
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
        expected = jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.sum(valid.astype(jnp.float32))
        np.testing.assert_allclose(float(cross_entropy(logits, labels)), float(expected), rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient_matches_optax(smoothing: float) -> None:
    hidden, unembedding, labels = _data()
    logits = hidden @ unembedding.T
    ours = jax.grad(lambda z: cross_entropy(z, labels, label_smoothing=smoothing))(logits)
    reference = jax.grad(lambda z: _optax_reference(z, labels, smoothing))(logits)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)
    ignored = np.asarray(labels == IGNORE_INDEX)
    assert ignored.any() and not np.asarray(ours)[ignored].any()  # ignored tokens get no gradient


@pytest.mark.parametrize(("smoothing", "chunk_size"), [(0.0, 4), (0.1, 5), (0.2, 64)])
def test_chunked_equals_full_logits_value_and_gradient(smoothing: float, chunk_size: int) -> None:
    hidden, unembedding, labels = _data(1)

    def naive(h: jax.Array, w: jax.Array) -> jax.Array:
        return _optax_reference(h @ w.T, labels, smoothing)

    def chunked(h: jax.Array, w: jax.Array) -> jax.Array:
        return chunked_cross_entropy(h, w, labels, chunk_size=chunk_size, label_smoothing=smoothing)

    value, grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, unembedding)
    ref_value, ref_grads = jax.value_and_grad(naive, argnums=(0, 1))(hidden, unembedding)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-6)


def test_chunked_never_materializes_full_logits() -> None:
    hidden = jnp.zeros((2, 64, DIM))
    unembedding = jnp.zeros((VOCAB, DIM))
    labels = jnp.zeros((2, 64), dtype=jnp.int32)

    def loss(h: jax.Array, w: jax.Array) -> jax.Array:
        return chunked_cross_entropy(h, w, labels, chunk_size=16)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, unembedding))
    assert f"16,{VOCAB}]" in jaxpr.replace(" ", "")
    assert f"128,{VOCAB}]" not in jaxpr.replace(" ", "") and f"64,{VOCAB}]" not in jaxpr.replace(" ", "")


def test_chunked_bfloat16_hidden_gives_float32_loss() -> None:
    hidden, unembedding, labels = _data(2)
    loss = chunked_cross_entropy(hidden.astype(jnp.bfloat16), unembedding, labels, chunk_size=8)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(cross_entropy(hidden @ unembedding.T, labels)), rtol=2e-2)


@pytest.mark.parametrize(("smoothing", "pad_multiple"), [(0.0, 8), (0.1, 8), (0.0, 1)])
def test_projected_equals_full_logits_value_and_gradient(smoothing: float, pad_multiple: int) -> None:
    hidden, unembedding, labels = _data()
    assert unembedding.shape[0] % 8 != 0  # so padding happens

    def full(h: jax.Array, w: jax.Array) -> jax.Array:
        return cross_entropy(h @ w.T, labels, label_smoothing=smoothing)

    def projected(h: jax.Array, w: jax.Array) -> jax.Array:
        return projected_cross_entropy(h, w, labels, label_smoothing=smoothing, pad_multiple=pad_multiple)

    value, grads = jax.value_and_grad(projected, argnums=(0, 1))(hidden, unembedding)
    ref_value, ref_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, unembedding)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    assert grads[1].shape == unembedding.shape
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_projected_bfloat16_logits_stay_close_to_float32() -> None:
    hidden, unembedding, labels = _data()
    h16 = hidden.astype(jnp.bfloat16)
    exact = projected_cross_entropy(h16, unembedding, labels)
    fast = projected_cross_entropy(h16, unembedding, labels, float32_logits=False)
    assert exact.dtype == fast.dtype == jnp.float32
    # bfloat16 logits carry a relative rounding of 2^-8 each; the mean loss moves by far less.
    np.testing.assert_allclose(fast, exact, rtol=1e-2)
    grad = jax.grad(lambda h: projected_cross_entropy(h, unembedding, labels, float32_logits=False))(h16)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad)))
