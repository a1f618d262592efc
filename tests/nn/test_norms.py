"""LayerNorm and RMSNorm against torch."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.nn.norms import LayerNorm, RMSNorm, make_norm

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_layernorm_matches_torch() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    x, w, b = _random((2, 3, 8), 0) * 3 + 1, _random((8,), 1), _random((8,), 2)
    norm = eqx.tree_at(lambda n: (n.weight, n.bias), LayerNorm(8, eps=1e-5), (jnp.asarray(w), jnp.asarray(b)))
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,), torch.from_numpy(w), torch.from_numpy(b), 1e-5)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected.numpy(), atol=1e-5)


def test_rmsnorm_matches_torch() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    x, w = _random((4, 8), 0) * 2, _random((8,), 1)
    norm = RMSNorm(8, eps=1e-6)
    norm = jax.tree.map(lambda _: jnp.asarray(w), norm)
    expected = torch.nn.functional.rms_norm(torch.from_numpy(x), (8,), torch.from_numpy(w), 1e-6)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected.numpy(), atol=1e-5)


def test_norms_keep_bfloat16_and_compute_in_float32() -> None:
    x = jnp.asarray(_random((3, 64), 0) * 100 + 1000).astype(jnp.bfloat16)
    for norm in (LayerNorm(64), RMSNorm(64)):
        out = norm(x)
        assert out.dtype == jnp.bfloat16
        ref = norm(x.astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(out, dtype=np.float32), np.asarray(ref), atol=2e-2, rtol=1e-2)


def test_layernorm_without_bias_and_registry() -> None:
    assert LayerNorm(4, use_bias=False).bias is None
    assert isinstance(make_norm("rmsnorm", 4, 1e-6), RMSNorm)
    with pytest.raises(ValueError, match="norm='batchnorm' is unknown"):
        make_norm("batchnorm", 4, 1e-6)
