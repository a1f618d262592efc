"""The multimodal diffusion transformer (mmDiT) of Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", section 4 and Figure 2).

Image tokens (patches of a ``(C, H, W)`` input plus positions) and context tokens (a text encoder's hidden
states, projected to ``d_model``) keep separate weights but attend jointly over the concatenated sequence
``[context, image]`` in every block. Each stream is modulated by adaLN-Zero from one conditioning vector
``vec = embed(t) + embed(pooled text)``, where the pooled text is the mean of the context tokens that the mask
keeps. The last block updates the image stream alone (SD3's ``context_pre_only``), and a final adaLN layer
unpatchifies it. The full blocks are stored stacked along a leading axis and applied in a loop or ``lax.scan``.
"""

from dataclasses import dataclass
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from xax.arch.config import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    ModelConfigError,
    ShardingRules,
    check_choice,
    check_positive,
)
from xax.arch.diffusion.embeddings import TimestepEmbedder, sincos_2d
from xax.arch.diffusion.layers import zero_init
from xax.arch.dit import LEGACY_PARAM_NAMES, FinalLayer, block_mlp, layer_norm, modulate, unpatchify
from xax.core.config import field, register_config
from xax.nn.attention import dot_product_attention
from xax.nn.mlp import MLP

POSITION_TYPES = ("learned", "sincos")


@register_config
@dataclass(frozen=True)
class MMDiTConfig:
    """The shape of an mmDiT; defaults are SD3-medium's width (24 heads of 64) on 32x32x4 latents, at 12 blocks.

    A block alone (``MMDiTBlock``) reads only ``d_model``, ``num_heads``, ``mlp_ratio`` and ``attention_impl``.
    """

    input_size: int = field(32, help="Side of the square input: 32 for the latents of 256x256 images")
    patch_size: int = field(2, help="Side of a patch; 2 as in SD3 and DiT's best trade-off")
    in_channels: int = field(4, help="Input channels: 4 for Stable Diffusion VAE latents")
    out_channels: int | None = field(None, help="Output channels; None repeats in_channels (a velocity)")
    context_dim: int = field(768, help="Width of the text encoder's hidden states; 768 is CLIP-L's and GPT-2's")
    d_model: int = field(1536, help="Token width of both streams; 1536 is SD3-medium (24 heads of 64)")
    num_layers: int = field(12, help="Joint blocks, the last updating the image stream alone; SD3-medium has 24")
    num_heads: int = field(24, help="Attention heads; 24 gives SD3-medium's 64-wide heads")
    mlp_ratio: float = field(4.0, help="MLP hidden width over d_model; 4 as in ViT and SD3")
    positions: str = field(
        "learned",
        help="Image-token positions: 'learned' (a table, initialized to the 2-D sine-cosine embedding, as SD3's "
        "trainable table) or 'sincos' (fixed)",
    )
    frequency_dim: int = field(256, help="Sinusoidal timestep features fed to the timestep MLP (DiT's value)")
    attention_impl: str | None = field(
        None, help="'xla', 'cudnn' or None, which lets JAX pick: cuDNN on a GPU where it can, else XLA"
    )
    remat: str = field(
        "none", help="Recompute each block in the backward pass: none (fastest), full, or dots_saveable (keep matmuls)"
    )
    scan_layers: bool = field(
        False,
        help="Apply the stacked blocks with lax.scan (compile time flat in depth); off, as DiT's: the loop is faster",
    )

    def __post_init__(self) -> None:
        check_choice(self, "attention_impl", ATTENTION_IMPLS)
        check_choice(self, "remat", REMAT_POLICIES)
        check_choice(self, "positions", POSITION_TYPES)
        check_positive(self, "input_size", "patch_size", "in_channels", "context_dim", "d_model", "num_layers")
        check_positive(self, "num_heads", "frequency_dim")
        if self.d_model % self.num_heads:
            raise ModelConfigError(
                f"MMDiTConfig.d_model={self.d_model} must be divisible by num_heads={self.num_heads}; "
                "change d_model or num_heads"
            )
        if self.d_model % 4:
            raise ModelConfigError(
                f"MMDiTConfig.d_model={self.d_model} must be divisible by 4 (the 2-D sine-cosine positions)"
            )
        if self.input_size % self.patch_size:
            raise ModelConfigError(
                f"MMDiTConfig.patch_size={self.patch_size} must divide input_size={self.input_size}; pick a divisor"
            )

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size


