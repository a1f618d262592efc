"""A decoder-only transformer covering GPT-2 and Llama/Qwen/Mistral styles, set by ``TransformerConfig``.

Parameter names mirror the Hugging Face Llama layout, so a checkpoint table maps them one to one
(``[i]`` is index ``i`` of the leading layer axis when ``scan_layers=True``; with the Python loop,
``layers`` is a tuple and the path is ``layers.{i}.…``). Linear weights are (out, in), like
``torch.nn.Linear``; GPT-2's ``Conv1D`` weights are (in, out) and need a transpose, and its fused
``c_attn`` splits into q, k, v along the output axis.

=================================== ================================ ==================================
xax                                 GPT-2 (``GPT2LMHeadModel``)      Llama / Qwen2 (``*ForCausalLM``)
=================================== ================================ ==================================
embed_tokens.weight                 transformer.wte.weight           model.embed_tokens.weight
embed_positions.weight              transformer.wpe.weight           (none: RoPE)
layers.input_layernorm.{weight,bias}[i]  transformer.h.{i}.ln_1.*    model.layers.{i}.input_layernorm.weight
layers.self_attn.{q,k,v}_proj.*[i]  transformer.h.{i}.attn.c_attn.*  model.layers.{i}.self_attn.{q,k,v}_proj.*
layers.self_attn.o_proj.*[i]        transformer.h.{i}.attn.c_proj.*  model.layers.{i}.self_attn.o_proj.weight
layers.post_attention_layernorm.*[i]  transformer.h.{i}.ln_2.*       model.layers.{i}.post_attention_layernorm.weight
layers.mlp.gate_proj.weight[i]      (none: plain MLP)                model.layers.{i}.mlp.gate_proj.weight
layers.mlp.up_proj.*[i]             transformer.h.{i}.mlp.c_fc.*     model.layers.{i}.mlp.up_proj.weight
layers.mlp.down_proj.*[i]           transformer.h.{i}.mlp.c_proj.*   model.layers.{i}.mlp.down_proj.weight
norm.{weight,bias}                  transformer.ln_f.*               model.norm.weight
lm_head.weight (None when tied)     lm_head.weight (tied to wte)     lm_head.weight
=================================== ================================ ==================================

Dtype policy: parameters stay in float32; with ``compute_dtype="bfloat16"`` they are cast at call
time, activations and the KV cache are bfloat16, norms and softmax compute in float32, and logits
are float32.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from xax.arch.config import (
    REMAT_POLICIES,
    ModelConfigError,
    ShardingRules,
    check_choice,
    check_positive,
)
from xax.core.config import field, register_config
from xax.core.errors import ConfigError
from xax.nn.attention import IMPLEMENTATIONS, KVCache, MultiHeadAttention
from xax.nn.embeddings import Embedding, RopeScaling, RotaryEmbedding, check_id_range
from xax.nn.lora import AnyLinear, make_linear
from xax.nn.mlp import ACTIVATIONS, MLP, SwiGLU
from xax.nn.norms import NORM_TYPES, LayerNorm, RMSNorm, make_norm
from xax.nn.precision import COMPUTE_DTYPES, mixed_dot_general
from xax.utils.pytree import cast_floating

POSITION_TYPES = ("learned", "rope", "none")
MLP_TYPES = ("mlp", "swiglu")

# The cache of a whole model: one KVCache with a leading layer axis (scanned layers) or one per layer.
TransformerCache = KVCache | tuple[KVCache, ...]

# Logical axes of the parameters (xax.parallel.rules): q/k/v, gate/up and the vocabulary split by
# columns, o/down by rows; ``(\.base)?`` also matches the frozen weight inside a LoRALinear.
_LIN = r"(\.base)?"
SHARDING_RULES: ShardingRules = (
    (r"(^|\.)embed_tokens\.weight$", ("vocab", "embed")),
    (rf"(^|\.)lm_head{_LIN}\.weight$", ("vocab", "embed")),
    (r"(^|\.)embed_positions\.weight$", (None, "embed")),
    (rf"q_proj{_LIN}\.weight$", ("heads", "embed")),
    (rf"[kv]_proj{_LIN}\.weight$", ("kv_heads", "embed")),
    (rf"q_proj{_LIN}\.bias$", ("heads",)),
    (rf"[kv]_proj{_LIN}\.bias$", ("kv_heads",)),
    (rf"o_proj{_LIN}\.weight$", ("embed", "heads")),
    (rf"(gate|up)_proj{_LIN}\.weight$", ("mlp", "embed")),
    (rf"(gate|up)_proj{_LIN}\.bias$", ("mlp",)),
    (rf"down_proj{_LIN}\.weight$", ("embed", "mlp")),
    (rf"(o|down)_proj{_LIN}\.bias$", (None,)),
    # Norm scales and shifts: small, and needed whole by every device.
    (r"norm\.(weight|bias)$", (None,)),
)


@register_config
@dataclass(frozen=True)
class TransformerConfig:
    """The shape and style of a decoder-only transformer. Defaults are GPT-2 small (124M).

    Presets: ``gpt2_small``, ``gpt2_tiny``, ``llama_tiny``, ``qwen_tiny``, ``mistral_tiny``.
    """

    vocab_size: int = field(50257, help="Token vocabulary size; 50257 is GPT-2's byte-level BPE")
    max_seq_len: int = field(
        1024, help="Context length (GPT-2's): the learned position table's size, a hard limit; RoPE runs past it"
    )
    d_model: int = field(768, help="Residual stream width; 768 is GPT-2 small")
    num_layers: int = field(12, help="Transformer blocks; 12 is GPT-2 small")
    num_heads: int = field(12, help="Query heads; 12 gives GPT-2's 64-wide heads")
    num_kv_heads: int | None = field(
        None, help="Key/value heads; None is num_heads (GPT-2); fewer is grouped-query (Llama 3), 1 multi-query"
    )
    head_dim: int | None = field(None, help="Width of a head; None is d_model // num_heads, the usual choice")
    mlp_dim: int | None = field(
        None, help="Feed-forward hidden width; None is 4 * d_model (GPT-2); SwiGLU models set about 8/3 * d_model"
    )
    positions: str = field("learned", help="'learned' (GPT-2's absolute table), 'rope' (Llama, Qwen) or 'none'")
    rope_theta: float = field(
        10000.0, help="The RoPE base; 10000 is the original (Llama 2); Llama 3 uses 500000, Qwen2 1e6"
    )
    rope_scaling: RopeScaling | None = field(None, help="Context-extension scaling of RoPE; None: plain frequencies")
    norm: str = field("layernorm", help="'layernorm' (GPT-2) or 'rmsnorm' (Llama, Qwen)")
    norm_eps: float = field(1e-5, help="Norm epsilon; 1e-5 is GPT-2's LayerNorm (and Llama 2's RMSNorm)")
    mlp: str = field("mlp", help="'mlp' (GPT-2's two-layer MLP) or 'swiglu' (Llama's gated MLP)")
    activation: str = field(
        "gelu_tanh", help="A key of xax.nn.mlp.ACTIVATIONS; 'gelu_tanh' is GPT-2's gelu_new, Llama uses 'silu'"
    )
    qkv_bias: bool = field(True, help="Biases on the q/k/v projections; True for GPT-2 and Qwen2, False for Llama")
    bias: bool = field(True, help="Biases on the attention output, the MLP and LayerNorm; True for GPT-2")
    tie_embeddings: bool = field(True, help="Reuse the token embedding as the output projection (GPT-2, small Qwen2)")
    sliding_window: int | None = field(
        None, help="Attend to only this many most recent tokens (Mistral); None is full causal attention"
    )
    dropout: float = field(
        0.0, help="Residual and embedding dropout rate; 0 since modern pretraining uses none (GPT-2 used 0.1)"
    )
    init_std: float = field(0.02, help="Weight initialization standard deviation; 0.02 as GPT-2 and Llama")
    scaled_residual_init: bool = field(
        True, help="Divide residual output projections' init by sqrt(2 num_layers) (GPT-2): bounded variance"
    )
    attention_impl: str = field(
        "auto", help="'auto' (cuDNN on GPU where supported, else XLA: never slower), 'xla' or 'cudnn'"
    )
    scan_layers: bool = field(
        False,
        help="Stack the blocks' weights and apply them with lax.scan (compile time flat in depth); off because "
        "the loop trains faster: GPT-2 small's H100 step took 70 ms scanned against 55 ms unrolled",
    )
    remat: str = field(
        "none",
        help="A key of REMAT_POLICIES: 'none' keeps all activations (fastest when memory allows), 'full' "
        "recomputes each block in the backward pass, 'dots_saveable' keeps matmul outputs only",
    )
    compute_dtype: str = field(
        "float32", help="Activation dtype (float32, bfloat16, float16; weights stay float32); float32 is exact"
    )

    def __post_init__(self) -> None:
        check_choice(self, "positions", POSITION_TYPES)
        check_choice(self, "norm", NORM_TYPES)
        check_choice(self, "mlp", MLP_TYPES)
        check_choice(self, "activation", ACTIVATIONS)
        check_choice(self, "attention_impl", IMPLEMENTATIONS)
        check_choice(self, "remat", REMAT_POLICIES)
        check_choice(self, "compute_dtype", COMPUTE_DTYPES)
        check_positive(self, "vocab_size", "max_seq_len", "d_model", "num_layers", "num_heads")
        if self.num_heads % self.kv_heads != 0:
            raise ModelConfigError(
                f"TransformerConfig: num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}; "
                "use a divisor of num_heads"
            )
        if self.head_dim is None and self.d_model % self.num_heads != 0:
            raise ModelConfigError(
                f"TransformerConfig: d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"TransformerConfig.dropout={self.dropout} must be in [0, 1)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or 4 * self.d_model

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(COMPUTE_DTYPES[self.compute_dtype])

    def with_updates(self, **changes: Any) -> "TransformerConfig":
        """Returns a copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def gpt2_small(cls) -> "TransformerConfig":
        """GPT-2 small: 12 layers, 768 wide, 12 heads, 124M parameters (Radford et al. 2019)."""
        return cls()

    @classmethod
    def gpt2_tiny(cls) -> "TransformerConfig":
        """A GPT-2-style model small enough for tests: 2 layers, 64 wide, vocabulary 128."""
        return cls(vocab_size=128, max_seq_len=64, d_model=64, num_layers=2, num_heads=4)

    @classmethod
    def llama_tiny(cls) -> "TransformerConfig":
        """A Llama-style model for tests: RoPE, RMSNorm, SwiGLU, GQA (4 query / 2 kv heads), untied."""
        return cls(
            vocab_size=128,
            max_seq_len=64,
            d_model=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            mlp_dim=160,
            positions="rope",
            norm="rmsnorm",
            mlp="swiglu",
            activation="silu",
            qkv_bias=False,
            bias=False,
            tie_embeddings=False,
            scaled_residual_init=False,
        )

    @classmethod
    def qwen_tiny(cls) -> "TransformerConfig":
        """A Qwen2-style model for tests: Llama's layout plus q/k/v biases, theta 1e6, tied embeddings."""
        return cls.llama_tiny().with_updates(qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True)

    @classmethod
    def mistral_tiny(cls) -> "TransformerConfig":
        """A Mistral-style model for tests: Llama's layout with multi-query attention and a sliding window."""
        return cls.llama_tiny().with_updates(num_kv_heads=1, sliding_window=8)


