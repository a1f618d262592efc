"""The diffusion transformer DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), and the
layers it shares with the mmDiT of ``xax.arch.mmdit``.

DiT patchifies a ``(C, H, W)`` input into ``(H / p) (W / p)`` tokens with a fixed 2-D sine-cosine positional
embedding, runs transformer blocks conditioned by adaLN-Zero on ``c = embed(t) + embed(y)``, and unpatchifies
a final linear projection. The adaLN-Zero modulation (shift, scale, gate per branch) is a zero-initialized
linear map of ``SiLU(c)``, so every block, and the final layer's output, start as the identity and zero.
The blocks are stored stacked along a leading ``num_layers`` axis and applied in a loop (or ``lax.scan``).
"""

from dataclasses import dataclass, fields
from typing import Any, ClassVar, final

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
from xax.arch.diffusion.embeddings import TimestepEmbedder, sincos_2d
from xax.arch.diffusion.layers import zero_init
from xax.core.config import field, register_config
from xax.nn import norms
from xax.nn.attention import dot_product_attention
from xax.nn.mlp import MLP


@register_config
@dataclass(frozen=True)
class DiTConfig:
    """Defaults are DiT-B/2 on 32x32x4 latents (256x256 images through an 8x-downsampling VAE)."""

    input_size: int = field(32, help="Side of the square input: 32 for the latents of 256x256 images")
    patch_size: int = field(2, help="Side of a patch; 2 gives 256 tokens at 32x32, the paper's best trade-off")
    in_channels: int = field(4, help="Input channels: 4 for Stable Diffusion VAE latents")
    out_channels: int | None = field(None, help="Output channels; None repeats in_channels (eps/x0/v prediction)")
    d_model: int = field(768, help="Token width; 768 is DiT-B")
    num_layers: int = field(12, help="Transformer blocks; 12 is DiT-B")
    num_heads: int = field(12, help="Attention heads; 12 gives DiT-B's 64-wide heads")
    mlp_ratio: float = field(4.0, help="MLP hidden width over d_model; 4 as in ViT")
    num_classes: int | None = field(1000, help="Class labels (ImageNet), plus a null label for CFG; None: none")
    frequency_dim: int = field(256, help="Sinusoidal timestep features fed to the timestep MLP (DiT's value)")
    attention_impl: str | None = field(
        None, help="'xla', 'cudnn' or None, which lets JAX pick: cuDNN on a GPU where it can, else XLA"
    )
    remat: str = field(
        "none", help="Recompute each block in the backward pass: none (fastest), full, or dots_saveable (keep matmuls)"
    )
    scan_layers: bool = field(
        False,
        help="Apply the stacked blocks with lax.scan (compile time flat in depth) instead of a Python loop; off "
        "because scanning stacks every block's activations with extra copies (GPT-2 small's step: 70 vs 55 ms)",
    )

    def __post_init__(self) -> None:
        check_choice(self, "remat", REMAT_POLICIES)
        check_choice(self, "attention_impl", ATTENTION_IMPLS)
        check_positive(self, "input_size", "patch_size", "in_channels", "d_model", "num_layers", "num_heads")
        if self.input_size % self.patch_size:
            raise ModelConfigError(
                f"DiTConfig.patch_size={self.patch_size} must divide input_size={self.input_size}; pick a divisor"
            )
        if self.d_model % self.num_heads or self.d_model % 4:
            raise ModelConfigError(
                f"DiTConfig.d_model={self.d_model} must be divisible by num_heads={self.num_heads} and by 4 "
                "(the 2-D sine-cosine embedding); change d_model or num_heads"
            )


