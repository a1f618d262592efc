"""DiT and the mmDiT block: patchify and the sine-cosine embedding against their definitions, adaLN-Zero
blocks starting as the identity, the scanned and looped stack against a loop over unstacked blocks,
preset sizes against the paper, and joint attention against a hand-written softmax over the concatenated streams."""

import math
from dataclasses import replace
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.jaxprs import dot_operand_dtypes
from xax.arch.diffusion.embeddings import sincos_2d
from xax.arch.dit import DiT, DiTBlock, DiTConfig, dit_config, layer_norm, patchify, split_qkv, unpatchify
from xax.arch.mmdit import MMDiTBlock, MMDiTConfig
from xax.arch.unet import count_params
from xax.nn.attention import dot_product_attention

M = TypeVar("M")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, impl: str | None) -> jax.Array:
    """Multi-head attention of (T, D) queries over (S, D) keys and values, through the one entry point."""
    heads = lambda a: a.reshape(1, a.shape[0], num_heads, a.shape[1] // num_heads)  # noqa: E731  (1, T, N, D/N)
    return dot_product_attention(heads(q), heads(k), heads(v), causal=False, implementation=impl).reshape(q.shape)


def randomized(model: M, seed: int, scale: float = 0.2) -> M:
    """Every float leaf redrawn with numpy, so the zero-initialized modulations are active."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(model)
    new = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) if eqx.is_inexact_array(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, new)


def tiny_config() -> DiTConfig:
    return dit_config(
        "DiT-S/2", input_size=8, in_channels=2, d_model=16, num_layers=3, num_heads=2, num_classes=3, frequency_dim=8
    )


def test_patchify_matches_definition_and_inverts() -> None:
    x = jnp.arange(2 * 6 * 4, dtype=jnp.float32).reshape(2, 6, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (6, 8)
    xn = np.asarray(x)
    for r in range(3):
        for s in range(2):
            patch = xn[:, 2 * r : 2 * r + 2, 2 * s : 2 * s + 2].transpose(1, 2, 0).reshape(-1)  # (p, p, C)
            np.testing.assert_array_equal(tokens[r * 2 + s], patch)
    np.testing.assert_array_equal(unpatchify(tokens, 2, 6, 4), x)


def test_sincos_2d_matches_mae_formula() -> None:
    dim, height, width = 8, 3, 5
    emb = sincos_2d(dim, height, width)

    def one_d(pos: float) -> np.ndarray:
        omega = 1 / 10_000 ** (np.arange(2) / 2)  # dim / 4 = 2 frequencies
        return np.concatenate([np.sin(pos * omega), np.cos(pos * omega)])

    for r in range(height):
        for c in range(width):
            np.testing.assert_allclose(emb[r * width + c], np.concatenate([one_d(c), one_d(r)]), atol=1e-12)


def test_adaln_zero_block_starts_as_identity() -> None:
    block = DiTBlock(16, 2, 4.0, None, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 16))
    c = jax.random.normal(jax.random.key(2), (16,))
    np.testing.assert_array_equal(block(x, c), x)
    active = randomized(block, 3)
    assert float(jnp.abs(active(x, c) - x).max()) > 1e-2


def test_dit_outputs_zero_at_init_and_shapes() -> None:
    model = DiT(tiny_config(), key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 2, 8, 8))
    out = eqx.filter_jit(lambda m, *args: jax.vmap(m)(*args))(model, x, jnp.array([0.2, 0.8]), jnp.array([0, 3]))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, jnp.zeros_like(out))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_scanned_and_looped_blocks_equal_a_loop_over_unstacked_blocks(scan_layers: bool) -> None:
    config = replace(tiny_config(), scan_layers=scan_layers)
    model = randomized(DiT(config, key=jax.random.key(0)), 1)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8))
    t, y = jnp.float32(0.4), jnp.int32(1)
    out = model(x, t, y)
    # The same forward written as a Python loop over the unstacked blocks.
    tokens = model.patch_embed(x).reshape(16, 16).T + jnp.asarray(sincos_2d(16, 4, 4), jnp.float32)
    c = model.condition(t, y)
    for i in range(3):
        tokens = model.block(i)(tokens, c)
    expected = unpatchify(model.final(tokens, c), 2, 8, 8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out).max()) > 1e-2
    other = model(x, t, jnp.int32(2))
    assert float(jnp.abs(out - other).max()) > 1e-3  # the class matters


@pytest.mark.parametrize(("name", "millions"), [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)])
def test_preset_sizes_match_the_paper(name: str, millions: float) -> None:
    # Peebles & Xie (2023), Table 1 (on 32x32x4 latents).
    model = eqx.filter_eval_shape(DiT, dit_config(name), key=jax.random.key(0))
    assert abs(count_params(model) / 1e6 - millions) / millions < 0.01
    # The dtype policy: bf16 weights and inputs give a bf16 output (norms and softmax upcast inside).
    half = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, model
    )
    out = eqx.filter_eval_shape(
        lambda m, x: m(x, jnp.float32(0.5), jnp.int32(0)), half, jax.ShapeDtypeStruct((4, 32, 32), jnp.bfloat16)
    )
    assert (out.shape, out.dtype) == ((4, 32, 32), jnp.bfloat16)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"DiT preset 'DiT-M/2' is unknown"):
        dit_config("DiT-M/2")
    with pytest.raises(ValueError, match=r"DiTConfig has no field 'width'"):
        dit_config("DiT-B/2", width=3)
    with pytest.raises(ValueError, match=r"DiTConfig.patch_size=3 must divide input_size=32"):
        DiT(dit_config("DiT-S/2", patch_size=3), key=jax.random.key(0))
    model = DiT(tiny_config(), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"DiTConfig.input_size=8"):
        model(jnp.zeros((2, 6, 6)), jnp.float32(0.5))


def _softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    d = q.shape[1] // heads
    out = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(d)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        out.append(p / p.sum(axis=1, keepdims=True) @ v[:, cols])
    return np.concatenate(out, axis=1)


def _stream_by_hand(stream, x: np.ndarray, attended: np.ndarray, vec: np.ndarray) -> np.ndarray:
    lin = lambda layer, a: a @ np.asarray(layer.weight, np.float64).T + np.asarray(layer.bias, np.float64)  # noqa: E731
    silu = vec / (1 + np.exp(-vec))
    _, _, g1, s2, c2, g2 = np.split(lin(stream.modulation, silu), 6)
    x = x + g1 * lin(stream.proj, attended)
    h = np.asarray(layer_norm(jnp.asarray(x, jnp.float32)), np.float64) * (1 + c2) + s2
    hidden = lin(stream.mlp.up_proj, h)
    gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
    return x + g2 * lin(stream.mlp.down_proj, gelu)


def _mm_inputs() -> tuple[MMDiTBlock, jax.Array, jax.Array, jax.Array]:
    block = randomized(MMDiTBlock(MMDiTConfig(d_model=16, num_heads=2), key=jax.random.key(0)), 1)
    x = jax.random.normal(jax.random.key(2), (6, 16))
    context = jax.random.normal(jax.random.key(3), (4, 16))
    vec = jax.random.normal(jax.random.key(4), (16,))
    return block, x, context, vec


def test_mmdit_block_is_joint_attention_over_the_concatenation() -> None:
    block, x, context, vec = _mm_inputs()
    out_x, out_c = block(x, context, vec)
    # Attention by hand over [context; image], each stream's q, k, v from its own weights.
    qx, kx, vx = (np.asarray(a, np.float64) for a in block.image.qkv_of(x, vec))
    qc, kc, vc = (np.asarray(a, np.float64) for a in block.context.qkv_of(context, vec))
    attended = _softmax_attention(np.concatenate([qc, qx]), np.concatenate([kc, kx]), np.concatenate([vc, vx]), 2)
    v64 = np.asarray(vec, np.float64)
    np.testing.assert_allclose(
        out_x, _stream_by_hand(block.image, np.asarray(x, np.float64), attended[4:], v64), atol=1e-4
    )
    np.testing.assert_allclose(
        out_c, _stream_by_hand(block.context, np.asarray(context, np.float64), attended[:4], v64), atol=1e-4
    )
    # It is not two separate self-attentions: the image tokens see the context.
    alone = _softmax_attention(qx, kx, vx, 2)
    assert float(np.abs(alone - attended[4:]).max()) > 1e-3


def test_each_stream_has_its_own_weights() -> None:
    block, x, context, vec = _mm_inputs()
    bumped_image = eqx.tree_at(lambda b: b.image, block, randomized(block.image, 9))
    bumped_context = eqx.tree_at(lambda b: b.context, block, randomized(block.context, 9))
    for a, b in zip(block.context.qkv_of(context, vec), bumped_image.context.qkv_of(context, vec)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(block.image.qkv_of(x, vec), bumped_context.image.qkv_of(x, vec)):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(block.image.qkv_of(x, vec)[0] - bumped_image.image.qkv_of(x, vec)[0]).max()) > 1e-3
    # The gradient of the context projections with respect to the image stream's weights is zero.
    grads = eqx.filter_grad(lambda b: sum(jnp.sum(a**2) for a in b.context.qkv_of(context, vec)))(block)
    image_grads = jax.tree.leaves(eqx.filter(grads.image, eqx.is_inexact_array))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in image_grads)


def test_mmdit_block_starts_as_identity() -> None:
    block = MMDiTBlock(MMDiTConfig(d_model=16, num_heads=2), key=jax.random.key(0))
    x, context = jnp.ones((3, 16)), jnp.full((2, 16), 2.0)
    out_x, out_c = block(x, context, jnp.ones(16))
    np.testing.assert_array_equal(out_x, x)
    np.testing.assert_array_equal(out_c, context)


@pytest.mark.parametrize("impl", ["xla", None])
def test_attention_matches_softmax_attention_in_float64(impl: str | None) -> None:
    q, k, v = (jax.random.normal(jax.random.key(i), (5 if i == 0 else 7, 16)) for i in range(3))
    out = attention(q, k, v, num_heads=4, impl=impl)
    expected = _softmax_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention_impl='flash' is unknown"):
        attention(q, k, v, num_heads=4, impl="flash")


def test_attention_backward_matmuls_run_in_bfloat16() -> None:
    q, k, v = (jax.random.normal(jax.random.key(i), (6, 16), jnp.bfloat16) for i in range(3))

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(attention(q, k, v, num_heads=2, impl="xla").astype(jnp.float32) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    # Two products forward, two transposes of each backward.
    assert dot_operand_dtypes(jaxpr.jaxpr) == [[jnp.bfloat16, jnp.bfloat16]] * 6


def test_split_qkv_equals_the_fused_projection_and_concatenates_no_activation_gradient() -> None:
    """Three matmuls on the fused weight's row blocks give the fused output's thirds, and the gradient of
    the input is a sum of three products, not a concatenation of (T, 3 D) (the copy the split avoids)."""
    linear = randomized(eqx.nn.Linear(16, 48, key=jax.random.key(0)), seed=1)
    x = jax.random.normal(jax.random.key(2), (10, 16))
    fused = np.asarray(jax.vmap(linear)(x), np.float64)
    for got, expected in zip(split_qkv(linear, x), np.split(fused, 3, axis=-1), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    def loss(x: jax.Array) -> jax.Array:
        q, k, v = split_qkv(linear, x)
        return jnp.sum(q * k * v)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(x)
    shapes = [eqn.outvars[0].aval.shape for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "concatenate"]
    assert (10, 48) not in shapes