# Logical axes of the parameters (xax.parallel.rules), the same as DiT's: each stream's fused qkv and MLP
# first layer split by columns, its attention output and MLP second layer by rows.
SHARDING_RULES: ShardingRules = (
    (r"(^|\.)qkv\.weight$", ("heads", "embed")),
    (r"(^|\.)qkv\.bias$", ("heads",)),
    (r"(^|\.)proj\.weight$", ("embed", "heads")),
    (r"(^|\.)mlp\.up_proj\.weight$", ("mlp", "embed")),
    (r"(^|\.)mlp\.up_proj\.bias$", ("mlp",)),
    (r"(^|\.)mlp\.down_proj\.weight$", ("embed", "mlp")),
    (r"(^|\.)mlp\.down_proj\.bias$", (None,)),
)


@final
class StreamWeights(eqx.Module):
    """One stream's weights in an mmDiT block: adaLN modulation, qkv, output projection and MLP."""

    modulation: eqx.nn.Linear
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    mlp: MLP
    LEGACY_PARAM_NAMES: ClassVar[tuple[tuple[str, str], ...]] = LEGACY_PARAM_NAMES

    def __init__(self, config: MMDiTConfig, *, key: PRNGKeyArray) -> None:
        keys = jax.random.split(key, 4)
        dim = config.d_model
        self.modulation = zero_init(eqx.nn.Linear(dim, 6 * dim, key=keys[0]))
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=keys[1])
        self.proj = eqx.nn.Linear(dim, dim, key=keys[2])
        self.mlp = block_mlp(dim, config.mlp_ratio, keys[3])

    def modulations(self, vec: Float[Array, " d"]) -> tuple[Array, ...]:
        """``(shift1, scale1, gate1, shift2, scale2, gate2)``, zero at initialization."""
        return tuple(jnp.split(self.modulation(jax.nn.silu(vec)), 6))

    def qkv_of(self, x: Float[Array, "t d"], vec: Float[Array, " d"]) -> tuple[Array, Array, Array]:
        shift, scale = self.modulations(vec)[:2]
        q, k, v = jnp.split(jax.vmap(self.qkv)(modulate(layer_norm(x), shift, scale)), 3, axis=-1)
        return q, k, v

    def finish(self, x: Float[Array, "t d"], attended: Float[Array, "t d"], vec: Float[Array, " d"]) -> Array:
        """The residual updates after attention: ``x += g1 proj(a)``, then ``x += g2 mlp(modulate(LN(x)))``."""
        _, _, gate1, shift2, scale2, gate2 = self.modulations(vec)
        x = x + gate1[None, :] * jax.vmap(self.proj)(attended)
        return x + gate2[None, :] * self.mlp(modulate(layer_norm(x), shift2, scale2))


@final
class ContextInput(eqx.Module):
    """The context stream of the last block, which only feeds the joint attention: modulation and qkv."""

    modulation: eqx.nn.Linear
    qkv: eqx.nn.Linear

    def __init__(self, config: MMDiTConfig, *, key: PRNGKeyArray) -> None:
        key1, key2 = jax.random.split(key)
        dim = config.d_model
        self.modulation = zero_init(eqx.nn.Linear(dim, 2 * dim, key=key1))
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=key2)

    def qkv_of(self, x: Float[Array, "t d"], vec: Float[Array, " d"]) -> tuple[Array, Array, Array]:
        shift, scale = jnp.split(self.modulation(jax.nn.silu(vec)), 2)
        q, k, v = jnp.split(jax.vmap(self.qkv)(modulate(layer_norm(x), shift, scale)), 3, axis=-1)
        return q, k, v


def joint_attention(
    streams: tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]],
    num_heads: int,
    impl: str | None,
    context_mask: Bool[Array, " tc"] | None,
) -> tuple[Float[Array, "tc d"], Float[Array, "tx d"]]:
    """Attention over ``[context, image]`` from each stream's ``(q, k, v)``; returns each stream's share.

    Context tokens where ``context_mask`` is False (padding) are no key for any query.
    """
    (qc, kc, vc), (qx, kx, vx) = streams
    num_context = qc.shape[0]
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731  (Tc + Tx, D)
    heads = lambda a: a.reshape(1, a.shape[0], num_heads, -1)  # noqa: E731  (1, Tc + Tx, N, D/N)
    q, k, v = heads(cat(qc, qx)), heads(cat(kc, kx)), heads(cat(vc, vx))
    key_mask = None
    if context_mask is not None:
        key_mask = cat(context_mask.astype(bool), jnp.ones(qx.shape[0], bool))[None]  # (1, Tc + Tx)
    attended = dot_product_attention(q, k, v, key_mask=key_mask, causal=False, implementation=impl)
    attended = attended.reshape(q.shape[1], -1)  # (Tc + Tx, D)
    return attended[:num_context], attended[num_context:]


