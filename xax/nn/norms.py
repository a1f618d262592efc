"""Normalization layers over the last axis: LayerNorm and RMSNorm.

Both compute their statistics in float32 whatever the input dtype (float64 for float64), then return
the input dtype, so bfloat16 activations do not lose the variance to rounding. Their derivatives are
their own (``layer_norm``, ``rms_normalize``): the backward pass recomputes the normalized input from
the input and the per-row statistics instead of keeping float32 copies of it, so a bfloat16 network
keeps and reads back less per norm.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float


def _last_axis(v: Array, ndim: int) -> Array:
    """Reshapes a (dim,) vector to broadcast against an array of rank ``ndim`` (explicit rank promotion)."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def _wide(x: Array) -> Array:
    """``x`` in float32, or float64 where it already is (the precision of the statistics)."""
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _moments(x: Array, eps: float) -> tuple[Array, Array]:
    """The mean and ``1 / sqrt(var + eps)`` over the last axis, in float32 (``_wide``), keeping that axis."""
    xf = _wide(x)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + eps)


def _affine(x: Array, mean: Array, rstd: Array, weight: Array | None, bias: Array | None) -> Array:
    """``(x - mean) rstd weight + bias`` in float32 (``_wide``), returned in the dtype of ``x``."""
    y = (_wide(x) - mean) * rstd
    if weight is not None:
        y = y * _last_axis(weight.astype(y.dtype), x.ndim)
    if bias is not None:
        y = y + _last_axis(bias.astype(y.dtype), x.ndim)
    return y.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def layer_norm(x: Array, weight: Array | None, bias: Array | None, eps: float) -> Array:
    """``(x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis, in float32 (float64
    for a float64 ``x``), returned in the dtype of ``x``; ``weight`` and ``bias`` may be None (no scale, no shift).

    Differentiated by JAX, the forward pass keeps the centred input and its scaled copy in float32
    for the backward: two arrays of twice the size of a bfloat16 input per call. Here the derivative
    is its own rule and the normalized input is rematerialized: the backward keeps only ``x`` (which
    the residual stream keeps anyway), the per-row mean and reciprocal deviation, and the weight.
    Forward-mode differentiation (``jax.jvp``) and higher derivatives work as usual.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[1.0, 1.0, 3.0, 3.0]])  # mean 2, variance 1
        >>> layer_norm(x, jnp.array([1.0, 2.0, 1.0, 2.0]), None, 0.0)[0].tolist()
        [-1.0, -2.0, 1.0, 2.0]
    """
    mean, rstd = _moments(x, eps)
    return _affine(x, mean, rstd, weight, bias)


@jax.checkpoint  # the normalized input is recomputed where the tangent is used, not kept
def _layer_norm_tangent(
    x: Array,
    mean: Array,
    rstd: Array,
    weight: Array | None,
    dx: Array | None,
    dweight: Array | None,
    dbias: Array | None,
) -> Array:
    """The tangent of ``layer_norm``: with ``n = (x - mean) rstd``, ``dn = rstd (dx - mean(dx) - n
    mean(n dx))``, and ``dy = dn weight + n dweight + dbias``, in float32 (``_wide``). None is a zero tangent."""
    normed = (_wide(x) - mean) * rstd
    dy = jnp.zeros_like(normed)
    if dx is not None:
        d32 = dx.astype(normed.dtype)
        dn = rstd * (d32 - jnp.mean(d32, axis=-1, keepdims=True) - normed * jnp.mean(normed * d32, -1, keepdims=True))
        dy = dn if weight is None else dn * _last_axis(weight.astype(dn.dtype), x.ndim)
    if dweight is not None:
        dy = dy + normed * _last_axis(dweight.astype(dy.dtype), x.ndim)
    if dbias is not None:
        dy = dy + _last_axis(dbias.astype(dy.dtype), x.ndim)
    return dy.astype(x.dtype)


def _tangent_or_none(tangent: object) -> Array | None:
    """The tangent, or None where it is a symbolic zero (an input not differentiated: no work for it)."""
    return tangent if isinstance(tangent, jax.Array) else None


