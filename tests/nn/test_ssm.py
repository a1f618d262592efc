"""SSM layers against exact formulas: loops of the recurrence in float64, and the matrix exponential.

Tolerance: every comparison of a float32 computation with an exact one allows a max abs error of
1e-5 times the scale of the expected values (at least 1). Float32 rounds at 6e-8 relative; the
sequences here are at most 16 steps of a contracting recurrence (|Ā| < 1) followed by a few
small matrix products, so the accumulated error stays two orders below that bound.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from xax.nn.ssm import DiagonalSSM, SelectiveSSM, SelectiveState, SSMLayer, linear_recurrence, zoh_discretize

TOL = 1e-5


def assert_close(actual: jax.Array | np.ndarray, expected: np.ndarray) -> None:
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(actual - expected)))
    assert err <= TOL * scale, f"max abs error {err:.3g} > {TOL * scale:.3g}"


def f64(x: jax.Array | None) -> np.ndarray:
    assert x is not None
    return np.asarray(x, dtype=np.float64)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    # jax.nn.gelu's default (approximate=True).
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x))


def diagonal_reference(layer: DiagonalSSM, u: np.ndarray) -> np.ndarray:
    """The diagonal SSM as a float64 loop, discretized with the matrix exponential."""
    is_complex = layer.a_im is not None
    a = -np.exp(f64(layer.log_neg_a_re)) + (1j * f64(layer.a_im) if is_complex else 0)
    b = f64(layer.b_re) + (1j * f64(layer.b_im) if is_complex else 0)
    c = f64(layer.c_re) + (1j * f64(layer.c_im) if is_complex else 0)
    dt = np.exp(f64(layer.log_dt))
    a_bar, b_bar = zoh_by_expm(a, b, dt)
    h = np.zeros(a.shape, np.complex128)
    out = []
    d_model = u.shape[1]
    for u_t in u:
        h = a_bar * h + b_bar @ u_t
        y = (2.0 if is_complex else 1.0) * np.real(c @ h) + f64(layer.d) * u_t
        z = f64(layer.w_out) @ gelu_tanh(y) + f64(layer.b_out)
        out.append(z[:d_model] / (1 + np.exp(-z[d_model:])))
    return np.stack(out)


def selective_reference(layer: SelectiveSSM, u: np.ndarray) -> np.ndarray:
    """The selective SSM as a float64 loop over time, written from the Mamba paper's equations."""
    e, k = layer.conv_w.shape
    n = layer.a_log.shape[1]
    xz = u @ f64(layer.w_in).T
    xs, z = xz[:, :e], xz[:, e:]
    a = -np.exp(f64(layer.a_log))
    h = np.zeros((e, n))
    out = []
    for t in range(len(u)):
        # Causal depthwise convolution: tap j weighs the input j steps back.
        conv = f64(layer.conv_b) + sum(f64(layer.conv_w)[:, k - 1 - j] * xs[t - j] for j in range(k) if t - j >= 0)
        x_t = silu(conv)
        dbc = f64(layer.w_x) @ x_t
        delta, b_t, c_t = dbc[: layer.dt_rank], dbc[layer.dt_rank : layer.dt_rank + n], dbc[layer.dt_rank + n :]
        dt = softplus(f64(layer.w_dt) @ delta + f64(layer.b_dt))
        h = np.exp(dt[:, None] * a) * h + (dt * x_t)[:, None] * b_t[None, :]
        y = (h @ c_t + f64(layer.d) * x_t) * silu(z[t])
        out.append(f64(layer.w_out) @ y)
    return np.stack(out)