@final
class MMDiTBlock(eqx.Module):
    """The SD3 block: image and context tokens keep separate weights but attend jointly over the
    concatenated sequence ``[context, image]`` (Esser et al. 2024, section 4 and Figure 2b)."""

    image: StreamWeights
    context: StreamWeights
    num_heads: int = eqx.field(static=True)
    impl: str | None = eqx.field(static=True)

    def __init__(self, config: MMDiTConfig, *, key: PRNGKeyArray) -> None:
        key1, key2 = jax.random.split(key)
        self.image = StreamWeights(config, key=key1)
        self.context = StreamWeights(config, key=key2)
        self.num_heads, self.impl = config.num_heads, config.attention_impl

    def __call__(
        self,
        x: Float[Array, "tx d"],
        context: Float[Array, "tc d"],
        vec: Float[Array, " d"],
        context_mask: Bool[Array, " tc"] | None = None,
    ) -> tuple[Float[Array, "tx d"], Float[Array, "tc d"]]:
        """Updates both streams given the conditioning vector ``vec`` (timestep and pooled text embedding)."""
        streams = (self.context.qkv_of(context, vec), self.image.qkv_of(x, vec))
        attended_context, attended_x = joint_attention(streams, self.num_heads, self.impl, context_mask)
        return self.image.finish(x, attended_x, vec), self.context.finish(context, attended_context, vec)


@final
class LastMMDiTBlock(eqx.Module):
    """The last block: the context tokens are keys and values for the image tokens, and are not updated."""

    image: StreamWeights
    context: ContextInput
    num_heads: int = eqx.field(static=True)
    impl: str | None = eqx.field(static=True)

    def __init__(self, config: MMDiTConfig, *, key: PRNGKeyArray) -> None:
        key1, key2 = jax.random.split(key)
        self.image = StreamWeights(config, key=key1)
        self.context = ContextInput(config, key=key2)
        self.num_heads, self.impl = config.num_heads, config.attention_impl

    def __call__(
        self,
        x: Float[Array, "tx d"],
        context: Float[Array, "tc d"],
        vec: Float[Array, " d"],
        context_mask: Bool[Array, " tc"] | None = None,
    ) -> Float[Array, "tx d"]:
        streams = (self.context.qkv_of(context, vec), self.image.qkv_of(x, vec))
        _, attended_x = joint_attention(streams, self.num_heads, self.impl, context_mask)
        return self.image.finish(x, attended_x, vec)


def pool_context(context: Float[Array, "tc dc"], context_mask: Bool[Array, " tc"] | None) -> Float[Array, " dc"]:
    """The mean of the context tokens the mask keeps (all of them without a mask), in float32."""
    context32 = context.astype(jnp.float32)
    if context_mask is None:
        return context32.mean(axis=0)
    weights = context_mask.astype(jnp.float32)
    return (context32 * weights[:, None]).sum(axis=0) / jnp.maximum(weights.sum(), 1.0)


