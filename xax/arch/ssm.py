"""A language model built from state-space layers (S4D/S5-style diagonal or Mamba-style selective).

    tokens -> embedding -> N × [x + SSM(RMSNorm(x)), optionally x + MLP(RMSNorm(x))] -> RMSNorm
           -> unembedding (tied to the embedding or separate) -> logits

It runs in two equivalent modes: ``model(tokens)`` processes whole sequences in parallel (training);
``init_cache(batch)`` then ``decode_step(token, cache)`` advances one token at a time with a
fixed-size state per layer (generation), and ``prefill(tokens, cache)`` consumes a prompt in
parallel and returns the state after it. Token ids are not checked unless a call passes
``check_ids=True`` (see ``prefill``). With ``layer="selective"``, ``mlp_ratio=0`` and tied
embeddings the model is the Mamba language model (Gu & Dao 2023) layer for layer.

Parameters are float32; ``compute_dtype="bfloat16"`` runs matrix products and activations in
bfloat16 while normalization statistics and the recurrences stay in float32. Logits are float32.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from xax.arch.config import ModelConfigError, ShardingRules, check_choice, check_positive
from xax.core.config import field, register_config
from xax.nn.embeddings import Embedding, check_id_range
from xax.nn.mlp import MLP
from xax.nn.norms import RMSNorm
from xax.nn.precision import COMPUTE_DTYPES
from xax.nn.ssm import DIAGONAL_INITS, DT_MAX, DT_MIN, DiagonalSSM, SelectiveSSM, SSMLayer
from xax.utils.pytree import cast_floating

# The compute dtypes this model supports (float16 is not among them).
_COMPUTE_DTYPES = {name: COMPUTE_DTYPES[name] for name in ("float32", "bfloat16")}


@register_config
@dataclass(frozen=True)
class SSMConfig:
    """The shape of an ``SSMLanguageModel``."""

    vocab_size: int = field(256, help="Number of token ids; 256 covers any byte-level text")
    d_model: int = field(256, help="Residual width; small enough to train on one GPU in minutes")
    num_layers: int = field(4, help="Number of residual blocks; enough depth for character-level text")
    layer: str = field(
        "selective",
        help="SSM layer kind: 'selective' (Mamba, input-dependent; the stronger language model) or 'diagonal' (S4D/S5)",
    )
    d_state: int = field(16, help="State size per channel (selective) or in total (diagonal); Mamba's default")
    d_conv: int = field(4, help="Selective layer: causal convolution width; Mamba's default")
    expand: int = field(2, help="Selective layer: inner width / d_model; Mamba's default")
    diagonal_init: str = field("lin", help="Diagonal layer: 'lin' (S4D-Lin), 'inv' (S4D-Inv) or 'real' (S4D-Real)")
    dt_min: float = field(DT_MIN, help="Smallest initial step size; S4D, S5 and Mamba use 1e-3")
    dt_max: float = field(DT_MAX, help="Largest initial step size; S4D, S5 and Mamba use 1e-1")
    mlp_ratio: int = field(
        0, help="MLP hidden width / d_model after each SSM layer; 0 for none (Mamba has none: its layer expands)"
    )
    tie_embeddings: bool = field(True, help="Share the embedding and unembedding matrices, as Mamba and GPT-2 do")
    norm_eps: float = field(1e-5, help="RMSNorm epsilon; Mamba's value")
    compute_dtype: str = field("float32", help="Activation dtype: 'float32' or 'bfloat16' (parameters stay float32)")

    def __post_init__(self) -> None:
        check_choice(self, "layer", SSM_LAYERS)
        check_choice(self, "diagonal_init", DIAGONAL_INITS)
        check_choice(self, "compute_dtype", _COMPUTE_DTYPES)
        check_positive(self, "vocab_size", "d_model", "num_layers", "d_state", "d_conv", "expand")
        if self.mlp_ratio < 0:
            raise ModelConfigError(f"SSMConfig.mlp_ratio={self.mlp_ratio} must be >= 0 (0 disables the MLP)")
        if not 0 < self.dt_min <= self.dt_max:
            raise ModelConfigError(f"SSMConfig dt_min={self.dt_min}, dt_max={self.dt_max}: need 0 < dt_min <= dt_max")
        if self.layer == "diagonal" and self.diagonal_init != "real" and self.d_state % 2:
            raise ModelConfigError(
                f"SSMConfig.d_state={self.d_state} must be even for diagonal_init={self.diagonal_init!r} "
                "(complex modes come in conjugate pairs); use an even d_state or diagonal_init='real'"
            )


def _diagonal(config: SSMConfig, key: PRNGKeyArray) -> SSMLayer:
    return DiagonalSSM(
        config.d_model,
        config.d_state,
        init=config.diagonal_init,
        dt_min=config.dt_min,
        dt_max=config.dt_max,
        key=key,
    )


def _selective(config: SSMConfig, key: PRNGKeyArray) -> SSMLayer:
    return SelectiveSSM(
        config.d_model,
        d_state=config.d_state,
        d_conv=config.d_conv,
        expand=config.expand,
        dt_min=config.dt_min,
        dt_max=config.dt_max,
        key=key,
    )


# SSMConfig.layer -> the layer constructor.
SSM_LAYERS: dict[str, Callable[[SSMConfig, PRNGKeyArray], SSMLayer]] = {
    "diagonal": _diagonal,
    "selective": _selective,
}

# One layer state per block; each leaf has a leading batch axis.
SSMCache = tuple[PyTree[Array], ...]

# Logical axes of the parameters (xax.parallel.rules): the embedding vocabulary-parallel, the MLP
# split by columns then rows, the norms whole. The SSM layers' own weights take the plan's default.
SHARDING_RULES: ShardingRules = (
    (r"(^|\.)embed\.weight$", ("vocab", "embed")),
    (r"(^|\.)unembed$", ("vocab", "embed")),
    (r"(^|\.)mlp\.up_proj\.weight$", ("mlp", "embed")),
    (r"(^|\.)mlp\.up_proj\.bias$", ("mlp",)),
    (r"(^|\.)mlp\.down_proj\.weight$", ("embed", "mlp")),
    (r"(^|\.)mlp\.down_proj\.bias$", (None,)),
    (r"norm\.(weight|bias)$", (None,)),
)

# The MLP parameters' names before the MLPs were unified (xax.nn.mlp.MLP): old dotted name (a
# regular expression of the whole saved name) -> new name. The old ``w1`` (hidden, d_model) and
# ``w2`` (d_model, hidden) already had the Equinox ``Linear`` layout (out, in), so nothing is
# transposed. Declared by the block, so that checkpoints written before the rename still restore
# (xax.checkpoint.renames).
LEGACY_PARAM_NAMES: tuple[tuple[str, str], ...] = (
    (r"(.*\.)?mlp\.w1", r"\1mlp.up_proj.weight"),
    (r"(.*\.)?mlp\.b1", r"\1mlp.up_proj.bias"),
    (r"(.*\.)?mlp\.w2", r"\1mlp.down_proj.weight"),
    (r"(.*\.)?mlp\.b2", r"\1mlp.down_proj.bias"),
)


def _mlp(config: SSMConfig, key: PRNGKeyArray) -> MLP:
    """The feed-forward layer after an SSM layer: tanh-approximated GELU, Equinox's initialization."""
    return MLP(config.d_model, config.mlp_ratio * config.d_model, activation="gelu_tanh", init_std=None, key=key)


