"""Embeddings shared by the diffusion networks: sinusoidal timestep features with their MLP, and the fixed
2-D sine-cosine positional embedding of image patches."""

import math
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

# The networks see t in [0, 1]; the sinusoids are laid out for steps in [0, 1000) as in Ho et al. (2020).
TIME_SCALE = 1000.0
MAX_PERIOD = 10_000.0


def timestep_embedding(
    t: Float[Array, "*batch"], dim: int, max_period: float = MAX_PERIOD
) -> Float[Array, "*batch dim"]:
    """Sinusoidal features of a time ``t`` in [0, 1] (Vaswani et al. 2017; Dhariwal & Nichol 2021's layout).

    With ``s = 1000 t``, ``half = dim // 2`` and ``f_i = max_period^(-i / half)``, the features are
    ``[cos(s f_0), ..., cos(s f_{half-1}), sin(s f_0), ..., sin(s f_{half-1})]`` (zero-padded to ``dim``).

    Examples:
        >>> import jax.numpy as jnp
        >>> timestep_embedding(jnp.array([0.0]), 4).tolist()  # cosines then sines of zero
        [[1.0, 1.0, 0.0, 0.0]]
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # (half,)
    angles = TIME_SCALE * t.astype(jnp.float32)[..., None] * freqs.reshape((1,) * t.ndim + (half,))  # (*batch, half)
    features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        features = jnp.concatenate([features, jnp.zeros((*features.shape[:-1], 1), features.dtype)], axis=-1)
    return features


@final
class TimestepEmbedder(eqx.Module):
    """Sinusoidal features of ``t`` followed by a two-layer SiLU MLP (Ho et al. 2020; Peebles & Xie 2023)."""

    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    frequency_dim: int = eqx.field(static=True)

    def __init__(self, frequency_dim: int, dim: int, *, key: PRNGKeyArray) -> None:
        key1, key2 = jax.random.split(key)
        self.linear1 = eqx.nn.Linear(frequency_dim, dim, key=key1)
        self.linear2 = eqx.nn.Linear(dim, dim, key=key2)
        self.frequency_dim = frequency_dim

    def __call__(self, t: Float[Array, ""]) -> Float[Array, " dim"]:
        features = timestep_embedding(t, self.frequency_dim).astype(self.linear1.weight.dtype)
        return self.linear2(jax.nn.silu(self.linear1(features)))


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[sin(p w_0), ..., sin(p w_{d/2-1}), cos(p w_0), ...]`` with ``w_i = 10000^(-2i / d)``, float64."""
    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = positions.reshape(-1)[:, None] * omega  # (P, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, height: int, width: int) -> np.ndarray:
    """The fixed 2-D positional embedding of a ``height x width`` patch grid (He et al. 2022 MAE; DiT).

    Token ``r * width + c`` gets ``[sincos_1d(dim / 2, c), sincos_1d(dim / 2, r)]``.

    Returns:
        A float64 array of shape (height * width, dim).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sine-cosine embedding needs a width divisible by 4, got dim={dim}")
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
