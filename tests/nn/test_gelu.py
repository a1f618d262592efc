"""``xax.nn.mlp.gelu_tanh``: the tanh-approximated GELU whose backward pass keeps only its input."""

import contextlib
import io
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint

from xax.nn.mlp import MLP, gelu_tanh


def exact_slope(x: np.ndarray) -> np.ndarray:
    """d/dx of ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))`` in float64, written from the formula."""
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * c * (1.0 + 3 * 0.044715 * x**2)


POINTS = np.linspace(-9.0, 9.0, 20_001)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_jax_gelu_bit_for_bit(dtype: jnp.dtype) -> None:
    x = jnp.asarray(POINTS, dtype)
    np.testing.assert_array_equal(np.asarray(gelu_tanh(x)), np.asarray(jax.nn.gelu(x, approximate=True)))


def test_float32_gradient_matches_the_formula_closer_than_jax_autodiff() -> None:
    x = jnp.asarray(POINTS, jnp.float32)
    upstream = jnp.asarray(np.random.default_rng(0).normal(size=POINTS.shape), jnp.float32)
    (ours,) = jax.vjp(gelu_tanh, x)[1](upstream)
    expected = exact_slope(np.asarray(x, np.float64)) * np.asarray(upstream, np.float64)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6, atol=1e-6)
    # JAX's own derivative of the same function loses precision where tanh is near -1 (1 + tanh cancels).
    (autodiff,) = jax.vjp(lambda v: jax.nn.gelu(v, approximate=True), x)[1](upstream)
    assert np.max(np.abs(np.asarray(ours) - expected)) < np.max(np.abs(np.asarray(autodiff) - expected)) / 4


def test_bfloat16_gradient_is_the_exact_slope_rounded_once() -> None:
    """In bf16 the product of the upstream gradient and the slope is computed in float32 and rounded once to
    bf16: within half a bf16 step (2^-8 relative at most) of the float64 value."""
    x = jnp.asarray(POINTS, jnp.bfloat16)
    upstream = jnp.asarray(np.random.default_rng(1).normal(size=POINTS.shape), jnp.bfloat16)
    (ours,) = jax.vjp(gelu_tanh, x)[1](upstream)
    assert ours.dtype == jnp.bfloat16
    expected = exact_slope(np.asarray(x, np.float64)) * np.asarray(upstream, np.float64)
    error = np.abs(np.asarray(ours, np.float64) - expected)
    assert np.all(error <= 2.0**-8 * np.abs(expected) + 1e-6), float(np.max(error - 2.0**-8 * np.abs(expected)))


def saved_residuals(fn: object, *args: object) -> str:
    """What ``jax.ad_checkpoint.print_saved_residuals`` prints: one line per array kept for the backward."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ad_checkpoint.print_saved_residuals(fn, *args)
    return printed.getvalue()


def test_the_backward_keeps_only_the_input() -> None:
    x = jnp.ones((64, 128), jnp.float32)
    ours = saved_residuals(lambda v: (gelu_tanh(v * 2.0) * 3.0).sum(), x)
    autodiff = saved_residuals(lambda v: (jax.nn.gelu(v * 2.0, approximate=True) * 3.0).sum(), x)
    assert ours.count("f32[64,128]") == 1, ours  # the GELU's input, from the multiply before it
    assert autodiff.count("f32[64,128]") > 1, autodiff  # what the custom backward avoids


def test_mlp_gradients_match_the_autodiff_gelu() -> None:
    """The MLP's gradients, jitted and vmapped, with the custom GELU against JAX's own differentiation."""
    mlp = MLP(16, 64, activation="gelu_tanh", key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 16), jnp.float32)

    def loss(model: MLP, autodiff: bool) -> jax.Array:
        up_proj, down_proj = model.up_proj, model.down_proj
        assert isinstance(up_proj, eqx.nn.Linear) and isinstance(down_proj, eqx.nn.Linear)
        assert up_proj.bias is not None and down_proj.bias is not None
        if autodiff:
            # The same layers, the GELU differentiated by JAX.
            up = jnp.einsum("btd,hd->bth", x, up_proj.weight) + up_proj.bias[None, None, :]
            hidden = jax.nn.gelu(up, approximate=True)
            out = jnp.einsum("bth,dh->btd", hidden, down_proj.weight) + down_proj.bias[None, None, :]
        else:
            out = jax.vmap(jax.vmap(model))(x)
        return jnp.sum(jnp.sin(out))

    ours = jax.jit(jax.grad(loss), static_argnums=1)(mlp, False)
    reference = jax.jit(jax.grad(loss), static_argnums=1)(mlp, True)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_forward_mode_and_second_derivatives_work() -> None:
    """``jax.jvp`` (which a custom VJP would refuse) and the second derivative of the custom GELU."""
    x = jnp.asarray(POINTS[::100], jnp.float32)
    _, tangent = jax.jvp(gelu_tanh, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(tangent), exact_slope(np.asarray(x, np.float64)), rtol=1e-6, atol=1e-6)
    second = jax.grad(lambda v: jax.grad(lambda w: gelu_tanh(w).sum())(v).sum())(x)
    x64, step = np.asarray(x, np.float64), 1e-5  # a central difference of the float64 slope: error ~1e-10
    expected = (exact_slope(x64 + step) - exact_slope(x64 - step)) / (2 * step)
    np.testing.assert_allclose(np.asarray(second), expected, rtol=1e-4, atol=1e-5)
