"""A hand-written JAX DiT (Peebles & Xie 2023), independent of xax's model code: the reference that
xax's ``DiT`` is timed against.

It is written plainly, as the paper's ``models.py`` is: a dictionary of float32 arrays per layer
(one per block, no stacking), every layer applied to the whole batch ``(B, T, D)``, attention
through ``jax.nn.dot_product_attention`` in its native ``(B, T, heads, head_dim)`` layout, and the
forward pass in bfloat16 from weights cast once per step. Only jax, numpy and optax are used.

The loss is the one of ``benchmarks.dit_throughput``: eps prediction on Ho et al. (2020)'s linear
1000-step schedule, one uniform step per sample shown at time ``(i + 1) / 1000``, and each label
replaced by the null label with probability 0.1 (Ho & Salimans 2022).

    shape = DiTShape()                        # DiT-B/2 on 32x32x4 latents
    params = init_params(shape, jax.random.key(0))
    step = make_train_step(shape, optax.adamw(1e-4), attention="cudnn")
    params, opt_state, key, loss = step(params, opt_state, key, latents, labels, indices)

It relies on JAX's standard dtype promotion (jax.nn's XLA attention mixes bf16 and float32 logits,
optax's bias correction float and int32): under ``jax_numpy_dtype_promotion="strict"``, call it
inside ``jax.numpy_dtype_promotion("standard")``.
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
class DiTShape:
    """The sizes of the reference DiT; defaults are DiT-B/2 on 32x32x4 latents.

    Attributes:
        input_size: 32, the latent side of a 256x256 image through an 8x-downsampling VAE.
        patch_size: 2, giving 256 tokens.
        in_channels: 4 (Stable Diffusion VAE latents); the output has as many (eps prediction).
        hidden_dim: 768 (DiT-B).
        depth: 12 (DiT-B).
        num_heads: 12 (DiT-B), 64 channels each.
        mlp_ratio: 4.0, as ViT.
        num_classes: 1000 ImageNet classes; label ``num_classes`` is the null label.
        frequency_dim: 256 sinusoidal timestep features, DiT's value.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    frequency_dim: int = 256

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2


# ---- parameters (float32, DiT's initialization) --------------------------------------------------


def _linear(key: PRNGKeyArray, fan_in: int, fan_out: int, init: str = "xavier") -> Params:
    """``{"w": (fan_in, fan_out), "b": (fan_out,)}``: Xavier-uniform, N(0, 0.02) or zero weights; zero bias."""
    if init == "xavier":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        w = jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -limit, limit)
    elif init == "normal":
        w = 0.02 * jax.random.normal(key, (fan_in, fan_out), jnp.float32)
    else:
        w = jnp.zeros((fan_in, fan_out), jnp.float32)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def init_params(shape: DiTShape, key: PRNGKeyArray) -> Params:
    """Float32 weights initialized as DiT's ``initialize_weights``: Xavier-uniform linears, N(0, 0.02)
    label table and timestep MLP, and zero adaLN modulations and output layer (adaLN-Zero)."""
    d, p, c = shape.hidden_dim, shape.patch_size, shape.in_channels
    hidden = int(d * shape.mlp_ratio)
    keys = iter(jax.random.split(key, 6 + 5 * shape.depth))
    blocks = [
        {
            "modulation": _linear(next(keys), d, 6 * d, "zero"),
            "qkv": _linear(next(keys), d, 3 * d),
            "proj": _linear(next(keys), d, d),
            "fc1": _linear(next(keys), d, hidden),
            "fc2": _linear(next(keys), hidden, d),
        }
        for _ in range(shape.depth)
    ]
    return {
        # A patch-by-patch linear map, the conv of kernel = stride = p; rows in (p, p, C) order.
        "patch": _linear(next(keys), p * p * c, d),
        "time1": _linear(next(keys), shape.frequency_dim, d, "normal"),
        "time2": _linear(next(keys), d, d, "normal"),
        "label": 0.02 * jax.random.normal(next(keys), (shape.num_classes + 1, d), jnp.float32),
        "blocks": blocks,
        "final_modulation": _linear(next(keys), d, 2 * d, "zero"),
        "final": _linear(next(keys), d, p * p * c, "zero"),
    }


# ---- the forward pass -----------------------------------------------------------------------------


def position_table(dim: int, grid: int) -> np.ndarray:
    """MAE's fixed 2-D sine-cosine table (T, dim): token ``r * grid + c`` gets ``[1d(c), 1d(r)]`` with
    ``1d(x) = [sin(x w_i), cos(x w_i)]`` and ``w_i = 10000^(-i / (dim / 4))``."""
    omega = 1.0 / 10_000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one_d(x: np.ndarray) -> np.ndarray:
        angles = x.reshape(-1, 1) * omega  # (T, dim / 4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_d(cols), one_d(rows)], axis=1).astype(np.float32)