# (num_layers, d_model, num_heads) of the DiT model sizes (Peebles & Xie 2023, Table 1).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def dit_config(name: str, **overrides: Any) -> DiTConfig:
    """A named DiT preset such as "DiT-B/2" (size S, B, L or XL; patch 2, 4 or 8), with fields overridden.

    Example: ``dit_config("DiT-S/2", input_size=28, in_channels=1, num_classes=10)``.
    """
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if not name.startswith("DiT-") or size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise ModelConfigError(
            f"DiT preset {name!r} is unknown; use DiT-<{'|'.join(DIT_SIZES)}>/<2|4|8>, e.g. 'DiT-B/2'"
        )
    unknown = sorted(set(overrides) - {f.name for f in fields(DiTConfig)})
    if unknown:
        raise ModelConfigError(f"DiTConfig has no field {unknown[0]!r}; see DiTConfig for the fields")
    num_layers, d_model, num_heads = DIT_SIZES[size]
    values: dict[str, Any] = {"patch_size": int(patch), "d_model": d_model, "num_layers": num_layers}
    values["num_heads"] = num_heads
    values.update(overrides)
    return DiTConfig(**values)


# Logical axes of the parameters (xax.parallel.rules): the fused qkv and the MLP's first layer split
# by columns, the attention output and the MLP's second layer by rows.
SHARDING_RULES: ShardingRules = (
    (r"(^|\.)qkv\.weight$", ("heads", "embed")),
    (r"(^|\.)qkv\.bias$", ("heads",)),
    (r"(^|\.)proj\.weight$", ("embed", "heads")),
    (r"(^|\.)mlp\.up_proj\.weight$", ("mlp", "embed")),
    (r"(^|\.)mlp\.up_proj\.bias$", ("mlp",)),
    (r"(^|\.)mlp\.down_proj\.weight$", ("embed", "mlp")),
    (r"(^|\.)mlp\.down_proj\.bias$", (None,)),
)

# The MLP parameters' names before the MLPs were unified (xax.nn.mlp.MLP): old dotted name (a
# regular expression of the whole saved name) -> new name. The layouts agree (both Equinox
# ``Linear``s, weight (out, in)), so nothing is transposed. Declared by the blocks that hold an MLP,
# so that checkpoints written before the rename still restore (xax.checkpoint.renames).
LEGACY_PARAM_NAMES: tuple[tuple[str, str], ...] = (
    (r"(.*\.)?mlp\.fc1\.(weight|bias)", r"\1mlp.up_proj.\2"),
    (r"(.*\.)?mlp\.fc2\.(weight|bias)", r"\1mlp.down_proj.\2"),
)


def layer_norm(x: Float[Array, "t d"], eps: float = 1e-6) -> Float[Array, "t d"]:
    """LayerNorm without affine parameters (adaLN supplies them), computed in float32; its backward
    keeps only ``x`` and the per-row statistics (``xax.nn.norms.layer_norm``)."""
    return norms.layer_norm(x, None, None, eps)


def modulate(x: Float[Array, "t d"], shift: Float[Array, " d"], scale: Float[Array, " d"]) -> Float[Array, "t d"]:
    """``x (1 + scale) + shift``, the adaptive LayerNorm's affine map."""
    return x * (1 + scale[None, :]) + shift[None, :]


def split_qkv(qkv: eqx.nn.Linear, x: Float[Array, "t d"]) -> tuple[Array, Array, Array]:
    """q, k and v from the fused ``(3 d, d)`` projection, as three matmuls on its row blocks.

    The same sums as splitting one fused output, but each of q, k and v is written contiguous by its
    own matmul: no activation-sized slice in the forward pass and no concatenation of the three input
    gradients in the backward (the three weight blocks' gradients are joined instead: weight-sized).
    """
    weights = jnp.split(qkv.weight, 3, axis=0)
    biases = (None, None, None) if qkv.bias is None else jnp.split(qkv.bias, 3)
    project = lambda w: jnp.einsum("td,ed->te", x, w)  # noqa: E731  (no transposed copy of w)
    q, k, v = (project(w) if b is None else project(w) + b[None, :] for w, b in zip(weights, biases, strict=True))
    return q, k, v