@functools.partial(layer_norm.defjvp, symbolic_zeros=True)
def _layer_norm_jvp(eps: float, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    (x, weight, bias), tangents = primals, tuple(_tangent_or_none(t) for t in tangents)
    mean, rstd = _moments(x, eps)
    return _affine(x, mean, rstd, weight, bias), _layer_norm_tangent(x, mean, rstd, weight, *tangents)


class LayerNorm(eqx.Module):
    """Layer normalization (Ba et al. 2016, https://arxiv.org/abs/1607.06450).

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis (``layer_norm``,
    whose backward pass keeps only the input and the per-row statistics).

    Attributes:
        weight: The scale, shape (dim,), initialized to ones.
        bias: The shift, shape (dim,), initialized to zeros; None when ``use_bias=False``.
        eps: Added to the variance for stability.
    """

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, dtype: DTypeLike = jnp.float32) -> None:
        self.weight = jnp.ones((dim,), dtype=dtype)
        self.bias = jnp.zeros((dim,), dtype=dtype) if use_bias else None
        self.eps = eps

    def __call__(self, x: Float[Array, "*shape dim"]) -> Float[Array, "*shape dim"]:
        """Normalizes over the last axis; returns the dtype of ``x``."""
        return layer_norm(x, self.weight, self.bias, self.eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def rms_normalize(x: Array, eps: float) -> Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32 (float64 for a float64 ``x``),
    returned in the dtype of ``x``; as ``layer_norm``, its backward keeps only ``x`` and the per-row
    reciprocal root mean square, not a float32 copy of ``x``.

    Examples:
        >>> import jax.numpy as jnp
        >>> rms_normalize(jnp.array([[3.0, 4.0, 0.0, 0.0]]), 0.0)[0].tolist()  # root mean square 2.5
        [1.2000000476837158, 1.600000023841858, 0.0, 0.0]
    """
    xf = _wide(x)
    return (xf * _reciprocal_rms(xf, eps)).astype(x.dtype)


def _reciprocal_rms(xf: Array, eps: float) -> Array:
    """``1 / sqrt(mean(x^2) + eps)`` over the last axis, keeping it."""
    return jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)


@jax.checkpoint  # the normalized input is recomputed where the tangent is used, not kept
def _rms_normalize_tangent(x: Array, rstd: Array, dx: Array) -> Array:
    """With ``n = x rstd``: ``dn = rstd (dx - n mean(n dx))``, in float32 (``_wide``)."""
    normed = _wide(x) * rstd
    d = dx.astype(normed.dtype)
    return (rstd * (d - normed * jnp.mean(normed * d, axis=-1, keepdims=True))).astype(x.dtype)


@rms_normalize.defjvp
def _rms_normalize_jvp(eps: float, primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (dx,) = primals, tangents
    xf = _wide(x)
    rstd = _reciprocal_rms(xf, eps)
    return (xf * rstd).astype(x.dtype), _rms_normalize_tangent(x, rstd, dx)


class RMSNorm(eqx.Module):
    """Root-mean-square normalization (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467).

    ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last axis. As in Llama, the normalized
    value is cast back to the input dtype before the scale is applied.

    Examples:
        >>> import jax.numpy as jnp
        >>> norm = RMSNorm(2)
        >>> [round(v, 4) for v in norm(jnp.array([3.0, 4.0])).tolist()]  # divided by sqrt(12.5)
        [0.8485, 1.1314]

    Attributes:
        weight: The scale, shape (dim,), initialized to ones.
        eps: Added to the mean square for stability.
    """

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: DTypeLike = jnp.float32) -> None:
        self.weight = jnp.ones((dim,), dtype=dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "*shape dim"]) -> Float[Array, "*shape dim"]:
        """Normalizes over the last axis; returns the dtype of ``x``."""
        return _last_axis(self.weight.astype(x.dtype), x.ndim) * rms_normalize(x, self.eps)


def _layernorm(dim: int, eps: float, use_bias: bool) -> LayerNorm:
    return LayerNorm(dim, eps=eps, use_bias=use_bias)


def _rmsnorm(dim: int, eps: float, use_bias: bool) -> RMSNorm:
    return RMSNorm(dim, eps=eps)


# Norm constructors by name: (dim, eps, use_bias) -> layer. RMSNorm has no bias, so ignores use_bias.
NORM_TYPES = {"layernorm": _layernorm, "rmsnorm": _rmsnorm}


def make_norm(name: str, dim: int, eps: float, use_bias: bool = True) -> LayerNorm | RMSNorm:
    """Builds a norm layer by name ("layernorm" or "rmsnorm").

    Args:
        name: A key of ``NORM_TYPES``.
        dim: The normalized width.
        eps: Added to the variance (or mean square) for stability.
        use_bias: Whether a LayerNorm has a bias.

    Returns:
        The layer.

    Examples:
        >>> type(make_norm("rmsnorm", 8, eps=1e-5)).__name__
        'RMSNorm'
    """
    if name not in NORM_TYPES:
        raise ValueError(f"norm={name!r} is unknown; expected one of {sorted(NORM_TYPES)}")
    return NORM_TYPES[name](dim, eps, use_bias)