@final
class _Block(eqx.Module):
    """``x + SSM(norm(x))``, then ``x + MLP(norm(x))`` when there is an MLP."""

    norm: RMSNorm
    ssm: SSMLayer
    mlp_norm: RMSNorm | None
    mlp: MLP | None
    LEGACY_PARAM_NAMES: ClassVar[tuple[tuple[str, str], ...]] = LEGACY_PARAM_NAMES

    def __init__(self, config: SSMConfig, *, key: PRNGKeyArray) -> None:
        k_ssm, k_mlp = jax.random.split(key)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.ssm = SSM_LAYERS[config.layer](config, k_ssm)
        has_mlp = config.mlp_ratio > 0
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps) if has_mlp else None
        self.mlp = _mlp(config, k_mlp) if has_mlp else None

    def parallel(self, x: Float[Array, "seq d_model"], state: PyTree[Array]) -> tuple[Array, PyTree[Array]]:
        # The norms act on one vector; vmapped over positions.
        y, state = self.ssm.parallel(jax.vmap(self.norm)(x), state)
        x = x + y
        if self.mlp is not None and self.mlp_norm is not None:
            # The float32 weights run in the activations' dtype.
            x = x + cast_floating(self.mlp, x.dtype)(jax.vmap(self.mlp_norm)(x))
        return x, state

    def step(self, x: Float[Array, " d_model"], state: PyTree[Array]) -> tuple[Array, PyTree[Array]]:
        y, state = self.ssm.step(self.norm(x), state)
        x = x + y
        if self.mlp is not None and self.mlp_norm is not None:
            x = x + cast_floating(self.mlp, x.dtype)(self.mlp_norm(x))
        return x, state


