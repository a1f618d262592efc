"""Small pieces shared by the diffusion networks: zero initialization and multi-head attention."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def zero_init(layer: eqx.nn.Linear | eqx.nn.Conv2d) -> eqx.nn.Linear | eqx.nn.Conv2d:
    """The layer with zero weights and bias, so that a residual branch starts as the identity (Goyal et al. 2017)."""
    layer = eqx.tree_at(lambda m: m.weight, layer, jnp.zeros_like(layer.weight))
    if layer.bias is not None:
        layer = eqx.tree_at(lambda m: m.bias, layer, jnp.zeros_like(layer.bias))
    return layer


def attention(
    q: Float[Array, "t d"], k: Float[Array, "s d"], v: Float[Array, "s d"], num_heads: int, impl: str | None
) -> Float[Array, "t d"]:
    """Multi-head softmax attention of ``(T, D)`` queries over ``(S, D)`` keys and values, through
    ``jax.nn.dot_product_attention`` (``impl``: "cudnn", "xla", or None to let JAX pick a fused kernel)."""
    split = lambda a: a.reshape(a.shape[0], num_heads, a.shape[1] // num_heads)  # noqa: E731  (T, N, D/N)
    # The XLA path promotes bf16 logits against float32 internally, which strict dtype promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        out = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation=impl)  # ty: ignore[invalid-argument-type]
    return out.reshape(q.shape[0], q.shape[1])  # (T, D)