def _dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """Inverted dropout; identity when ``key`` is None (inference) or the rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class TransformerBlock(eqx.Module):
    """One pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    input_layernorm: LayerNorm | RMSNorm
    self_attn: MultiHeadAttention
    post_attention_layernorm: LayerNorm | RMSNorm
    mlp: MLP | SwiGLU
    dropout: float = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray) -> None:
        k_attn, k_mlp = jax.random.split(key)
        scale = math.sqrt(2 * config.num_layers) if config.scaled_residual_init else 1.0
        out_std = config.init_std / scale
        self.input_layernorm = make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.self_attn = MultiHeadAttention(
            config.d_model,
            config.num_heads,
            key=k_attn,
            num_kv_heads=config.kv_heads,
            head_dim=config.head_size,
            qkv_bias=config.qkv_bias,
            out_bias=config.bias,
            sliding_window=config.sliding_window,
            implementation=config.attention_impl,
            init_std=config.init_std,
            out_init_std=out_std,
        )
        self.post_attention_layernorm = make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        mlp_cls = SwiGLU if config.mlp == "swiglu" else MLP
        self.mlp = mlp_cls(
            config.d_model,
            config.hidden_dim,
            key=k_mlp,
            activation=config.activation,
            use_bias=config.bias,
            init_std=config.init_std,
            out_init_std=out_std,
        )
        self.dropout = config.dropout

    def __call__(
        self,
        x: Float[Array, "batch seq dim"],
        *,
        rotary: tuple[Array, Array] | None,
        padding_mask: Bool[Array, "batch seq"] | None,
        cache: KVCache | None,
        key: PRNGKeyArray | None,
    ) -> tuple[Float[Array, "batch seq dim"], KVCache | None]:
        k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
        h, cache = self.self_attn(self.input_layernorm(x), rotary=rotary, padding_mask=padding_mask, cache=cache)
        x = x + _dropout(h, self.dropout, k_attn)  # (B, T, D)
        x = x + _dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, k_mlp)
        return x, cache


