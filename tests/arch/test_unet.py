"""The UNet: shapes at MNIST sizes, zero-initialized residual branches, attention against a hand-written
softmax, the timestep embedding against its formula, conditioning, gradients and the bf16 dtype policy."""

import math
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.arch.diffusion.embeddings import timestep_embedding
from xax.arch.unet import AttentionBlock, ResBlock, UNet, UNetConfig, count_params

TINY = UNetConfig(
    base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, norm_groups=4
)


@eqx.filter_jit
def forward(model: UNet, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """One compiled batched forward, shared by the tests (same shapes, so one compilation)."""
    return jax.vmap(model)(x, t, y)


M = TypeVar("M")


def randomized(model: M, seed: int, scale: float = 0.2) -> M:
    """Every float leaf redrawn (with numpy: eager jax.random would compile once per leaf shape), so that
    zero-initialized layers no longer hide the inputs' effect."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(model)
    new = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) if eqx.is_inexact_array(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("size", [28, 32])
def test_shapes_at_mnist_sizes(size: int) -> None:
    model = eqx.filter_eval_shape(UNet, UNetConfig(), key=jax.random.key(0))
    x = jax.ShapeDtypeStruct((3, 1, size, size), jnp.float32)
    out = eqx.filter_eval_shape(forward, model, x, jnp.array([0.1, 0.5, 1.0]), jnp.array([0, 5, 10]))
    assert (out.shape, out.dtype) == (x.shape, x.dtype)


@pytest.mark.slow  # compiles the UNet/VAE's many layer shapes: about a minute on 2 cores
def test_zero_output_at_init() -> None:
    model = UNet(TINY, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 1, 8, 8))
    out = forward(model, x, jnp.array([0.0, 0.3, 0.6, 1.0]), jnp.array([0, 3, 9, 10]))
    np.testing.assert_array_equal(out, jnp.zeros_like(out))  # zero-initialized output convolution


def test_default_config_size() -> None:
    # The MNIST default: about 7M parameters, from 28x28 down to 7x7.
    model = eqx.filter_eval_shape(UNet, UNetConfig(), key=jax.random.key(0))
    assert 6e6 < count_params(model) < 8e6


def test_res_block_starts_as_identity_and_conditions_on_the_embedding() -> None:
    block = ResBlock(8, 8, 16, 4, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 6, 6))
    emb = jax.random.normal(jax.random.key(2), (16,))
    np.testing.assert_array_equal(block(x, emb), x)
    block = randomized(block, 3)
    other = jax.random.normal(jax.random.key(4), (16,))
    assert float(jnp.abs(block(x, emb) - block(x, other)).max()) > 1e-2


def test_attention_block_matches_hand_written_softmax() -> None:
    block = randomized(AttentionBlock(8, 2, 4, None, key=jax.random.key(0)), 1)
    x = jax.random.normal(jax.random.key(2), (8, 3, 5))
    out = np.asarray(block(x), np.float64)
    tokens = np.asarray(block.norm(x), np.float64).reshape(8, 15).T
    w, b = np.asarray(block.qkv.weight, np.float64), np.asarray(block.qkv.bias, np.float64)
    q, k, v = np.split(tokens @ w.T + b, 3, axis=1)
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * h + 4)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(4)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        heads.append((p / p.sum(axis=1, keepdims=True)) @ v[:, cols])
    pw, pb = np.asarray(block.proj.weight, np.float64), np.asarray(block.proj.bias, np.float64)
    expected = np.asarray(x, np.float64) + (np.concatenate(heads, axis=1) @ pw.T + pb).T.reshape(8, 3, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_timestep_embedding_formula() -> None:
    t = np.array([0.0, 0.013, 0.5, 1.0])
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), 8))
    freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 4)
    angles = 1000 * t[:, None] * freqs
    np.testing.assert_allclose(got, np.concatenate([np.cos(angles), np.sin(angles)], axis=1), atol=2e-4)


@pytest.mark.slow  # compiles the UNet/VAE's many layer shapes: about a minute on 2 cores
def test_time_and_class_change_the_output() -> None:
    model = randomized(UNet(TINY, key=jax.random.key(0)), 1, 0.1)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, 8, 8)), (4, 1, 8, 8))
    t, y = jnp.array([0.3, 0.7, 0.3, 0.3]), jnp.array([2, 2, 7, 10])
    out = forward(model, x, t, y)
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3  # time
    assert float(jnp.abs(out[0] - out[2]).max()) > 1e-3  # class
    unconditional = forward(model, x, t, jnp.full((4,), 10))  # the null label
    np.testing.assert_allclose(unconditional[3], out[3], atol=1e-6)
    assert float(jnp.abs(unconditional[0] - out[0]).max()) > 1e-3


@pytest.mark.slow  # compiles the UNet/VAE's many layer shapes: about a minute on 2 cores
def test_gradients_are_finite_and_bf16_stays_bf16() -> None:
    model = randomized(UNet(TINY, key=jax.random.key(0)), 1, 0.1)
    x = jax.random.normal(jax.random.key(2), (2, 1, 8, 8))
    t, y = jnp.array([0.2, 0.9]), jnp.array([1, 3])

    def loss(m: UNet) -> jax.Array:
        return jnp.mean(jax.vmap(m)(x, t, y) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, model)
    out = eqx.filter_eval_shape(forward, half, x.astype(jnp.bfloat16), t, y)
    assert out.dtype == jnp.bfloat16


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"UNetConfig.norm_groups=5 does not divide the width 8"):
        UNet(UNetConfig(base_channels=8, norm_groups=5), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"UNetConfig.attention_levels has 3; levels are 0..1"):
        UNet(
            UNetConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4, attention_levels=(3,)),
            key=jax.random.key(0),
        )
    model = UNet(TINY, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"must be divisible by 2; pad the images"):
        model(jnp.zeros((1, 15, 15)), jnp.float32(0.5))
