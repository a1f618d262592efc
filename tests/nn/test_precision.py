import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.jaxprs import dot_operand_dtypes
from xax.nn.precision import mixed_dot_general

# (B, T, D) x (V, D) -> (B, T, V): the output projection's layout.
LOGITS = (((2,), (1,)), ((), ()))


def _operands(dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (2, 5, 8)).astype(dtype)
    w = jax.random.normal(k2, (11, 8)).astype(dtype)
    g = jax.random.normal(k3, (2, 5, 11), dtype=jnp.float32)
    return x, w, g


def test_float32_operands_match_dot_general_exactly() -> None:
    x, w, g = _operands(jnp.dtype(jnp.float32))
    out, vjp = jax.vjp(lambda a, b: mixed_dot_general(a, b, LOGITS), x, w)
    ref, ref_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, LOGITS), x, w)
    np.testing.assert_array_equal(out, ref)
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        np.testing.assert_array_equal(got, want)


def test_bfloat16_forward_is_float32_and_gradients_match_float64_products() -> None:
    x, w, g = _operands(jnp.dtype(jnp.bfloat16))
    out, vjp = jax.vjp(lambda a, b: mixed_dot_general(a, b, LOGITS), x, w)
    assert out.dtype == jnp.float32
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(out, np.einsum("btd,vd->btv", x64, w64), rtol=1e-6, atol=1e-6)
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    g16 = np.asarray(g.astype(jnp.bfloat16), np.float64)  # the cotangent as the backward pass sees it
    # One bfloat16 rounding of a float32-accumulated product: within 2^-8 relative, plus slack near 0.
    np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum("btv,vd->btd", g16, w64), rtol=2**-8, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum("btv,btd->vd", g16, x64), rtol=2**-8, atol=1e-2)


def test_backward_matmuls_run_in_the_operand_dtype() -> None:
    x, w, _ = _operands(jnp.dtype(jnp.bfloat16))

    def loss(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.sum(jax.nn.log_softmax(mixed_dot_general(a, b, LOGITS)))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
    # The forward product and the two transposes.
    assert dot_operand_dtypes(jaxpr.jaxpr) == [[jnp.bfloat16, jnp.bfloat16]] * 3


def test_mismatched_operand_dtypes_are_refused_in_the_backward_pass() -> None:
    x, w, g = _operands(jnp.dtype(jnp.float32))
    _, vjp = jax.vjp(lambda a, b: mixed_dot_general(a, b, LOGITS), x.astype(jnp.bfloat16), w)
    with pytest.raises(TypeError, match="share a dtype"):
        vjp(g)
