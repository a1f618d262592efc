"""``xax.nn.norms.layer_norm`` and ``rms_normalize``: backward passes that keep the input and row statistics only."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.nn.test_gelu import saved_residuals
from xax.arch import dit
from xax.nn.norms import LayerNorm, RMSNorm, layer_norm, rms_normalize
from xax.utils.pytree import cast_floating

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"


def plain(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """The textbook formula, differentiated by JAX."""
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    row = lambda v: v.reshape((1,) * (x.ndim - 1) + (-1,))  # noqa: E731  (explicit rank promotion)
    y = y if weight is None else y * row(weight)
    return y if bias is None else y + row(bias)


def inputs(seed: int, shape: tuple[int, ...] = (5, 3, 24)) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3 + 1.5
    return x, rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1]), rng.standard_normal(shape)


@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_float64_gradients_match_autodiff_of_the_formula(affine: str) -> None:
    x, w, b, upstream = inputs(0)
    with jax.enable_x64(True):
        args = (
            jnp.asarray(x),
            jnp.asarray(w) if affine != "none" else None,
            jnp.asarray(b) if affine == "weight_bias" else None,
        )
        ours = jax.vjp(lambda *a: layer_norm(*a, 1e-5), *args)[1](jnp.asarray(upstream))
        expected = jax.vjp(lambda *a: plain(*a, 1e-5), *args)[1](jnp.asarray(upstream))
        for mine, theirs in zip(ours, expected, strict=True):
            if theirs is None:
                assert mine is None
                continue
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-12, atol=1e-12)


def test_float32_gradients_match_torch_float64() -> None:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    x, w, b, upstream = inputs(1)
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    torch.nn.functional.layer_norm(tx, (x.shape[-1],), tw, tb, 1e-5).backward(torch.from_numpy(upstream))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    ours = jax.vjp(lambda *a: layer_norm(*a, 1e-5), f32(x), f32(w), f32(b))[1](f32(upstream))
    for mine, theirs in zip(ours, (tx.grad, tw.grad, tb.grad), strict=True):
        assert theirs is not None
        np.testing.assert_allclose(np.asarray(mine, np.float64), theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_forward_is_the_previous_formula_bit_for_bit() -> None:
    x, w, b, _ = inputs(2)
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = jnp.asarray(x, dtype)
        xf = xd.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        normed = (xf - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), -1, keepdims=True) + 1e-5)
        weight, bias = jnp.asarray(w, jnp.float32)[None, None], jnp.asarray(b, jnp.float32)[None, None]
        expected = (normed * weight + bias).astype(dtype)
        np.testing.assert_array_equal(
            np.asarray(layer_norm(xd, jnp.asarray(w), jnp.asarray(b), 1e-5)), np.asarray(expected)
        )


def test_the_backward_keeps_the_input_and_row_statistics_only() -> None:
    """No float32 array of the input's size is kept for a bf16 input; JAX's own derivative keeps two."""
    x = jnp.ones((64, 128), jnp.bfloat16)
    w, b = jnp.ones((128,)), jnp.zeros((128,))
    ours = saved_residuals(lambda v, w, b: layer_norm(v * 2, w, b, 1e-5).astype(jnp.float32).sum(), x, w, b)
    autodiff = saved_residuals(lambda v, w, b: plain(v.astype(jnp.float32) * 2, w, b, 1e-5).sum(), x, w, b)
    assert "f32[64,128]" not in ours and ours.count("bf16[64,128]") == 1 and ours.count("f32[64,1]") == 2, ours
    assert autodiff.count("f32[64,128]") >= 2, autodiff


def test_forward_mode_and_second_derivatives_work() -> None:
    x, w, b, upstream = inputs(3, (24,))
    with jax.enable_x64(True):
        x, w, b, upstream = map(jnp.asarray, (x, w, b, upstream))
        tangent = jnp.flip(upstream)
        _, ours = jax.jvp(lambda v: layer_norm(v, w, b, 1e-5), (x,), (tangent,))
        _, expected = jax.jvp(lambda v: plain(v, w, b, 1e-5), (x,), (tangent,))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-12, atol=1e-12)
        hessian = jax.hessian(lambda v: (layer_norm(v, w, b, 1e-5) * upstream).sum())(x)
        expected = jax.hessian(lambda v: (plain(v, w, b, 1e-5) * upstream).sum())(x)
        np.testing.assert_allclose(np.asarray(hessian), np.asarray(expected), rtol=1e-10, atol=1e-10)


def test_module_and_dit_gradients_match_autodiff() -> None:
    """The LayerNorm module (jitted, vmapped) and a DiT block (bf16) against the same computation
    differentiated by JAX."""
    norm = LayerNorm(24)
    x = jax.random.normal(jax.random.key(0), (4, 6, 24)) * 2 + 1
    grad = jax.jit(jax.grad(lambda n, v: jnp.sum(jnp.sin(jax.vmap(n)(v))), argnums=(0, 1)))
    (ours_norm, ours_x) = grad(norm, x)
    expected = jax.grad(lambda w, b, v: jnp.sum(jnp.sin(plain(v, w, b, 1e-5))), argnums=(0, 1, 2))(
        norm.weight, norm.bias, x
    )
    for mine, theirs in zip((ours_norm.weight, ours_norm.bias, ours_x), expected, strict=True):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-5)

    block = dit.DiTBlock(32, 4, 2.0, "xla", key=jax.random.key(1))
    block = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape) if isinstance(a, jax.Array) else a, block
    )
    block = cast_floating(block, jnp.bfloat16)  # as the training step computes: bf16 weights and activations
    xb = jax.random.normal(jax.random.key(3), (16, 32), jnp.bfloat16)
    c = jax.random.normal(jax.random.key(4), (32,), jnp.bfloat16)
    loss = lambda blk, v: jnp.sum(blk(v, c).astype(jnp.float32) ** 2)  # noqa: E731
    ours = jax.jit(jax.grad(loss, argnums=(0, 1)))(block, xb)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            dit, "layer_norm", lambda v, eps=1e-6: plain(v.astype(jnp.float32), None, None, eps).astype(v.dtype)
        )
        reference = jax.jit(jax.grad(loss, argnums=(0, 1)))(block, xb)
    for mine, theirs in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        scale = float(jnp.max(jnp.abs(theirs.astype(jnp.float32)))) + 1e-6
        error = float(jnp.max(jnp.abs(mine.astype(jnp.float32) - theirs.astype(jnp.float32))))
        assert error <= 1e-2 * scale, (error, scale)


def plain_rms(x: jax.Array, eps: float) -> jax.Array:
    return x / jnp.sqrt((x**2).mean(-1, keepdims=True) + eps)


def test_rms_normalize_matches_autodiff_forward_reverse_and_second_order() -> None:
    x, _, _, upstream = inputs(4)
    with jax.enable_x64(True):
        x, upstream = jnp.asarray(x), jnp.asarray(upstream)
        np.testing.assert_allclose(np.asarray(rms_normalize(x, 1e-6)), np.asarray(plain_rms(x, 1e-6)), rtol=1e-13)
        (ours,) = jax.vjp(lambda v: rms_normalize(v, 1e-6), x)[1](upstream)
        (expected,) = jax.vjp(lambda v: plain_rms(v, 1e-6), x)[1](upstream)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-12, atol=1e-12)
        _, ours = jax.jvp(lambda v: rms_normalize(v, 1e-6), (x,), (upstream,))
        _, expected = jax.jvp(lambda v: plain_rms(v, 1e-6), (x,), (upstream,))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-12, atol=1e-12)
        row, up = x[0, 0], upstream[0, 0]
        hessian = jax.hessian(lambda v: (rms_normalize(v, 1e-6) * up).sum())(row)
        expected = jax.hessian(lambda v: (plain_rms(v, 1e-6) * up).sum())(row)
        np.testing.assert_allclose(np.asarray(hessian), np.asarray(expected), rtol=1e-10, atol=1e-10)


def test_rmsnorm_module_keeps_bf16_residuals_and_matches_torch_gradients() -> None:
    x = jnp.ones((64, 128), jnp.bfloat16)
    norm = RMSNorm(128)
    ours = saved_residuals(lambda v, n: n(v * 2).astype(jnp.float32).sum(), x, norm)
    assert "f32[64,128]" not in ours and ours.count("f32[64,1]") == 1, ours
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    xs, w, _, upstream = inputs(5)
    tx, tw = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (xs, w))
    torch.nn.functional.rms_norm(tx, (xs.shape[-1],), tw, 1e-6).backward(torch.from_numpy(upstream))
    norm = RMSNorm(xs.shape[-1], eps=1e-6)
    norm = eqx.tree_at(lambda n: n.weight, norm, jnp.asarray(w, jnp.float32))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    grad_norm, grad_x = jax.vjp(lambda n, v: jax.vmap(jax.vmap(n))(v), norm, f32(xs))[1](f32(upstream))
    assert tw.grad is not None and tx.grad is not None
    np.testing.assert_allclose(np.asarray(grad_norm.weight, np.float64), tw.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_x, np.float64), tx.grad.numpy(), rtol=1e-5, atol=1e-5)