class Transformer(eqx.Module):
    """A decoder-only language model; see the module docstring for parameter names.

    Attributes:
        embed_tokens: The token embedding (vocab, d_model).
        embed_positions: The learned position table (max_seq_len, d_model), or None.
        rotary: RoPE settings, or None.
        layers: The blocks: one block with a leading layer axis on every weight (scanned), or a tuple.
        norm: The final norm.
        lm_head: The output projection (vocab <- d_model), or None when tied to ``embed_tokens``.
        config: The configuration.
        inference: When True, dropout is off even if a key is passed (set by ``eqx.nn.inference_mode``,
            which the training loop applies for validation).
    """

    embed_tokens: Embedding
    embed_positions: Embedding | None
    rotary: RotaryEmbedding | None
    layers: TransformerBlock | tuple[TransformerBlock, ...]
    norm: LayerNorm | RMSNorm
    lm_head: AnyLinear | None
    config: TransformerConfig = eqx.field(static=True)
    inference: bool

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray, inference: bool = False) -> None:
        k_tok, k_pos, k_layers, k_head = jax.random.split(key, 4)
        self.config = config
        self.inference = inference
        self.embed_tokens = Embedding(config.vocab_size, config.d_model, key=k_tok, init_std=config.init_std)
        self.embed_positions = None
        self.rotary = None
        if config.positions == "learned":
            # GPT-2 initializes its position table with a smaller std than the token table.
            self.embed_positions = Embedding(config.max_seq_len, config.d_model, key=k_pos, init_std=0.01)
        elif config.positions == "rope":
            self.rotary = RotaryEmbedding(config.head_size, config.rope_theta, config.rope_scaling, config.max_seq_len)
        layer_keys = jax.random.split(k_layers, config.num_layers)
        if config.scan_layers:
            self.layers = eqx.filter_vmap(lambda k: TransformerBlock(config, key=k))(layer_keys)
        else:
            self.layers = tuple(TransformerBlock(config, key=k) for k in layer_keys)
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = make_linear(config.d_model, config.vocab_size, False, config.init_std, k_head)

    def unembedding(self) -> Float[Array, "vocab dim"]:
        """The output projection matrix (vocab, d_model), for ``chunked_cross_entropy``."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_cache(self, batch: int, slots: int) -> TransformerCache:
        """An empty KV cache for ``batch`` sequences of up to ``slots`` tokens, in the compute dtype."""
        cfg = self.config
        if cfg.positions == "learned" and slots > cfg.max_seq_len:
            raise ConfigError(
                f"Transformer.init_cache: slots={slots} exceeds max_seq_len={cfg.max_seq_len}, the size of the "
                "learned position table; use fewer slots or a model with a larger max_seq_len"
            )
        cache = KVCache.empty(batch, slots, cfg.kv_heads, cfg.head_size, cfg.dtype)
        if cfg.scan_layers:
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_layers, *x.shape)), cache)
        return tuple(cache for _ in range(cfg.num_layers))

    def hidden_states(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        positions: Int[Array, "batch seq"] | None = None,
        padding_mask: Bool[Array, "batch seq"] | None = None,
        cache: TransformerCache | None = None,
        key: PRNGKeyArray | None = None,
        check_ids: bool = False,
    ) -> tuple[Float[Array, "batch seq dim"], TransformerCache | None]:
        """Runs the model up to the final norm.

        Args:
            tokens: Token ids (B, T), each in [0, vocab_size). With learned positions, T is at most
                ``max_seq_len`` (a longer input raises ``ConfigError`` at trace time).
            positions: Position ids (B, T); by default ``arange(T)`` shifted by the cache index.
            padding_mask: False at pad tokens (B, T); None when there is no padding.
            cache: The KV cache from ``init_cache`` (or a previous call), or None.
            key: A PRNG key enables dropout (training); None disables it.
            check_ids: Check with ``jax.experimental.checkify`` that every token id is in
                [0, vocab_size) and, with learned positions, every position in [0, max_seq_len); a
                failure names the first bad id's index and value. Eager calls raise at once; under
                ``jax.jit`` wrap the function in ``checkify.checkify`` and call ``err.throw()``.
                Off by default, and then ids are not checked at all (no cost): an id at or past
                ``vocab_size`` gives NaN and -1 reads the last row.

        Returns:
            ``(hidden states (B, T, d_model) in the compute dtype, updated cache or None)``.
        """
        cfg = self.config
        model = cast_floating(self, cfg.dtype)
        batch, seq = tokens.shape
        _check_length(cfg, seq, cache)
        if positions is None:
            start = jnp.zeros((), jnp.int32) if cache is None else _cache_index(cache)
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if check_ids:
            _check_token_and_position_ids(cfg, tokens, positions)
        # A concrete flag (the training loop and eqx.filter_jit keep bools static); a model passed
        # whole to jax.jit sees a traced one, and then the key alone decides.
        if isinstance(self.inference, bool) and self.inference:
            key = None
        k_embed, k_layers = (None, None) if key is None else jax.random.split(key)

        x = model.embed_tokens(tokens)  # (B, T, D)
        if model.embed_positions is not None:
            x = x + model.embed_positions(positions)
        x = _dropout(x, cfg.dropout, k_embed)
        rotary = None if model.rotary is None else model.rotary(positions)  # 2 x (B, T, head_dim) float32

        def block(layer: TransformerBlock, x: Array, layer_cache: KVCache | None, layer_key: Array | None) -> tuple:
            return layer(x, rotary=rotary, padding_mask=padding_mask, cache=layer_cache, key=layer_key)

        policy = REMAT_POLICIES[cfg.remat]
        run_block: Callable[..., tuple] = block if policy is None else jax.checkpoint(block, policy=policy)
        layer_keys = None if k_layers is None else jax.random.split(k_layers, cfg.num_layers)
        # The config decides the layout: stacked layers and cache when scanning, tuples otherwise.
        if cfg.scan_layers:
            layers, stacked = cast(TransformerBlock, model.layers), cast(KVCache | None, cache)
            x, cache = _scan_layers(run_block, layers, x, stacked, layer_keys)
        else:
            blocks, caches = cast(tuple[TransformerBlock, ...], model.layers), cast(tuple[KVCache, ...] | None, cache)
            x, cache = _loop_layers(run_block, blocks, x, caches, layer_keys)
        return model.norm(x), cache

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        positions: Int[Array, "batch seq"] | None = None,
        padding_mask: Bool[Array, "batch seq"] | None = None,
        cache: TransformerCache | None = None,
        key: PRNGKeyArray | None = None,
        check_ids: bool = False,
    ) -> tuple[Float[Array, "batch seq vocab"], TransformerCache | None]:
        """Returns float32 logits (B, T, vocab) and the updated cache; arguments as ``hidden_states``.

        Token ids are checked only with ``check_ids=True`` (see ``hidden_states``).
        """
        hidden, cache = self.hidden_states(
            tokens, positions=positions, padding_mask=padding_mask, cache=cache, key=key, check_ids=check_ids
        )
        unembedding = self.unembedding().astype(hidden.dtype)
        # float32 logits; the backward pass's vocabulary-sized GEMMs stay in the compute dtype.
        logits = mixed_dot_general(hidden, unembedding, (((2,), (1,)), ((), ())))
        return logits, cache


def _check_length(cfg: TransformerConfig, seq: int, cache: TransformerCache | None) -> None:
    """Refuses, at trace time, inputs longer than the position table or the cache."""
    if cfg.positions == "learned" and seq > cfg.max_seq_len:
        raise ConfigError(
            f"Transformer: a sequence of {seq} tokens exceeds max_seq_len={cfg.max_seq_len}, the size of the "
            "learned position table; shorten the input or use a model with a larger max_seq_len"
        )
    if cache is not None:
        slots = (cache[0] if isinstance(cache, tuple) else cache).key.shape[-3]  # key: (..., B, S, K, D)
        if seq > slots:
            raise ValueError(
                f"Transformer: a sequence of {seq} tokens does not fit a KV cache of {slots} slots; "
                f"make the cache with init_cache(batch, slots) and slots >= {seq}"
            )


def _check_token_and_position_ids(cfg: TransformerConfig, tokens: Array, positions: Array) -> None:
    """The checks of ``check_ids=True``: the rows each embedding table is asked for exist."""
    check_id_range(tokens, cfg.vocab_size, name="tokens", size_name="vocab_size")
    if cfg.positions == "learned":
        check_id_range(positions, cfg.max_seq_len, name="positions", size_name="max_seq_len")


def _cache_index(cache: TransformerCache) -> Int[Array, ""]:
    """The number of filled slots (the same in every layer)."""
    first = cache[0] if isinstance(cache, tuple) else cache
    return first.index.reshape(-1)[0]


def _scan_layers(
    block: Callable[..., tuple], layers: TransformerBlock, x: Array, cache: KVCache | None, keys: Array | None
) -> tuple[Array, KVCache | None]:
    """Applies stacked blocks with ``jax.lax.scan``; weights, caches and keys share the leading layer axis."""
    params, static = eqx.partition(layers, eqx.is_array)

    def step(x: Array, xs: tuple) -> tuple[Array, KVCache | None]:
        layer_params, layer_cache, layer_key = xs
        return block(eqx.combine(layer_params, static), x, layer_cache, layer_key)

    return jax.lax.scan(step, x, (params, cache, keys))


def _loop_layers(
    block: Callable[..., tuple],
    layers: tuple[TransformerBlock, ...],
    x: Array,
    cache: tuple[KVCache, ...] | None,
    keys: Array | None,
) -> tuple[Array, tuple[KVCache, ...] | None]:
    """Applies a tuple of blocks one after another."""
    new_caches = []
    for i, layer in enumerate(layers):
        x, layer_cache = block(layer, x, None if cache is None else cache[i], None if keys is None else keys[i])
        new_caches.append(layer_cache)
    return x, None if cache is None else tuple(new_caches)