def timestep_features(t: Float[Array, " b"], dim: int) -> Float[Array, "b dim"]:
    """``[cos(1000 t f_i), sin(1000 t f_i)]`` with ``f_i = 10000^(-i / (dim / 2))``, float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None, :]  # (B, half)
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


def dense(layer: Params, x: Array) -> Array:
    """``x w + b`` over the last axis of ``x``."""
    bias = layer["b"]
    return x @ layer["w"] + bias.reshape((1,) * (x.ndim - 1) + bias.shape)


def layer_norm(x: Float[Array, "b t d"], eps: float = 1e-6) -> Float[Array, "b t d"]:
    """LayerNorm without affine parameters, statistics in float32, the result in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: Float[Array, "b t d"], shift: Float[Array, "b d"], scale: Float[Array, "b d"]) -> Array:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def block(
    p: Params, x: Float[Array, "b t d"], c: Float[Array, "b d"], num_heads: int, attention: Attention
) -> Float[Array, "b t d"]:
    """``x += g1 attn(mod(LN(x), s1, c1)); x += g2 mlp(mod(LN(x), s2, c2))``, adaLN-Zero."""
    b, t, d = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(dense(p["modulation"], jax.nn.silu(c)), 6, axis=-1)
    qkv = dense(p["qkv"], modulate(layer_norm(x), shift1, scale1)).reshape(b, t, 3, num_heads, d // num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, heads, head_dim) each
    attended = jax.nn.dot_product_attention(q, k, v, implementation=attention).reshape(b, t, d)
    x = x + gate1[:, None, :] * dense(p["proj"], attended)
    hidden = jax.nn.gelu(dense(p["fc1"], modulate(layer_norm(x), shift2, scale2)), approximate=True)
    return x + gate2[:, None, :] * dense(p["fc2"], hidden)


def forward(
    params: Params,
    x: Float[Array, "b c h w"],
    t: Float[Array, " b"],
    y: Int[Array, " b"],
    shape: DiTShape,
    attention: Attention,
) -> Float[Array, "b c h w"]:
    """The DiT in the dtype of ``params`` (cast them first for bf16 compute); ``t`` in [0, 1]."""
    dtype = params["patch"]["w"].dtype
    b, p, g, c_in = x.shape[0], shape.patch_size, shape.grid, shape.in_channels
    patches = x.reshape(b, c_in, g, p, g, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c_in)
    tokens = dense(params["patch"], patches.astype(dtype))  # (B, T, D)
    tokens = tokens + jnp.asarray(position_table(shape.hidden_dim, g), dtype)[None]
    time = dense(
        params["time2"], jax.nn.silu(dense(params["time1"], timestep_features(t, shape.frequency_dim).astype(dtype)))
    )
    c = time + params["label"][y]  # (B, D)
    for block_params in params["blocks"]:
        tokens = block(block_params, tokens, c, shape.num_heads, attention)
    shift, scale = jnp.split(dense(params["final_modulation"], jax.nn.silu(c)), 2, axis=-1)
    out = dense(params["final"], modulate(layer_norm(tokens), shift, scale))  # (B, T, p * p * C)
    out = out.reshape(b, g, g, p, p, c_in).transpose(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
    return out.reshape(b, c_in, g * p, g * p)


# ---- the loss and the training step ---------------------------------------------------------------

# Ho & Salimans (2022)'s probability of training on the null label.
LABEL_DROP = 0.1


def linear_alpha_bar(num_steps: int = 1000) -> np.ndarray:
    """``prod_{j <= i} (1 - beta_j)`` of Ho et al. (2020)'s betas, linspace(1e-4, 0.02), float32."""
    betas = np.linspace(1e-4 * 1000 / num_steps, 0.02 * 1000 / num_steps, num_steps, dtype=np.float64)
    return np.cumprod(1 - betas).astype(np.float32)


def loss_fn(
    params: Params,
    latents: Float[Array, "b chw"],
    labels: Int[Array, " b"],
    key: PRNGKeyArray,
    shape: DiTShape,
    alpha_bar: Float[Array, " steps"],
    attention: Attention,
    compute_dtype: Any = jnp.bfloat16,
) -> Float[Array, ""]:
    """The eps-prediction loss ``E ||f(x_t, t, y) - eps||^2`` with label dropout, float32."""
    step_key, noise_key, drop_key = jax.random.split(key, 3)
    b = latents.shape[0]
    x0 = latents.reshape(b, shape.in_channels, shape.input_size, shape.input_size)
    step = jax.random.randint(step_key, (b,), 0, alpha_bar.shape[0])
    eps = jax.random.normal(noise_key, x0.shape, jnp.float32)
    level = alpha_bar[step][:, None, None, None]
    x_t = jnp.sqrt(level) * x0 + jnp.sqrt(1 - level) * eps
    y = jnp.where(jax.random.bernoulli(drop_key, LABEL_DROP, (b,)), shape.num_classes, labels)
    t = (step + 1).astype(jnp.float32) / alpha_bar.shape[0]
    low = jax.tree.map(lambda w: w.astype(compute_dtype), params)
    out = forward(low, x_t, t, y, shape, attention).astype(jnp.float32)
    return jnp.mean(jnp.square(out - eps))


def make_train_step(
    shape: DiTShape, optimizer: optax.GradientTransformation, attention: Attention, compute_dtype: Any = jnp.bfloat16
) -> Callable[..., tuple[Params, Any, PRNGKeyArray, Array]]:
    """``step(params, opt_state, key, latents, labels, indices) -> (params, opt_state, key, loss)``:
    one AdamW step on the rows ``indices`` of the (device-resident) training set ``latents``,
    ``labels``; jitted, donating the weights, optimizer state and key."""
    alpha_bar = jnp.asarray(linear_alpha_bar())

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Params, opt_state: Any, key: PRNGKeyArray, latents: Array, labels: Array, indices: Array) -> tuple:
        key, step_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(
            params, latents[indices], labels[indices], step_key, shape, alpha_bar, attention, compute_dtype
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    return step


def num_params(params: Params) -> int:
    return sum(int(np.prod(w.shape)) for w in jax.tree.leaves(params))
