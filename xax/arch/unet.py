"""A UNet denoiser (Ho et al. 2020; Dhariwal & Nichol 2021, "ADM"): residual blocks with GroupNorm and a
scale-shift timestep/class conditioning, self-attention at low resolutions, and skip connections from the
downsampling path to the upsampling path.

The network maps one image ``(C, H, W)``, a time ``t`` in [0, 1] and an optional class label to an output
of the image's shape; ``jax.vmap`` it over a batch.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from xax.arch.config import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    ModelConfigError,
    ShardingRules,
    check_choice,
    check_positive,
)
from xax.arch.diffusion.embeddings import TimestepEmbedder
from xax.arch.diffusion.layers import zero_init
from xax.core.config import field, register_config
from xax.nn.attention import dot_product_attention


@register_config
@dataclass(frozen=True)
class UNetConfig:
    """The shape of a UNet denoiser; defaults are sized for MNIST (about 7M parameters)."""

    in_channels: int = field(1, help="Image channels: 1 for MNIST")
    out_channels: int | None = field(None, help="Output channels; None repeats in_channels (eps/x0/v prediction)")
    base_channels: int = field(64, help="Width at full resolution; 64 trains MNIST in minutes on one GPU")
    channel_mults: tuple[int, ...] = field(
        (1, 2, 2), help="Width multiple per resolution; three levels take 28x28 (or 32x32) down to 7x7 (8x8)"
    )
    num_res_blocks: int = field(2, help="Residual blocks per level on the way down, as in Ho et al. (2020)")
    attention_levels: tuple[int, ...] = field(
        (2,), help="Levels (0 = full resolution) with self-attention; attention costs (HW)^2, so only the lowest"
    )
    num_heads: int = field(4, help="Attention heads; 4 heads of 32 channels at width 128")
    norm_groups: int = field(32, help="GroupNorm groups (Wu & He 2018's default); must divide every width")
    num_classes: int | None = field(10, help="Class labels (10 MNIST digits), plus a null label for CFG; None: none")
    time_dim: int | None = field(None, help="Width of the timestep/class embedding; None is 4x base_channels (ADM)")
    attention_impl: str | None = field(
        None, help="'xla', 'cudnn' or None, which lets JAX pick: cuDNN on a GPU where it can, else XLA"
    )
    remat: str = field(
        "none",
        help="Recompute each residual and attention block in the backward pass: none (fastest), full, or "
        "dots_saveable (keep matmuls)",
    )

    def __post_init__(self) -> None:
        check_choice(self, "remat", REMAT_POLICIES)
        check_choice(self, "attention_impl", ATTENTION_IMPLS)
        check_positive(self, "in_channels", "base_channels", "num_res_blocks", "num_heads", "norm_groups")
        widths = [self.base_channels * mult for mult in self.channel_mults]
        for width in widths:
            if width % self.norm_groups:
                raise ModelConfigError(
                    f"UNetConfig.norm_groups={self.norm_groups} does not divide the width {width} "
                    f"(base_channels={self.base_channels} x channel_mults={self.channel_mults}); pick a divisor"
                )
        for level in self.attention_levels:
            if not 0 <= level < len(self.channel_mults):
                raise ModelConfigError(
                    f"UNetConfig.attention_levels has {level}; levels are 0..{len(self.channel_mults) - 1}"
                )
            if widths[level] % self.num_heads:
                raise ModelConfigError(
                    f"UNetConfig.num_heads={self.num_heads} does not divide the width {widths[level]}; pick a divisor"
                )


# Logical axes of the parameters (xax.parallel.rules): the attention blocks' fused qkv split by
# columns and their output projection by rows; norms whole; the convolutions take the plan's default.
SHARDING_RULES: ShardingRules = (
    (r"(^|\.)qkv\.weight$", ("heads", "embed")),
    (r"(^|\.)qkv\.bias$", ("heads",)),
    (r"(^|\.)proj\.weight$", ("embed", "heads")),
    (r"norm\.(weight|bias)$", (None,)),
)


def _conv3(cin: int, cout: int, key: PRNGKeyArray) -> eqx.nn.Conv2d:
    return eqx.nn.Conv2d(cin, cout, 3, padding=1, key=key)


@final
class ResBlock(eqx.Module):
    """``x + conv(SiLU(GN(h) (1 + scale) + shift))`` with ``h = conv(SiLU(GN(x)))`` and ``(scale, shift)`` a linear
    map of the embedding (Dhariwal & Nichol 2021's scale-shift norm); a 1x1 convolution matches the widths."""

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    emb_proj: eqx.nn.Linear | None
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None

    def __init__(self, cin: int, cout: int, emb_dim: int | None, groups: int, *, key: PRNGKeyArray) -> None:
        keys = jax.random.split(key, 4)
        self.norm1 = eqx.nn.GroupNorm(groups, cin)
        self.conv1 = _conv3(cin, cout, keys[0])
        self.emb_proj = None if emb_dim is None else eqx.nn.Linear(emb_dim, 2 * cout, key=keys[1])
        self.norm2 = eqx.nn.GroupNorm(groups, cout)
        self.conv2 = zero_init(_conv3(cout, cout, keys[2]))
        self.skip = None if cin == cout else eqx.nn.Conv2d(cin, cout, 1, key=keys[3])

    def __call__(self, x: Float[Array, "ci h w"], emb: Float[Array, " e"] | None) -> Float[Array, "co h w"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (co, h, w)
        h = self.norm2(h)
        if self.emb_proj is not None and emb is not None:
            scale, shift = jnp.split(self.emb_proj(jax.nn.silu(emb)), 2)  # (co,) each
            h = h * (1 + scale[:, None, None]) + shift[:, None, None]
        h = self.conv2(jax.nn.silu(h))
        return (x if self.skip is None else self.skip(x)) + h


@final
class AttentionBlock(eqx.Module):
    """Multi-head self-attention over the ``H * W`` positions, as a residual branch after GroupNorm."""

    norm: eqx.nn.GroupNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    impl: str | None = eqx.field(static=True)

    def __init__(self, channels: int, num_heads: int, groups: int, impl: str | None, *, key: PRNGKeyArray) -> None:
        key1, key2 = jax.random.split(key)
        self.norm = eqx.nn.GroupNorm(groups, channels)
        self.qkv = eqx.nn.Linear(channels, 3 * channels, key=key1)
        self.proj = zero_init(eqx.nn.Linear(channels, channels, key=key2))
        self.num_heads, self.impl = num_heads, impl

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        c, height, width = x.shape
        tokens = self.norm(x).reshape(c, height * width).T  # (HW, C)
        q, k, v = jnp.split(jax.vmap(self.qkv)(tokens), 3, axis=-1)  # (HW, C) each
        heads = lambda a: a.reshape(1, height * width, self.num_heads, c // self.num_heads)  # noqa: E731  (1, HW, N, C/N)
        attended = dot_product_attention(heads(q), heads(k), heads(v), causal=False, implementation=self.impl)
        out = jax.vmap(self.proj)(attended.reshape(height * width, c))  # (HW, C)
        return x + out.T.reshape(c, height, width)


@final
class Downsample(eqx.Module):
    conv: eqx.nn.Conv2d

    def __init__(self, channels: int, *, key: PRNGKeyArray) -> None:
        self.conv = eqx.nn.Conv2d(channels, channels, 3, stride=2, padding=1, key=key)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h2 w2"]:
        return self.conv(x)


@final
class Upsample(eqx.Module):
    """Nearest-neighbour doubling followed by a 3x3 convolution (avoids checkerboard artifacts, Odena et al. 2016)."""

    conv: eqx.nn.Conv2d

    def __init__(self, channels: int, *, key: PRNGKeyArray) -> None:
        self.conv = _conv3(channels, channels, key)

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h2 w2"]:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


@final
class Level(eqx.Module):
    """The residual blocks of one resolution, each followed by attention where the level has it."""

    blocks: tuple[ResBlock, ...]
    attentions: tuple[AttentionBlock, ...] | None
    resample: Downsample | Upsample | None


def _attentions(
    config: UNetConfig, level: int, width: int, count: int, key: PRNGKeyArray
) -> tuple[AttentionBlock, ...] | None:
    if level not in config.attention_levels:
        return None
    impl = config.attention_impl
    keys = jax.random.split(key, count)
    return tuple(AttentionBlock(width, config.num_heads, config.norm_groups, impl, key=k) for k in keys)


@final
class UNet(eqx.Module):
    """The UNet denoiser; see :class:`UNetConfig`. Class label ``num_classes`` is the null label of CFG."""

    time_embed: TimestepEmbedder
    class_embed: eqx.nn.Embedding | None
    conv_in: eqx.nn.Conv2d
    down: tuple[Level, ...]
    mid: tuple[ResBlock, AttentionBlock, ResBlock]
    up: tuple[Level, ...]
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    num_classes: int | None = eqx.field(static=True)
    remat: str = eqx.field(static=True)

    def __init__(self, config: UNetConfig, *, key: PRNGKeyArray) -> None:
        keys = iter(jax.random.split(key, 64))
        base, groups = config.base_channels, config.norm_groups
        emb = config.time_dim or 4 * base
        self.time_embed = TimestepEmbedder(base, emb, key=next(keys))
        self.num_classes = config.num_classes
        self.remat = config.remat
        self.class_embed = None
        if config.num_classes is not None:
            self.class_embed = eqx.nn.Embedding(config.num_classes + 1, emb, key=next(keys))
        self.conv_in = _conv3(config.in_channels, base, next(keys))

        widths = [base * mult for mult in config.channel_mults]
        skips, width, down = [base], base, []
        for level, out in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(width, out, emb, groups, key=next(keys)))
                width = out
                skips.append(width)
            last = level == len(widths) - 1
            resample = None if last else Downsample(width, key=next(keys))
            if not last:
                skips.append(width)
            down.append(Level(tuple(blocks), _attentions(config, level, width, len(blocks), next(keys)), resample))
        self.down = tuple(down)

        impl = config.attention_impl
        self.mid = (
            ResBlock(width, width, emb, groups, key=next(keys)),
            AttentionBlock(width, config.num_heads, groups, impl, key=next(keys)),
            ResBlock(width, width, emb, groups, key=next(keys)),
        )

        up = []
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(width + skips.pop(), widths[level], emb, groups, key=next(keys)))
                width = widths[level]
            resample = Upsample(width, key=next(keys)) if level > 0 else None
            up.append(Level(tuple(blocks), _attentions(config, level, width, len(blocks), next(keys)), resample))
        self.up = tuple(up)
        self.norm_out = eqx.nn.GroupNorm(groups, width)
        self.conv_out = zero_init(_conv3(width, config.out_channels or config.in_channels, next(keys)))

    @property
    def null_label(self) -> int:
        """The label that stands for "no class" in classifier-free guidance."""
        if self.num_classes is None:
            raise ValueError("this UNet has num_classes=None, so it has no null label; set UNetConfig.num_classes")
        return self.num_classes

    def embed(self, t: Float[Array, ""], y: Int[Array, ""] | None) -> Float[Array, " e"]:
        emb = self.time_embed(t)
        if self.class_embed is not None:
            label = jnp.asarray(self.null_label) if y is None else y
            emb = emb + self.class_embed(label)
        elif y is not None:
            raise ValueError("a class label was given to a UNet with num_classes=None; set UNetConfig.num_classes")
        return emb

    def __call__(
        self, x: Float[Array, "c h w"], t: Float[Array, ""], y: Int[Array, ""] | None = None
    ) -> Float[Array, "c h w"]:
        """Predicts the network target for one image ``x`` at time ``t`` in [0, 1], with class ``y``
        (``None`` or the null label: unconditional)."""
        factor = 2 ** (len(self.down) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet input of size {x.shape[1:]} must be divisible by {factor}; pad the images")
        emb = self.embed(t, y).astype(x.dtype)
        call = _block_caller(self.remat)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.blocks):
                h = call(block, h, emb)
                h = h if level.attentions is None else call(level.attentions[i], h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = call(self.mid[2], call(self.mid[1], call(self.mid[0], h, emb)), emb)
        for level in self.up:
            for i, block in enumerate(level.blocks):
                h = call(block, jnp.concatenate([h, skips.pop()], axis=0), emb)
                h = h if level.attentions is None else call(level.attentions[i], h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


def _block_caller(remat: str) -> Callable[..., Array]:
    """``call(block, *inputs)``: the block applied directly, or under ``REMAT_POLICIES[remat]`` so
    that the backward pass recomputes its activations instead of keeping them."""

    def call(block: Any, *inputs: Array) -> Array:
        return block(*inputs)

    policy = REMAT_POLICIES[remat]
    return call if policy is None else eqx.filter_checkpoint(call, policy=policy)


def count_params(model: eqx.Module) -> int:
    """The number of floating-point parameters (also of a model built with ``eqx.filter_eval_shape``)."""
    leaves = jax.tree.leaves(model)
    return sum(
        math.prod(leaf.shape)
        for leaf in leaves
        if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )
