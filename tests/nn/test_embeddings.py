"""Embeddings against transformers' RoPE code and the closed-form sinusoidal formula."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.nn.embeddings import (
    Embedding,
    RopeScaling,
    RotaryEmbedding,
    apply_rotary,
    rope_frequencies,
    sinusoidal_embedding,
)

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"

HEAD_DIM = 16
MAX_POS = 128

# (our scaling, transformers' rope_parameters beyond rope_type/theta)
SCALINGS = [
    (RopeScaling("linear", factor=2.0), {"factor": 2.0}),
    (RopeScaling("dynamic", factor=3.0), {"factor": 3.0}),
    (
        RopeScaling(
            "llama3", factor=8.0, original_max_position_embeddings=32, low_freq_factor=1.0, high_freq_factor=4.0
        ),
        {"factor": 8.0, "original_max_position_embeddings": 32, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),
    (
        RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32),
        {"factor": 4.0, "original_max_position_embeddings": 32},
    ),
    (
        RopeScaling(
            "yarn",
            factor=4.0,
            original_max_position_embeddings=32,
            mscale=0.707,
            mscale_all_dim=0.707,
            beta_fast=16.0,
            beta_slow=2.0,
        ),
        {
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        },
    ),
]


def _hf_config(rope_type: str, theta: float, params: dict) -> Any:
    """A transformers LlamaConfig with these RoPE settings."""
    import transformers

    return transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params},
    )


@pytest.mark.parametrize(("scaling", "params"), SCALINGS, ids=lambda v: getattr(v, "rope_type", ""))
def test_rope_inv_freq_matches_transformers(scaling: RopeScaling, params: dict) -> None:
    pytest.importorskip("torch", reason=NEEDS_TORCH)
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils", reason=NEEDS_TORCH)
    config = _hf_config(scaling.rope_type, 10000.0, params)
    # "dynamic" depends on the sequence length: check inside and beyond the reference length.
    for seq_len in [None, 3 * MAX_POS]:
        expected, expected_factor = rope_utils.ROPE_INIT_FUNCTIONS[scaling.rope_type](config, None, seq_len=seq_len)
        inv_freq, factor = rope_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS, seq_len)
        np.testing.assert_allclose(np.asarray(inv_freq), expected.numpy(), rtol=1e-6)
        assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_rope_default_matches_transformers() -> None:
    pytest.importorskip("torch", reason=NEEDS_TORCH)
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama", reason=NEEDS_TORCH)
    config = _hf_config("default", 500000.0, {})
    expected, _ = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    inv_freq, factor = rope_frequencies(HEAD_DIM, 500000.0)
    np.testing.assert_allclose(np.asarray(inv_freq), expected.numpy(), rtol=1e-6)
    assert factor == 1.0


def test_rope_dynamic_grows_theta_only_past_reference_length() -> None:
    scaling = RopeScaling("dynamic", factor=2.0)
    base, _ = rope_frequencies(HEAD_DIM, 10000.0, None, MAX_POS)
    short, _ = rope_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS, seq_len=MAX_POS // 2)
    long, _ = rope_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS, seq_len=4 * MAX_POS)
    np.testing.assert_allclose(np.asarray(short), np.asarray(base), rtol=1e-6)
    assert float(long[-1]) < float(base[-1])


def test_rotary_application_matches_transformers() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama", reason=NEEDS_TORCH)
    scaling = RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32)
    config = _hf_config("yarn", 10000.0, {"factor": 4.0, "original_max_position_embeddings": 32})
    hf_rotary = modeling_llama.LlamaRotaryEmbedding(config)
    q = np.random.default_rng(0).standard_normal((2, 5, 3, HEAD_DIM)).astype(np.float32)  # (B, T, H, D)
    k = np.random.default_rng(1).standard_normal((2, 5, 3, HEAD_DIM)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 60, 61]], dtype=np.int64)
    cos_t, sin_t = hf_rotary(torch.from_numpy(q), torch.from_numpy(positions))
    q_t, k_t = modeling_llama.apply_rotary_pos_emb(
        torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos_t, sin_t
    )

    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0, scaling, MAX_POS)(jnp.asarray(positions, dtype=jnp.int32))
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(apply_rotary(jnp.asarray(q), cos, sin)), q_t.transpose(1, 2).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(apply_rotary(jnp.asarray(k), cos, sin)), k_t.transpose(1, 2).numpy(), atol=1e-5
    )


def test_rotary_scores_depend_only_on_relative_position() -> None:
    rotary = RotaryEmbedding(HEAD_DIM, 10000.0)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, HEAD_DIM))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, HEAD_DIM))

    def score(qpos: int, kpos: int) -> float:
        rq = apply_rotary(q, *rotary(jnp.array([[qpos]], dtype=jnp.int32)))
        rk = apply_rotary(k, *rotary(jnp.array([[kpos]], dtype=jnp.int32)))
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-4)


def test_sinusoidal_matches_closed_form() -> None:
    positions = jnp.array([[0, 1, 7], [100, 5, 2]], dtype=jnp.int32)
    dim = 8
    out = np.asarray(sinusoidal_embedding(positions, dim))
    for p in np.asarray(positions).reshape(-1):
        row = out.reshape(-1, dim)[list(np.asarray(positions).reshape(-1)).index(p)]
        for i in range(dim // 2):
            angle = p / 10000.0 ** (2 * i / dim)
            assert row[2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
            assert row[2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_rejects_odd_dim() -> None:
    with pytest.raises(ValueError, match="dim must be even"):
        sinusoidal_embedding(jnp.arange(3), 5)


def test_embedding_lookup_equals_one_hot_matmul() -> None:
    table = Embedding(10, 4, key=jax.random.key(0))
    ids = jnp.array([[1, 9], [0, 1]], dtype=jnp.int32)
    expected = jax.nn.one_hot(ids, 10) @ table.weight
    np.testing.assert_allclose(np.asarray(table(ids)), np.asarray(expected), atol=1e-6)


def test_unknown_rope_type_names_the_field() -> None:
    with pytest.raises(ValueError, match="rope_type='ntk'"):
        RopeScaling("ntk")
