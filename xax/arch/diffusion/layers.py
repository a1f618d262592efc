"""Small pieces shared by the diffusion networks: zero initialization of residual branches."""

from typing import TypeVar

import equinox as eqx
import jax.numpy as jnp

Layer = TypeVar("Layer", eqx.nn.Linear, eqx.nn.Conv2d)


def zero_init(layer: Layer) -> Layer:
    """The layer with zero weights and bias, so that a residual branch starts as the identity (Goyal et al. 2017).

    Examples:
        >>> import equinox as eqx, jax
        >>> layer = zero_init(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
        >>> layer(jax.numpy.ones(3)).tolist()
        [0.0, 0.0]
    """
    layer = eqx.tree_at(lambda m: m.weight, layer, jnp.zeros_like(layer.weight))
    if layer.bias is not None:
        layer = eqx.tree_at(lambda m: m.bias, layer, jnp.zeros_like(layer.bias))
    return layer