@final
class SSMLanguageModel(eqx.Module):
    """A causal language model of stacked SSM layers, with parallel and recurrent modes.

    Attributes:
        embed: The token embedding, shape (vocab, d_model).
        blocks: The residual blocks.
        norm: The final normalization.
        unembed: The output projection, shape (vocab, d_model); None when tied to ``embed``.
        compute_dtype: The activation dtype name.
    """

    embed: Embedding
    blocks: tuple[_Block, ...]
    norm: RMSNorm
    unembed: Float[Array, "vocab d_model"] | None
    compute_dtype: str = eqx.field(static=True)

    def __init__(self, config: SSMConfig, *, key: PRNGKeyArray) -> None:
        """Initializes the model.

        Args:
            config: The model shape.
            key: The PRNG key for initialization.
        """
        k_embed, k_unembed, k_blocks = jax.random.split(key, 3)
        self.embed = Embedding(config.vocab_size, config.d_model, key=k_embed)
        self.blocks = tuple(_Block(config, key=k) for k in jax.random.split(k_blocks, config.num_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.unembed = (
            None
            if config.tie_embeddings
            else 0.02 * jax.random.normal(k_unembed, (config.vocab_size, config.d_model), jnp.float32)
        )
        self.compute_dtype = config.compute_dtype

    def _dtype(self) -> jnp.dtype:
        return _COMPUTE_DTYPES[self.compute_dtype]

    def _logits(self, h: Float[Array, " d_model"]) -> Float[Array, " vocab"]:
        w = self.embed.weight if self.unembed is None else self.unembed
        return (self.norm(h) @ w.astype(h.dtype).T).astype(jnp.float32)

    def init_cache(self, batch: int) -> SSMCache:
        """The zero state of every layer, for ``batch`` sequences.

        Args:
            batch: The number of sequences decoded together.

        Returns:
            One state pytree per block, each leaf with a leading batch axis.
        """
        return tuple(
            jax.tree.map(lambda s: jnp.broadcast_to(s, (batch, *s.shape)), b.ssm.init_state()) for b in self.blocks
        )

    def _prefill_one(self, tokens: Int[Array, " seq"], cache: SSMCache) -> tuple[Array, SSMCache]:
        h = self.embed(tokens).astype(self._dtype())  # (T, D)
        states = []
        for block, state in zip(self.blocks, cache, strict=True):
            h, state = block.parallel(h, state)
            states.append(state)
        return jax.vmap(self._logits)(h), tuple(states)

    def _step_one(self, token: Int[Array, ""], cache: SSMCache) -> tuple[Array, SSMCache]:
        h = self.embed(token).astype(self._dtype())  # (D,)
        states = []
        for block, state in zip(self.blocks, cache, strict=True):
            h, state = block.step(h, state)
            states.append(state)
        return self._logits(h), tuple(states)

    def _check(self, tokens: Int[Array, "*shape"], check_ids: bool) -> None:
        if check_ids:
            check_id_range(tokens, self.embed.weight.shape[0], name="tokens", size_name="vocab_size")

    def prefill(
        self, tokens: Int[Array, "batch seq"], cache: SSMCache, *, check_ids: bool = False
    ) -> tuple[Float[Array, "batch seq vocab"], SSMCache]:
        """Processes whole sequences in parallel, starting from ``cache``.

        Args:
            tokens: Token ids, each in [0, vocab_size).
            cache: The state before the first token (``init_cache`` for a fresh start).
            check_ids: Check with ``jax.experimental.checkify`` that every id is in [0, vocab_size);
                a failure names the first bad id's index and value. Eager calls raise at once; under
                ``jax.jit`` wrap the function in ``checkify.checkify`` and call ``err.throw()``. Off by
                default, and then ids are not checked at all (no cost): an id at or past
                ``vocab_size`` gives NaN and -1 reads the last row.

        Returns:
            The float32 logits of every position, and the state after the last token.
        """
        self._check(tokens, check_ids)
        return jax.vmap(self._prefill_one)(tokens, cache)

    def __call__(self, tokens: Int[Array, "batch seq"], *, check_ids: bool = False) -> Float[Array, "batch seq vocab"]:
        """The float32 logits of every position, computed in parallel (training mode).

        Token ids are checked only with ``check_ids=True`` (see ``prefill``).
        """
        return self.prefill(tokens, self.init_cache(tokens.shape[0]), check_ids=check_ids)[0]

    def decode_step(
        self, token: Int[Array, " batch"], cache: SSMCache, *, check_ids: bool = False
    ) -> tuple[Float[Array, "batch vocab"], SSMCache]:
        """Advances every sequence by one token (recurrent mode).

        Args:
            token: The next token of each sequence.
            cache: The state before it.
            check_ids: Check the tokens as ``prefill`` does.

        Returns:
            The float32 logits for the token after it, and the updated state.
        """
        self._check(token, check_ids)
        return jax.vmap(self._step_one)(token, cache)
