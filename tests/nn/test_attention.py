"""Attention against torch's scaled_dot_product_attention, cached decoding against the full pass."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.nn.attention import KVCache, MultiHeadAttention, dot_product_attention, select_implementation
from xax.nn.embeddings import RotaryEmbedding

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"


def _reference_mask(seq: int, lengths: list[int], window: int | None) -> np.ndarray:
    """Causal + right-padding + sliding-window mask built element by element, (B, T, S)."""
    mask = np.zeros((len(lengths), seq, seq), dtype=bool)
    for b, length in enumerate(lengths):
        for t in range(seq):
            for s in range(seq):
                mask[b, t, s] = s <= t and s < length and (window is None or t - s < window)
    return mask


@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (4, 2, None), (4, 1, 3), (6, 2, 2)])
def test_attention_matches_torch_sdpa(heads: int, kv_heads: int, window: int | None) -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    rng = np.random.default_rng(0)
    batch, seq, dim = 2, 7, 8
    q = rng.standard_normal((batch, seq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, dim)).astype(np.float32)
    lengths = [seq, 4]
    key_mask = jnp.asarray(np.arange(seq)[None, :] < np.array(lengths)[:, None])
    slots = jnp.arange(seq, dtype=jnp.int32)
    out = dot_product_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        q_slots=slots,
        k_slots=slots,
        key_mask=key_mask,
        sliding_window=window,
        implementation="xla",
    )
    reference_mask = _reference_mask(seq, lengths, window)
    mask = torch.from_numpy(reference_mask)[:, None]  # (B, 1, T, S)
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q).transpose(1, 2),
        torch.from_numpy(k).transpose(1, 2),
        torch.from_numpy(v).transpose(1, 2),
        attn_mask=mask,
        enable_gqa=True,
    ).transpose(1, 2)
    # A query with no visible key (a pad row outside the window) has no defined output.
    defined = reference_mask.any(axis=-1)  # (B, T)
    assert defined.sum() >= 10
    np.testing.assert_allclose(np.asarray(out)[defined], expected.numpy()[defined], atol=1e-5)


def _layer(kv_heads: int, window: int | None) -> MultiHeadAttention:
    return MultiHeadAttention(
        16,
        4,
        key=jax.random.key(0),
        num_kv_heads=kv_heads,
        qkv_bias=True,
        out_bias=True,
        sliding_window=window,
        init_std=0.3,
    )


@pytest.mark.parametrize(("kv_heads", "window"), [(2, None), (1, 3)])
def test_cached_decoding_equals_full_pass(kv_heads: int, window: int | None) -> None:
    layer = _layer(kv_heads, window)
    rotary = RotaryEmbedding(4, 10000.0)
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    full, _ = layer(x, rotary=rotary(positions))

    cache = KVCache.empty(2, 12, kv_heads, 4, jnp.float32)
    outs = []
    for start, stop in [(0, 5), (5, 6), (6, 9)]:
        out, cache = eqx.filter_jit(layer)(x[:, start:stop], rotary=rotary(positions[:, start:stop]), cache=cache)
        outs.append(out)
    assert cache is not None and int(cache.index) == 9
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full), atol=1e-5)


def test_left_padding_matches_unpadded_sequence() -> None:
    layer = _layer(2, None)
    rotary = RotaryEmbedding(4, 10000.0)
    x = jax.random.normal(jax.random.key(2), (1, 5, 16))
    positions = jnp.arange(5, dtype=jnp.int32)[None]
    expected, _ = layer(x, rotary=rotary(positions))

    padded = jnp.concatenate([jnp.zeros((1, 3, 16)), x], axis=1)  # three pad tokens in front
    mask = jnp.arange(8)[None] >= 3
    padded_positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    out, _ = layer(padded, rotary=rotary(padded_positions), padding_mask=mask)
    np.testing.assert_allclose(np.asarray(out[:, 3:]), np.asarray(expected), atol=1e-5)


def test_auto_picks_xla_off_gpu_and_cudnn_request_explains() -> None:
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU fallback")
    assert select_implementation("auto", jnp.bfloat16, 64, needs_explicit_mask=False, causal=True) == "xla"
    with pytest.raises(ValueError, match="implementation='cudnn' cannot run: backend is 'cpu'"):
        select_implementation("cudnn", jnp.bfloat16, 64, needs_explicit_mask=False, causal=True)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        MultiHeadAttention(16, 4, num_kv_heads=3, key=jax.random.key(0))


@pytest.mark.gpu
def test_cudnn_matches_xla_forward_and_gradients() -> None:
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU backend")
    batch, seq, heads, dim = 2, 1024, 8, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (batch, seq, heads, dim), dtype=jnp.float32) for kk in keys[:3])
    cotangent = jax.random.normal(keys[3], (batch, seq, heads, dim), dtype=jnp.float32)
    slots = jnp.arange(seq, dtype=jnp.int32)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
        out = dot_product_attention(
            q.astype(jnp.bfloat16),
            k.astype(jnp.bfloat16),
            v.astype(jnp.bfloat16),
            q_slots=slots,
            k_slots=slots,
            implementation=impl,
        )
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (gq_ref, gk_ref, gv_ref), out_ref = grad(q, k, v, "xla")
    (gq, gk, gv), out = grad(q, k, v, "cudnn")

    def rel(a: jax.Array, b: jax.Array) -> float:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    # bf16 has an 8-bit mantissa (relative step 2^-8 = 4e-3); both paths round in different places.
    assert rel(out, out_ref) < 1e-2
    for g, g_ref in [(gq, gq_ref), (gk, gk_ref), (gv, gv_ref)]:
        assert rel(g, g_ref) < 2e-2
