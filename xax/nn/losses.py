"""Language-model losses: cross-entropy (full, projected or chunked); the metrics are in ``xax.nn.metrics``.

Cross-entropy with label smoothing ε over a vocabulary of V classes uses the target
``q = (1 - ε) onehot(y) + ε / V`` (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567), so per token

    loss = logsumexp(z) - (1 - ε) z_y - ε mean(z),

averaged over the tokens whose label is not ``ignore_index``. This equals
``optax.softmax_cross_entropy(z, optax.smooth_labels(onehot(y), ε))``.

``projected_cross_entropy`` computes the same value from the final hidden states and the unembedding
matrix with the vocabulary padded for fast GEMMs (the fast path for training).
``chunked_cross_entropy`` computes the same value from the final hidden states and the unembedding
matrix, ``chunk_size`` tokens at a time under ``jax.checkpoint``, so neither the forward nor the
backward pass ever holds the full (B, T, V) logits: peak memory is one (chunk_size, V) block.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from xax.nn.precision import mixed_dot_general

# The label PyTorch and Hugging Face use for "no loss here" (padding, prompt tokens).
IGNORE_INDEX = -100


def _token_losses(
    logits: Float[Array, "*batch vocab"],
    labels: Int[Array, "*batch"],
    label_smoothing: float,
    ignore_index: int,
    num_classes: int | None = None,
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch"]]:
    """Per-token smoothed cross-entropy (zero where ignored) and the float32 mask of counted tokens;
    only the first ``num_classes`` columns of ``logits`` are classes (all of them when None)."""
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0)
    mask = valid.astype(jnp.float32)
    classes = logits.shape[-1] if num_classes is None else num_classes
    return _smoothed_xent(logits, safe_labels, label_smoothing, classes) * mask, mask


def _class_logits(logits: Array, num_classes: int) -> Array:
    """float32 logits with the columns past ``num_classes`` (vocabulary padding) at -inf."""
    logits = logits.astype(jnp.float32)
    if num_classes == logits.shape[-1]:
        return logits
    column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(column < num_classes, logits, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _smoothed_xent(logits: Array, labels: Array, label_smoothing: float, num_classes: int) -> Array:
    """``logsumexp(z) - (1 - ε) z[label] - ε mean(z)`` per token in float32, over the first
    ``num_classes`` columns of ``z`` (any floating dtype; the gradient has the same dtype)."""
    return _smoothed_xent_forward(logits, labels, label_smoothing, num_classes)[0]


def _smoothed_xent_forward(
    logits: Array, labels: Array, label_smoothing: float, num_classes: int
) -> tuple[Array, tuple]:
    z = _class_logits(logits, num_classes)
    lse = jax.nn.logsumexp(z, axis=-1)
    loss = lse - (1.0 - label_smoothing) * jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    if label_smoothing:
        loss = loss - label_smoothing * jnp.mean(z[..., :num_classes], axis=-1)
    # The logits are kept in their own dtype (half the memory of float32 for bfloat16 logits).
    return loss, (logits, labels, lse)


def _smoothed_xent_backward(
    label_smoothing: float, num_classes: int, residuals: tuple, cotangent: Array
) -> tuple[Array, None]:
    # d loss / d z = softmax(z) - (1 - ε) onehot(label) - ε / V, in one elementwise pass: autodiff
    # of take_along_axis would instead scatter into a zeroed (tokens, vocab) array, two more passes
    # over the largest tensor of a language model's step. Padding columns get exactly zero.
    logits, labels, lse = residuals
    column = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
    target = jnp.where(column == labels[..., None], 1.0 - label_smoothing, 0.0) + label_smoothing / num_classes
    if num_classes != logits.shape[-1]:
        target = jnp.where(column < num_classes, target, 0.0)
    probs = jnp.exp(_class_logits(logits, num_classes) - lse[..., None])
    return (cotangent[..., None] * (probs - target)).astype(logits.dtype), None


_smoothed_xent.defvjp(_smoothed_xent_forward, _smoothed_xent_backward)


def cross_entropy(
    logits: Float[Array, "*batch vocab"],
    labels: Int[Array, "*batch"],
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Float[Array, ""]:
    """Mean softmax cross-entropy over tokens whose label is not ``ignore_index`` (formula above).

    Args:
        logits: Unnormalized scores, any leading shape, last axis the vocabulary.
        labels: Integer targets with the leading shape of ``logits``.
        label_smoothing: ε in [0, 1).
        ignore_index: The label of tokens that do not count.

    Returns:
        The float32 mean loss (0 when no token counts).

    Examples:
        >>> import jax.numpy as jnp
        >>> logits = jnp.zeros((2, 4))  # uniform over 4 classes: the loss is ln 4
        >>> round(float(cross_entropy(logits, jnp.array([1, 3]))), 4)
        1.3863
        >>> round(float(cross_entropy(logits, jnp.array([1, -100]))), 4)  # -100 is not counted
        1.3863
    """
    loss, mask = _token_losses(logits, labels, label_smoothing, ignore_index)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(mask), 1.0)


def chunked_cross_entropy(
    hidden: Float[Array, "*batch dim"],
    unembedding: Float[Array, "vocab dim"],
    labels: Int[Array, "*batch"],
    *,
    chunk_size: int = 1024,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Float[Array, ""]:
    """``cross_entropy(hidden @ unembedding.T, labels)`` without materializing all logits.

    Tokens are flattened, padded to a multiple of ``chunk_size`` (padding is ignored) and mapped
    over with ``jax.lax.map``; each chunk's logits are recomputed in the backward pass
    (``jax.checkpoint``), so memory holds one (chunk_size, vocab) float32 block at a time.

    Args:
        hidden: Final hidden states (after the last norm), any leading shape.
        unembedding: The output embedding (vocab, dim): the lm_head weight, or the token
            embedding when tied.
        labels: Integer targets with the leading shape of ``hidden``.
        chunk_size: Tokens per chunk.
        label_smoothing: ε in [0, 1).
        ignore_index: The label of tokens that do not count.

    Returns:
        The float32 mean loss over counted tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be positive, got {chunk_size}")
    dim = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, dim)  # (N, D)
    flat_labels = labels.reshape(-1)  # (N,)
    num_chunks = -(-flat_hidden.shape[0] // chunk_size)
    pad = num_chunks * chunk_size - flat_hidden.shape[0]
    flat_hidden = jnp.pad(flat_hidden, ((0, pad), (0, 0)))
    flat_labels = jnp.pad(flat_labels, (0, pad), constant_values=ignore_index)
    unembedding = unembedding.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_loss(args: tuple[Array, Array]) -> tuple[Array, Array]:
        chunk_hidden, chunk_labels = args  # (C, D), (C,)
        logits = mixed_dot_general(chunk_hidden, unembedding, (((1,), (1,)), ((), ())))  # (C, V) float32
        loss, mask = _token_losses(logits, chunk_labels, label_smoothing, ignore_index)
        return jnp.sum(loss), jnp.sum(mask)

    sums, counts = jax.lax.map(
        chunk_loss,
        (flat_hidden.reshape(num_chunks, chunk_size, dim), flat_labels.reshape(num_chunks, chunk_size)),
    )  # (num_chunks,), (num_chunks,)
    return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)


