"""Small pieces shared by the diffusion networks: zero initialization and multi-head attention."""

from typing import Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from xax.nn.attention import xla_attention

# The implementations of jax.nn.dot_product_attention by config name; None lets JAX pick (cuDNN on GPU).
IMPLEMENTATIONS: dict[str | None, Literal["xla", "cudnn"] | None] = {"xla": "xla", "cudnn": "cudnn", None: None}

Layer = TypeVar("Layer", eqx.nn.Linear, eqx.nn.Conv2d)


def zero_init(layer: Layer) -> Layer:
    """The layer with zero weights and bias, so that a residual branch starts as the identity (Goyal et al. 2017)."""
    layer = eqx.tree_at(lambda m: m.weight, layer, jnp.zeros_like(layer.weight))
    if layer.bias is not None:
        layer = eqx.tree_at(lambda m: m.bias, layer, jnp.zeros_like(layer.bias))
    return layer


def attention(
    q: Float[Array, "t d"], k: Float[Array, "s d"], v: Float[Array, "s d"], num_heads: int, impl: str | None
) -> Float[Array, "t d"]:
    """Multi-head softmax attention of ``(T, D)`` queries over ``(S, D)`` keys and values.

    ``impl``: "cudnn" (cuDNN's fused kernel through ``jax.nn.dot_product_attention``), "xla" (plain
    XLA ops whose backward matmuls run in the inputs' dtype, as the forward's do), or None: cuDNN
    where JAX can use it on a GPU, else the XLA ops.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={impl!r} is unknown; use 'xla', 'cudnn' or None")
    split = lambda a: a.reshape(1, a.shape[0], num_heads, a.shape[1] // num_heads)  # noqa: E731  (1, T, N, D/N)
    if impl == "xla" or (impl is None and jax.default_backend() != "gpu"):
        out = xla_attention(split(q), split(k), split(v))
    else:
        # jax.nn's own fallback from cuDNN promotes bf16 logits against float32 internally, which strict
        # dtype promotion refuses.
        with jax.numpy_dtype_promotion("standard"):
            out = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation=IMPLEMENTATIONS[impl])
    return out.reshape(q.shape[0], q.shape[1])  # (T, D)