def zoh_by_expm(a: np.ndarray, b: np.ndarray, dt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ZOH from its definition: expm([[aΔ, bΔ], [0, 0]]) = [[Ā, B̄], [0, I]], one mode at a time."""
    p, h = b.shape
    a_bar = np.zeros(p, np.complex128)
    b_bar = np.zeros((p, h), np.complex128)
    for i in range(p):
        m = np.zeros((1 + h, 1 + h), np.complex128)
        m[0, 0] = a[i] * dt[i]
        m[0, 1:] = b[i] * dt[i]
        e = scipy.linalg.expm(m)
        a_bar[i], b_bar[i] = e[0, 0], e[0, 1:]
    return a_bar, b_bar


# d_model 20 gives the selective layer dt_rank 2, so the split of W_x x is exercised.
D_MODEL = {"lin": 6, "inv": 6, "real": 6, "selective": 20}


def make_layer(kind: str, key: jax.Array) -> SSMLayer:
    if kind == "selective":
        return SelectiveSSM(D_MODEL[kind], d_state=3, d_conv=3, expand=2, key=key)
    return DiagonalSSM(D_MODEL[kind], 8, init=kind, key=key)


LAYER_KINDS = ["lin", "inv", "real", "selective"]


def reference(layer: SSMLayer, u: np.ndarray) -> np.ndarray:
    if isinstance(layer, SelectiveSSM):
        return selective_reference(layer, u)
    assert isinstance(layer, DiagonalSSM)
    return diagonal_reference(layer, u)


def inputs(kind: str, seq: int, key: jax.Array) -> jax.Array:
    return jax.random.normal(key, (seq, D_MODEL[kind]), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
def test_linear_recurrence_matches_loop(dtype: jnp.dtype) -> None:
    ka, kb, kh = jax.random.split(jax.random.key(0), 3)
    shape = (16, 3, 2)
    a = jax.random.uniform(ka, shape, jnp.float32, -1, 1).astype(dtype)
    b = jax.random.normal(kb, shape, dtype)
    h0 = jax.random.normal(kh, shape[1:], dtype)
    h = np.asarray(h0, np.complex128)
    expected = []
    for a_t, b_t in zip(np.asarray(a, np.complex128), np.asarray(b, np.complex128)):
        h = a_t * h + b_t
        expected.append(h)
    got = jax.jit(linear_recurrence)(a, b, h0)
    assert got.dtype == dtype
    expected = np.stack(expected)
    assert_close(got, expected if dtype == jnp.complex64 else expected.real)


@pytest.mark.parametrize("is_complex", [False, True])
def test_zoh_discretize_matches_matrix_exponential(is_complex: bool) -> None:
    ka, kai, kb, kdt = jax.random.split(jax.random.key(1), 4)
    a = -jnp.exp(jax.random.normal(ka, (5,), jnp.float32))
    b = jax.random.normal(kb, (5, 3), jnp.float32)
    if is_complex:
        a = jax.lax.complex(a, 3 * jax.random.normal(kai, (5,), jnp.float32))
    dt = jnp.exp(jax.random.uniform(kdt, (5,), jnp.float32, math.log(1e-3), math.log(1.0)))
    a_bar, b_bar = zoh_discretize(a, b, dt)
    exp_a, exp_b = zoh_by_expm(np.asarray(a, np.complex128), f64(b), f64(dt))
    assert a_bar.dtype == a.dtype
    assert b_bar.dtype == a.dtype
    assert_close(a_bar, exp_a if is_complex else exp_a.real)
    assert_close(b_bar, exp_b if is_complex else exp_b.real)


@pytest.mark.parametrize("init", ["lin", "inv", "real"])
def test_diagonal_init_follows_s4d(init: str) -> None:
    n = 8
    layer = DiagonalSSM(D_MODEL[init], n, init=init, key=jax.random.key(2))
    a_re = -np.exp(f64(layer.log_neg_a_re))
    if init == "real":
        assert layer.a_im is None
        np.testing.assert_allclose(a_re, -np.arange(1, n + 1), rtol=1e-6)
        return
    modes = np.arange(n // 2)
    expected_im = np.pi * modes if init == "lin" else n / np.pi * (n / (2 * modes + 1) - 1)
    np.testing.assert_allclose(a_re, -0.5, rtol=1e-6)
    np.testing.assert_allclose(f64(layer.a_im), expected_im, rtol=1e-6)
    dt = np.exp(f64(layer.log_dt))
    assert np.all((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6)))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_parallel_matches_float64_loop(kind: str) -> None:
    layer = make_layer(kind, jax.random.key(3))
    u = inputs(kind, 16, jax.random.key(4))
    assert_close(eqx.filter_jit(layer.__call__)(u), reference(layer, f64(u)))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_recurrent_matches_parallel(kind: str) -> None:
    layer = make_layer(kind, jax.random.key(5))
    u = inputs(kind, 12, jax.random.key(6))
    parallel = eqx.filter_jit(layer.parallel)
    y_par, s_par = parallel(u, layer.init_state())
    # A sequence split in two, the second half continuing from the state after the first.
    y_a, s_a = parallel(u[:6], layer.init_state())
    y_b, _ = parallel(u[6:], s_a)
    assert_close(jnp.concatenate([y_a, y_b]), f64(y_par))
    step = eqx.filter_jit(layer.step)
    state = layer.init_state()
    ys = []
    for u_t in u:
        y_t, state = step(u_t, state)
        ys.append(y_t)
    assert_close(jnp.stack(ys), f64(y_par))
    if isinstance(state, SelectiveState):
        # (d_conv - 1, E) and (E, N) for E = expand * d_model.
        assert state.conv.shape == (2, 40)
        assert state.ssm.shape == (40, 3)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(s_par), strict=True):
        assert_close(got, np.asarray(want))


@pytest.mark.parametrize("kind", ["lin", "selective"])
def test_bfloat16_activations_and_gradients(kind: str) -> None:
    layer = make_layer(kind, jax.random.key(9))
    u = inputs(kind, 8, jax.random.key(10))
    forward = eqx.filter_jit(layer.__call__)
    y32 = forward(u)
    y16 = forward(u.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 per op); 5e-2 of the output scale
    # bounds a handful of rounded matrix products, and would be exceeded by a bfloat16 recurrence.
    scale = float(jnp.max(jnp.abs(y32)))
    assert float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32))) <= 5e-2 * scale
    _, state = eqx.filter_jit(layer.step)(u[0].astype(jnp.bfloat16), layer.init_state())
    assert all(leaf.dtype in (jnp.float32, jnp.complex64) for leaf in jax.tree.leaves(state))

    def loss(m: SSMLayer, x: jax.Array) -> jax.Array:
        return jnp.sum(m(x).astype(jnp.float32) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(layer, u)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_array))
    assert leaves
    for leaf in leaves:
        assert leaf.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in leaves)


def test_invalid_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"init='hippo'.*expected one of"):
        DiagonalSSM(4, 8, init="hippo", key=jax.random.key(0))
    with pytest.raises(ValueError, match="d_state=7"):
        DiagonalSSM(4, 7, init="lin", key=jax.random.key(0))
    with pytest.raises(ValueError, match="d_conv=0"):
        SelectiveSSM(4, d_conv=0, key=jax.random.key(0))