def projected_cross_entropy(
    hidden: Float[Array, "*batch dim"],
    unembedding: Float[Array, "vocab dim"],
    labels: Int[Array, "*batch"],
    *,
    float32_logits: bool = True,
    pad_multiple: int = 128,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Float[Array, ""]:
    """``cross_entropy(hidden @ unembedding.T, labels)``, shaped for speed on tensor cores.

    The vocabulary is padded with zero rows to a multiple of ``pad_multiple`` for the output GEMMs
    (GPT-2's 50,257 rows made XLA pick a GEMM kernel 1.2x slower than at 50,304 on an H100) and the
    padding columns are masked out of the softmax, so the value and gradients equal the unpadded
    loss's. The backward GEMMs run in the dtype of ``hidden``.

    Args:
        hidden: Final hidden states (after the last norm), any leading shape, in the compute dtype.
        unembedding: The output embedding (vocab, dim); cast to the dtype of ``hidden``.
        labels: Integer targets with the leading shape of ``hidden``.
        float32_logits: Keep the logits in float32 (accurate); False keeps them in the dtype of
            ``hidden``, as ``torch.autocast`` does, halving the memory traffic of the loss (the
            softmax is still computed in float32).
        pad_multiple: Pad the vocabulary to a multiple of this (1: no padding).
        label_smoothing: ε in [0, 1).
        ignore_index: The label of tokens that do not count.

    Returns:
        The float32 mean loss over counted tokens.
    """
    if pad_multiple < 1:
        raise ValueError(f"projected_cross_entropy: pad_multiple must be positive, got {pad_multiple}")
    vocab = unembedding.shape[0]
    weight = unembedding.astype(hidden.dtype)
    pad = -vocab % pad_multiple
    if pad:
        weight = jnp.pad(weight, ((0, pad), (0, 0)))  # (V + pad, D)
    dims = (((hidden.ndim - 1,), (1,)), ((), ()))
    if float32_logits:
        logits = mixed_dot_general(hidden, weight, dims)  # (*batch, V + pad) float32
    else:
        logits = jax.lax.dot_general(hidden, weight, dims, preferred_element_type=hidden.dtype)
    loss, mask = _token_losses(logits, labels, label_smoothing, ignore_index, num_classes=vocab)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(mask), 1.0)