@final
class MMDiT(eqx.Module):
    """The mmDiT denoiser; see :class:`MMDiTConfig`. It computes in the dtype of its weights."""

    patch_embed: eqx.nn.Conv2d
    pos_embed: Float[Array, "t d"] | None  # the learned table; None for fixed sine-cosine positions
    time_embed: TimestepEmbedder
    context_embed: eqx.nn.Linear
    pooled_embed: eqx.nn.Linear
    blocks: MMDiTBlock | None  # stacked: every leaf has a leading (num_layers - 1,) axis; None for one block
    last: LastMMDiTBlock
    final: FinalLayer
    config: MMDiTConfig = eqx.field(static=True)

    def __init__(self, config: MMDiTConfig, *, key: PRNGKeyArray) -> None:
        keys = jax.random.split(key, 7)
        dim, patch = config.d_model, config.patch_size
        self.config = config
        self.patch_embed = eqx.nn.Conv2d(config.in_channels, dim, patch, stride=patch, key=keys[0])
        self.pos_embed = None
        if config.positions == "learned":
            self.pos_embed = jnp.asarray(sincos_2d(dim, config.grid, config.grid), jnp.float32)
        self.time_embed = TimestepEmbedder(config.frequency_dim, dim, key=keys[1])
        self.context_embed = eqx.nn.Linear(config.context_dim, dim, key=keys[2])
        self.pooled_embed = eqx.nn.Linear(config.context_dim, dim, key=keys[3])
        self.blocks = None
        if config.num_layers > 1:
            make = lambda k: MMDiTBlock(config, key=k)  # noqa: E731
            self.blocks = eqx.filter_vmap(make)(jax.random.split(keys[4], config.num_layers - 1))
        self.last = LastMMDiTBlock(config, key=keys[5])
        out = config.out_channels or config.in_channels
        self.final = FinalLayer(dim, patch * patch * out, key=keys[6])

    def block(self, index: int) -> MMDiTBlock:
        """The ``index``-th full block, unstacked (``index < num_layers - 1``)."""
        if self.blocks is None or not 0 <= index < self.config.num_layers - 1:
            raise IndexError(f"block {index} is not one of the {self.config.num_layers - 1} full blocks")
        arrays, static = eqx.partition(self.blocks, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[index], arrays), static)

    def positions(self, dtype: Any) -> Float[Array, "t d"]:
        """The image tokens' positional embedding, in ``dtype``."""
        if self.pos_embed is not None:
            return self.pos_embed.astype(dtype)
        grid = self.config.grid
        return jnp.asarray(np.asarray(sincos_2d(self.config.d_model, grid, grid)), dtype)

    def __call__(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        context: Float[Array, "tc dc"],
        context_mask: Bool[Array, " tc"] | None = None,
    ) -> Float[Array, "c h w"]:
        """Predicts the network target for one input ``x`` at time ``t`` in [0, 1], given context tokens.

        Args:
            x: The noisy input (C, H, W).
            t: The time (or noise level) in [0, 1].
            context: The text encoder's hidden states (Tc, context_dim).
            context_mask: False at padding context tokens (Tc,); None keeps them all.

        Returns:
            The prediction, of ``x``'s spatial shape, in the weights' dtype.
        """
        config = self.config
        size, patch = config.input_size, config.patch_size
        if x.shape[1:] != (size, size):
            raise ValueError(f"mmDiT input is {x.shape[1:]} but MMDiTConfig.input_size={size}; resize or reconfigure")
        if context.shape[-1] != config.context_dim:
            raise ValueError(
                f"mmDiT context is {context.shape[-1]} wide but MMDiTConfig.context_dim={config.context_dim}; "
                "set context_dim to the text encoder's width"
            )
        dtype = self.context_embed.weight.dtype
        tokens = self.patch_embed(x.astype(dtype))  # (D, H/p, W/p)
        dim = tokens.shape[0]
        tokens = tokens.reshape(dim, -1).T + self.positions(dtype)  # (T, D)
        pooled = pool_context(context, context_mask).astype(dtype)  # (Dc,)
        vec = self.time_embed(t) + self.pooled_embed(pooled)  # (D,)
        ctx = jax.vmap(self.context_embed)(context.astype(dtype))  # (Tc, D)
        if self.blocks is not None:
            tokens, ctx = self._apply_blocks(tokens, ctx, vec, context_mask)
        tokens = self.last(tokens, ctx, vec, context_mask)
        return unpatchify(self.final(tokens, vec), patch, size, size)

    def _apply_blocks(self, tokens: Array, ctx: Array, vec: Array, context_mask: Array | None) -> tuple[Array, Array]:
        """The stacked full blocks, in a loop or a scan, each rematerialized per ``config.remat``."""
        arrays, static = eqx.partition(self.blocks, eqx.is_array)

        def body(carry: tuple[Array, Array], layer: Any) -> tuple[tuple[Array, Array], None]:
            return eqx.combine(layer, static)(*carry, vec, context_mask), None

        policy = REMAT_POLICIES[self.config.remat]
        run = body if policy is None else jax.checkpoint(body, policy=policy)
        carry = (tokens, ctx)
        if self.config.scan_layers:
            carry, _ = jax.lax.scan(run, carry, arrays)
        else:
            for index in range(self.config.num_layers - 1):
                carry, _ = run(carry, jax.tree.map(lambda a, i=index: a[i], arrays))
        return carry
