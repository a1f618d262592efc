"""A hand-written JAX GPT-2 (Radford et al. 2019, as nanoGPT's ``model.py`` writes it), independent of
xax's model code: the reference that xax's ``Transformer`` is timed against.

It is written plainly: a dictionary of float32 arrays per layer (one per block, no stacking), every
layer applied to the whole batch ``(B, T, D)``, the fused ``c_attn`` projection split into q, k and v,
attention through ``jax.nn.dot_product_attention`` in its native ``(B, T, heads, head_dim)`` layout,
LayerNorm statistics in float32, the tanh GELU, tied input and output embeddings, and the forward
pass in bfloat16 from weights cast once per step. The logits come out of the tied projection in
bfloat16 and the cross-entropy is computed in float32, as PyTorch's under ``torch.autocast``. Only
jax, numpy and optax are used.

    shape = GPTShape()                         # GPT-2 small
    params = init_params(shape, jax.random.key(0))
    step = make_train_step(shape, optax.adamw(6e-4), attention="cudnn")
    params, opt_state, loss = step(params, opt_state, windows, indices)

It relies on JAX's standard dtype promotion (optax's bias correction mixes float and int32): under
``jax_numpy_dtype_promotion="strict"``, call it inside ``jax.numpy_dtype_promotion("standard")``.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

Params = dict[str, Any]
Attention = Literal["cudnn", "xla"]


@dataclass(frozen=True)
class GPTShape:
    """The sizes of the reference GPT-2; defaults are GPT-2 small.

    Attributes:
        vocab_size: 50257 BPE tokens.
        block_size: 1024 positions.
        n_embd: 768 channels.
        n_layer: 12 blocks.
        n_head: 12 heads of 64 channels.
        eps: LayerNorm's epsilon, 1e-5.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    eps: float = 1e-5


# ---- parameters (float32, GPT-2's initialization) ------------------------------------------------


def _linear(key: PRNGKeyArray, fan_in: int, fan_out: int, std: float) -> Params:
    """``{"w": (fan_in, fan_out) ~ N(0, std), "b": zeros}``."""
    return {"w": std * jax.random.normal(key, (fan_in, fan_out), jnp.float32), "b": jnp.zeros(fan_out, jnp.float32)}


def _norm(dim: int) -> Params:
    return {"g": jnp.ones(dim, jnp.float32), "b": jnp.zeros(dim, jnp.float32)}


def init_params(shape: GPTShape, key: PRNGKeyArray) -> Params:
    """Weights N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 n_layer)) (GPT-2's scaled
    initialization), zero biases, unit LayerNorm gains."""
    d = shape.n_embd
    residual_std = 0.02 / math.sqrt(2 * shape.n_layer)
    keys = iter(jax.random.split(key, 2 + 4 * shape.n_layer))
    blocks = [
        {
            "ln_1": _norm(d),
            "c_attn": _linear(next(keys), d, 3 * d, 0.02),
            "c_proj": _linear(next(keys), d, d, residual_std),
            "ln_2": _norm(d),
            "c_fc": _linear(next(keys), d, 4 * d, 0.02),
            "mlp_proj": _linear(next(keys), 4 * d, d, residual_std),
        }
        for _ in range(shape.n_layer)
    ]
    return {
        "wte": 0.02 * jax.random.normal(next(keys), (shape.vocab_size, d), jnp.float32),
        "wpe": 0.02 * jax.random.normal(next(keys), (shape.block_size, d), jnp.float32),
        "blocks": blocks,
        "ln_f": _norm(d),
    }


def num_params(params: Params) -> int:
    return sum(int(np.prod(w.shape)) for w in jax.tree.leaves(params))


# ---- the forward pass -----------------------------------------------------------------------------


def dense(layer: Params, x: Array) -> Array:
    """``x w + b`` over the last axis of ``x``."""
    bias = layer["b"]
    return x @ layer["w"] + bias.reshape((1,) * (x.ndim - 1) + bias.shape)


def layer_norm(p: Params, x: Float[Array, "b t d"], eps: float) -> Float[Array, "b t d"]:
    """``(x - mean) / sqrt(var + eps) g + b``, statistics in float32, the result in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * p["g"].astype(jnp.float32)[None, None] + p["b"].astype(jnp.float32)[None, None]).astype(x.dtype)


def block(p: Params, x: Float[Array, "b t d"], shape: GPTShape, attention: Attention) -> Float[Array, "b t d"]:
    """``x += attn(ln_1(x)); x += mlp(ln_2(x))``."""
    b, t, d = x.shape
    qkv = dense(p["c_attn"], layer_norm(p["ln_1"], x, shape.eps)).reshape(b, t, 3, shape.n_head, d // shape.n_head)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, heads, head_dim) each
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention).reshape(b, t, d)
    x = x + dense(p["c_proj"], attended)
    hidden = jax.nn.gelu(dense(p["c_fc"], layer_norm(p["ln_2"], x, shape.eps)), approximate=True)
    return x + dense(p["mlp_proj"], hidden)


def forward(
    params: Params, tokens: Int[Array, "b t"], shape: GPTShape, attention: Attention
) -> Float[Array, "b t vocab"]:
    """The logits, in the dtype of ``params`` (cast them first for bf16 compute)."""
    x = params["wte"][tokens] + params["wpe"][None, : tokens.shape[1]]
    for block_params in params["blocks"]:
        x = block(block_params, x, shape, attention)
    return layer_norm(params["ln_f"], x, shape.eps) @ params["wte"].T  # tied output embedding


# ---- the loss and the training step ---------------------------------------------------------------


def loss_fn(
    params: Params,
    windows: Int[Array, "b t_plus_one"],
    shape: GPTShape,
    attention: Attention,
    compute_dtype: Any = jnp.bfloat16,
) -> Float[Array, ""]:
    """Mean next-token cross-entropy of windows of ``T + 1`` tokens; log-softmax in float32."""
    low = jax.tree.map(lambda w: w.astype(compute_dtype), params)
    logits = forward(low, windows[:, :-1], shape, attention).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def make_train_step(
    shape: GPTShape, optimizer: optax.GradientTransformation, attention: Attention, compute_dtype: Any = jnp.bfloat16
) -> Callable[..., tuple[Params, Any, Array]]:
    """``step(params, opt_state, windows, indices) -> (params, opt_state, loss)``: one optimizer step
    on the rows ``indices`` of the (device-resident) token windows; jitted, donating the weights and
    the optimizer state."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Params, opt_state: Any, windows: Array, indices: Array) -> tuple[Any, Any, Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, windows[indices], shape, attention, compute_dtype)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