def block_mlp(dim: int, mlp_ratio: float, key: PRNGKeyArray) -> MLP:
    """The block's feed-forward layer: tanh-approximated GELU and Equinox's initialization, as in DiT."""
    return MLP(dim, int(dim * mlp_ratio), activation="gelu_tanh", init_std=None, key=key)


@final
class DiTBlock(eqx.Module):
    """``x += g1 * attn(modulate(LN(x), s1, c1)); x += g2 * mlp(modulate(LN(x), s2, c2))``, where
    ``(s1, c1, g1, s2, c2, g2) = W SiLU(c) + b`` starts at zero (adaLN-Zero, Peebles & Xie 2023, section 3.2)."""

    modulation: eqx.nn.Linear
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    mlp: MLP
    num_heads: int = eqx.field(static=True)
    impl: str | None = eqx.field(static=True)
    LEGACY_PARAM_NAMES: ClassVar[tuple[tuple[str, str], ...]] = LEGACY_PARAM_NAMES

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, impl: str | None, *, key: PRNGKeyArray) -> None:
        keys = jax.random.split(key, 4)
        self.modulation = zero_init(eqx.nn.Linear(dim, 6 * dim, key=keys[0]))
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=keys[1])
        self.proj = eqx.nn.Linear(dim, dim, key=keys[2])
        self.mlp = block_mlp(dim, mlp_ratio, keys[3])
        self.num_heads, self.impl = num_heads, impl

    def __call__(self, x: Float[Array, "t d"], c: Float[Array, " d"]) -> Float[Array, "t d"]:
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.modulation(jax.nn.silu(c)), 6)
        q, k, v = split_qkv(self.qkv, modulate(layer_norm(x), shift1, scale1))
        heads = lambda a: a.reshape(1, a.shape[0], self.num_heads, -1)  # noqa: E731  (1, T, N, D/N)
        attended = dot_product_attention(heads(q), heads(k), heads(v), causal=False, implementation=self.impl)
        x = x + gate1[None, :] * jax.vmap(self.proj)(attended.reshape(q.shape))  # (T, D)
        return x + gate2[None, :] * self.mlp(modulate(layer_norm(x), shift2, scale2))


@final
class FinalLayer(eqx.Module):
    """``linear(modulate(LN(x), shift, scale))`` with zero-initialized modulation and projection."""

    modulation: eqx.nn.Linear
    linear: eqx.nn.Linear

    def __init__(self, dim: int, out: int, *, key: PRNGKeyArray) -> None:
        key1, key2 = jax.random.split(key)
        self.modulation = zero_init(eqx.nn.Linear(dim, 2 * dim, key=key1))
        self.linear = zero_init(eqx.nn.Linear(dim, out, key=key2))

    def __call__(self, x: Float[Array, "t d"], c: Float[Array, " d"]) -> Float[Array, "t o"]:
        shift, scale = jnp.split(self.modulation(jax.nn.silu(c)), 2)
        return jax.vmap(self.linear)(modulate(layer_norm(x), shift, scale))


