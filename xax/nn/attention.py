"""Multi-head attention with grouped-query / multi-query heads, masks, a KV cache and a cuDNN path.

``MultiHeadAttention`` covers multi-head (``num_kv_heads == num_heads``), grouped-query
(``num_heads % num_kv_heads == 0``) and multi-query (``num_kv_heads == 1``) attention. Masks are
expressed over cache *slots* (the order tokens were written): causal (``k_slot <= q_slot``),
sliding window (``q_slot - k_slot < window``, the window includes the token itself, as in Mistral)
and padding (a boolean per key, False for pad tokens).

``dot_product_attention`` is the one entry point for every model's attention (the transformer's
``MultiHeadAttention``, the DiT, mmDiT and UNet blocks); its implementations, chosen by name
(``IMPLEMENTATIONS``):

- "xla": plain XLA ops (``xla_attention``) with an explicit boolean mask; works everywhere, with
  any mask and with the cache.
- "cudnn": cuDNN flash attention through ``jax.nn.dot_product_attention``; GPU only, bf16/fp16,
  head_dim a multiple of 8 up to 128, no padding and no cache; full attention, causal attention,
  or a sliding window over causal attention.
- "auto" (or None): "cudnn" when all of the above hold, else "xla".
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from xax.nn.embeddings import apply_rotary
from xax.nn.lora import AnyLinear, apply_linear, make_linear
from xax.nn.precision import mixed_dot_general

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


class KVCache(eqx.Module):
    """A fixed-size key/value cache for one attention layer, batched and jittable.

    Slots ``[0, index)`` are filled; a decoding step writes its keys at ``index`` and advances it.

    Attributes:
        key: Cached keys, shape (B, S, K, D) for S slots and K key/value heads.
        value: Cached values, same shape.
        mask: Which slots hold real tokens, shape (B, S); False for padding and unfilled slots.
        index: The number of filled slots, an int32 scalar.
    """

    key: Float[Array, "batch slots kv_heads head_dim"]
    value: Float[Array, "batch slots kv_heads head_dim"]
    mask: Bool[Array, "batch slots"]
    index: Int[Array, ""]

    @classmethod
    def empty(cls, batch: int, slots: int, kv_heads: int, head_dim: int, dtype: DTypeLike) -> "KVCache":
        """Returns an empty cache of ``slots`` positions."""
        zeros = jnp.zeros((batch, slots, kv_heads, head_dim), dtype=dtype)
        return cls(zeros, zeros, jnp.zeros((batch, slots), dtype=bool), jnp.zeros((), dtype=jnp.int32))


def attention_mask(
    q_slots: Int[Array, " q"],
    k_slots: Int[Array, " k"],
    key_mask: Bool[Array, "batch k"] | None,
    *,
    causal: bool,
    sliding_window: int | None,
) -> Bool[Array, "batch 1 q k"]:
    """Builds the boolean mask (True = attend) from slot indices, padding and the window."""
    allowed = jnp.ones((q_slots.shape[0], k_slots.shape[0]), dtype=bool)  # (T, S)
    delta = q_slots[:, None] - k_slots[None, :]
    if causal:
        allowed &= delta >= 0
    if sliding_window is not None:
        allowed &= delta < sliding_window
    if key_mask is None:
        return allowed[None, None]
    return allowed[None, None] & key_mask[:, None, None, :]


def select_implementation(
    requested: str | None,
    dtype: DTypeLike,
    head_dim: int,
    *,
    needs_explicit_mask: bool,
    causal: bool,
    sliding_window: int | None = None,
) -> str:
    """Resolves "auto" to "cudnn" or "xla", or checks that an explicit "cudnn" request can run.

    Args:
        requested: One of ``IMPLEMENTATIONS``, or None for "auto".
        dtype: The query dtype.
        head_dim: The head dimension.
        needs_explicit_mask: True with padding or a cache (masks cuDNN's fused kernel cannot express).
        causal: Whether the mask is causal.
        sliding_window: The window, if any (cuDNN's sliding window needs a causal mask).

    Returns:
        "cudnn" or "xla".

    Examples:
        >>> import jax.numpy as jnp
        >>> select_implementation("auto", jnp.float32, 64, needs_explicit_mask=False, causal=True)
        'xla'
    """
    if requested is not None and requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={requested!r} is unknown; expected one of {IMPLEMENTATIONS} or None")
    if requested == "xla":
        return "xla"
    reasons = []
    if jax.default_backend() != "gpu":
        reasons.append(f"backend is {jax.default_backend()!r}, not 'gpu'")
    if dtype not in _CUDNN_DTYPES:
        reasons.append(f"dtype is {jnp.dtype(dtype).name}, not bfloat16/float16")
    if head_dim % 8 != 0 or head_dim > _CUDNN_MAX_HEAD_DIM:
        reasons.append(f"head_dim={head_dim} is not a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}")
    if needs_explicit_mask:
        reasons.append("a padding mask or KV cache needs an explicit mask")
    if sliding_window is not None and not causal:
        reasons.append("a sliding window needs a causal mask")
    if not reasons:
        return "cudnn"
    if requested == "cudnn":
        raise ValueError(f"attention implementation='cudnn' cannot run: {'; '.join(reasons)}; use 'auto' or 'xla'")
    return "xla"


def dot_product_attention(
    q: Float[Array, "batch q heads head_dim"],
    k: Float[Array, "batch k kv_heads head_dim"],
    v: Float[Array, "batch k kv_heads head_dim"],
    *,
    q_slots: Int[Array, " q"] | None = None,
    k_slots: Int[Array, " k"] | None = None,
    key_mask: Bool[Array, "batch k"] | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    implementation: str | None = "auto",
) -> Float[Array, "batch q heads head_dim"]:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(D) + mask) v`` with GQA broadcasting.

    Args:
        q: Queries (B, T, N, D).
        k: Keys (B, S, K, D) with N a multiple of K.
        v: Values (B, S, K, D).
        q_slots: The slot of each query (T,); None is ``arange(T)`` (no cache).
        k_slots: The slot of each key (S,); None is ``arange(S)``.
        key_mask: False for padding keys, shape (B, S); None when there is none.
        causal: Whether a query attends only to keys at or before its slot.
        sliding_window: If set, a query attends only to the last ``sliding_window`` slots.
        implementation: One of ``IMPLEMENTATIONS``; None is "auto".

    Returns:
        The attention output (B, T, N, D), in the dtype of ``q``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> q = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))  # (B, T, N, D)
        >>> out = dot_product_attention(q, q, q, causal=True)
        >>> out.shape
        (1, 3, 2, 4)
        >>> bool(jnp.allclose(out[:, 0], q[:, 0]))  # the first token sees only itself
        True
    """
    # Queries and keys at different slots need the mask only where it depends on the slots.
    slot_dependent = q.shape[1] != k.shape[1] and (causal or sliding_window is not None)
    impl = select_implementation(
        implementation,
        q.dtype,
        q.shape[-1],
        needs_explicit_mask=key_mask is not None or slot_dependent,
        causal=causal,
        sliding_window=sliding_window,
    )
    if impl == "cudnn":
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window, implementation="cudnn")
    if not causal and sliding_window is None and key_mask is None:
        return xla_attention(q, k, v)  # every query sees every key: no mask to build
    q_slots = jnp.arange(q.shape[1], dtype=jnp.int32) if q_slots is None else q_slots  # (T,)
    k_slots = jnp.arange(k.shape[1], dtype=jnp.int32) if k_slots is None else k_slots  # (S,)
    mask = attention_mask(q_slots, k_slots, key_mask, causal=causal, sliding_window=sliding_window)
    return xla_attention(q, k, v, mask)


def xla_attention(
    q: Float[Array, "batch q heads head_dim"],
    k: Float[Array, "batch k kv_heads head_dim"],
    v: Float[Array, "batch k kv_heads head_dim"],
    mask: Bool[Array, "#batch 1 q k"] | None = None,
) -> Float[Array, "batch q heads head_dim"]:
    """Grouped attention with float32 logits and softmax, in plain XLA ops; ``mask`` True = attend
    (None: every key).

    It mirrors ``jax.nn.dot_product_attention(implementation="xla")`` but builds its matmuls with
    ``lax.dot_general``, whose transpose keeps mixed bf16/f32 dtypes explicit (jax's version
    relies on implicit promotion in its backward pass).
    """
    batch, seq_q, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, seq_q, kv_heads, groups, dim)  # (B, T, K, G, D)
    logits = mixed_dot_general(q, k, (((4,), (3,)), ((0, 2), (0, 2))))  # (B, K, T, G, S) float32
    logits = logits * (1.0 / math.sqrt(dim))
    if mask is not None:
        grouped_mask = mask[:, :, :, None, :]  # (B, 1, T, 1, S)
        logits = jnp.where(grouped_mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jax.lax.dot_general(probs, v, (((4,), (1,)), ((0, 1), (0, 2))))  # (B, K, T, G, D)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(batch, seq_q, heads, dim)


class MultiHeadAttention(eqx.Module):
    """Causal self-attention with separate q/k/v/o projections, optional RoPE and a KV cache.

    Attributes:
        q_proj: d_model -> num_heads * head_dim.
        k_proj: d_model -> num_kv_heads * head_dim.
        v_proj: d_model -> num_kv_heads * head_dim.
        o_proj: num_heads * head_dim -> d_model.
        num_heads: Query heads.
        num_kv_heads: Key/value heads; divides ``num_heads``.
        head_dim: Width of one head.
        causal: Whether attention is causal.
        sliding_window: If set, the number of most recent slots each query sees.
        implementation: One of ``IMPLEMENTATIONS``.
    """

    q_proj: AnyLinear
    k_proj: AnyLinear
    v_proj: AnyLinear
    o_proj: AnyLinear
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)
    implementation: str = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        key: PRNGKeyArray,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        causal: bool = True,
        sliding_window: int | None = None,
        implementation: str = "auto",
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ) -> None:
        """Builds the layer.

        Args:
            dim: The model width.
            num_heads: Query heads.
            key: The PRNG key.
            num_kv_heads: Key/value heads (None: ``num_heads``, plain multi-head attention).
            head_dim: Width of one head (None: ``dim // num_heads``).
            qkv_bias: Whether q/k/v projections have biases (GPT-2, Qwen).
            out_bias: Whether the output projection has a bias (GPT-2).
            causal: Whether attention is causal.
            sliding_window: If set, the number of most recent slots each query sees.
            implementation: One of ``IMPLEMENTATIONS``.
            init_std: The weight standard deviation of q/k/v.
            out_init_std: The same for ``o_proj``; defaults to ``init_std``.
        """
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}; pick a divisor of num_heads"
            )
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; set head_dim explicitly")
            head_dim = dim // num_heads
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r} is unknown; expected one of {IMPLEMENTATIONS}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens or None, got {sliding_window}")
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q_proj = make_linear(dim, num_heads * head_dim, qkv_bias, init_std, kq)
        self.k_proj = make_linear(dim, num_kv_heads * head_dim, qkv_bias, init_std, kk)
        self.v_proj = make_linear(dim, num_kv_heads * head_dim, qkv_bias, init_std, kv)
        self.o_proj = make_linear(num_heads * head_dim, dim, out_bias, out_init_std or init_std, ko)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.sliding_window = sliding_window
        self.implementation = implementation

    def __call__(
        self,
        x: Float[Array, "batch seq dim"],
        *,
        rotary: tuple[Float[Array, "batch seq head_dim"], Float[Array, "batch seq head_dim"]] | None = None,
        padding_mask: Bool[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Float[Array, "batch seq dim"], KVCache | None]:
        """Attends over ``x`` (and the cache, if given).

        Args:
            x: The input (B, T, d_model).
            rotary: ``(cos, sin)`` from ``RotaryEmbedding`` for these tokens, or None without RoPE.
            padding_mask: False at pad tokens of ``x``, shape (B, T); None when there is no padding.
            cache: The layer's cache; the new keys are written at ``cache.index``.

        Returns:
            ``(output (B, T, d_model), updated cache or None)``.
        """
        batch, seq, _ = x.shape
        q = apply_linear(self.q_proj, x).reshape(batch, seq, self.num_heads, self.head_dim)  # (B, T, N, D)
        k = apply_linear(self.k_proj, x).reshape(batch, seq, self.num_kv_heads, self.head_dim)  # (B, T, K, D)
        v = apply_linear(self.v_proj, x).reshape(batch, seq, self.num_kv_heads, self.head_dim)  # (B, T, K, D)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)

        q_slots = jnp.arange(seq, dtype=jnp.int32)  # (T,)
        key_mask = padding_mask
        if cache is not None:
            tokens_mask = jnp.ones((batch, seq), dtype=bool) if padding_mask is None else padding_mask
            cache = KVCache(
                key=jax.lax.dynamic_update_slice_in_dim(cache.key, k.astype(cache.key.dtype), cache.index, axis=1),
                value=jax.lax.dynamic_update_slice_in_dim(cache.value, v.astype(cache.value.dtype), cache.index, 1),
                mask=jax.lax.dynamic_update_slice_in_dim(cache.mask, tokens_mask, cache.index, axis=1),
                index=cache.index + seq,
            )
            q_slots = q_slots + cache.index - seq
            k, v, key_mask = cache.key.astype(q.dtype), cache.value.astype(q.dtype), cache.mask  # (B, S, K, D)
        k_slots = jnp.arange(k.shape[1], dtype=jnp.int32)  # (S,)

        out = dot_product_attention(
            q,
            k,
            v,
            q_slots=q_slots,
            k_slots=k_slots,
            key_mask=key_mask,
            causal=self.causal,
            sliding_window=self.sliding_window,
            implementation=self.implementation,
        )  # (B, T, N, D)
        return apply_linear(self.o_proj, out.reshape(batch, seq, self.num_heads * self.head_dim)), cache
