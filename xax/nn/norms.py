"""Normalization layers over the last axis: LayerNorm and RMSNorm.

Both compute their statistics in float32 whatever the input dtype, then return the input dtype, so
bfloat16 activations do not lose the variance to rounding.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float


def _last_axis(v: Array, ndim: int) -> Array:
    """Reshapes a (dim,) vector to broadcast against an array of rank ``ndim`` (explicit rank promotion)."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


class LayerNorm(eqx.Module):
    """Layer normalization (Ba et al. 2016, https://arxiv.org/abs/1607.06450).

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis.

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
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * _last_axis(self.weight.astype(jnp.float32), x.ndim)
        if self.bias is not None:
            y = y + _last_axis(self.bias.astype(jnp.float32), x.ndim)
        return y.astype(x.dtype)


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
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return _last_axis(self.weight.astype(x.dtype), x.ndim) * y.astype(x.dtype)


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