def patchify(x: Float[Array, "c h w"], patch: int) -> Float[Array, "t pc"]:
    """``(C, H, W) -> (H/p * W/p, p * p * C)``, token ``r * W/p + s`` holding patch ``(r, s)`` in (p, p, C) order."""
    c, height, width = x.shape
    x = x.reshape(c, height // patch, patch, width // patch, patch)
    return jnp.einsum("chpwq->hwpqc", x).reshape((height // patch) * (width // patch), patch * patch * c)


def unpatchify(tokens: Float[Array, "t pc"], patch: int, height: int, width: int) -> Float[Array, "c h w"]:
    """The inverse of :func:`patchify` (Peebles & Xie 2023's ``unpatchify``)."""
    h, w = height // patch, width // patch
    c = tokens.shape[1] // (patch * patch)
    x = tokens.reshape(h, w, patch, patch, c)
    return jnp.einsum("hwpqc->chpwq", x).reshape(c, height, width)


@final
class DiT(eqx.Module):
    """The DiT denoiser; see :class:`DiTConfig`. Class label ``num_classes`` is the null label of CFG."""

    patch_embed: eqx.nn.Conv2d
    time_embed: TimestepEmbedder
    class_embed: eqx.nn.Embedding | None
    blocks: DiTBlock  # stacked: every leaf has a leading (num_layers,) axis
    final: FinalLayer
    config: DiTConfig = eqx.field(static=True)

    def __init__(self, config: DiTConfig, *, key: PRNGKeyArray) -> None:
        keys = jax.random.split(key, 5)
        dim, patch = config.d_model, config.patch_size
        self.config = config
        self.patch_embed = eqx.nn.Conv2d(config.in_channels, dim, patch, stride=patch, key=keys[0])
        self.time_embed = TimestepEmbedder(config.frequency_dim, dim, key=keys[1])
        self.class_embed = None
        if config.num_classes is not None:
            self.class_embed = eqx.nn.Embedding(config.num_classes + 1, dim, key=keys[2])
        make = lambda k: DiTBlock(dim, config.num_heads, config.mlp_ratio, config.attention_impl, key=k)  # noqa: E731
        self.blocks = eqx.filter_vmap(make)(jax.random.split(keys[3], config.num_layers))
        out = config.out_channels or config.in_channels
        self.final = FinalLayer(dim, patch * patch * out, key=keys[4])

    @property
    def null_label(self) -> int:
        """The label that stands for "no class" in classifier-free guidance."""
        if self.config.num_classes is None:
            raise ValueError("this DiT has num_classes=None, so it has no null label; set DiTConfig.num_classes")
        return self.config.num_classes

    def block(self, index: int) -> DiTBlock:
        """The ``index``-th transformer block, unstacked."""
        arrays, static = eqx.partition(self.blocks, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[index], arrays), static)

    def condition(self, t: Float[Array, ""], y: Int[Array, ""] | None) -> Float[Array, " d"]:
        """``c = embed(t) + embed(y)``; no label (or the null label) is unconditional."""
        c = self.time_embed(t)
        if self.class_embed is not None:
            c = c + self.class_embed(jnp.asarray(self.null_label) if y is None else y)
        elif y is not None:
            raise ValueError("a class label was given to a DiT with num_classes=None; set DiTConfig.num_classes")
        return c

    def __call__(
        self, x: Float[Array, "c h w"], t: Float[Array, ""], y: Int[Array, ""] | None = None
    ) -> Float[Array, "c h w"]:
        """Predicts the network target for one input ``x`` at time ``t`` in [0, 1], with class ``y``."""
        size, patch = self.config.input_size, self.config.patch_size
        if x.shape[1:] != (size, size):
            raise ValueError(f"DiT input is {x.shape[1:]} but DiTConfig.input_size={size}; resize or change the config")
        tokens = self.patch_embed(x)  # (D, H/p, W/p)
        dim, grid_h, grid_w = tokens.shape
        tokens = tokens.reshape(dim, grid_h * grid_w).T  # (T, D)
        tokens = tokens + jnp.asarray(sincos_2d(dim, grid_h, grid_w), x.dtype)
        c = self.condition(t, y).astype(x.dtype)
        arrays, static = eqx.partition(self.blocks, eqx.is_array)

        def body(h: Array, layer: Any) -> tuple[Array, None]:
            return eqx.combine(layer, static)(h, c), None

        policy = REMAT_POLICIES[self.config.remat]
        run = body if policy is None else jax.checkpoint(body, policy=policy)
        if self.config.scan_layers:
            tokens, _ = jax.lax.scan(run, tokens, arrays)
        else:
            # The same stacked weights, one static slice per block.
            for index in range(self.config.num_layers):
                tokens, _ = run(tokens, jax.tree.map(lambda a, i=index: a[i], arrays))
        return unpatchify(self.final(tokens, c), patch, size, size)


def num_tokens(config: DiTConfig) -> int:
    """Tokens per input: ``(input_size / patch_size)^2``."""
    return (config.input_size // config.patch_size) ** 2
