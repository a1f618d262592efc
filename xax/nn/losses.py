"""Language-model losses and metrics: cross-entropy (full or chunked), token accuracy, perplexity.

Cross-entropy with label smoothing ε over a vocabulary of V classes uses the target
``q = (1 - ε) onehot(y) + ε / V`` (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567), so per token

    loss = logsumexp(z) - (1 - ε) z_y - ε mean(z),

averaged over the tokens whose label is not ``ignore_index``. This equals
``optax.softmax_cross_entropy(z, optax.smooth_labels(onehot(y), ε))``.

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
    logits: Float[Array, "*batch vocab"], labels: Int[Array, "*batch"], label_smoothing: float, ignore_index: int
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch"]]:
    """Per-token smoothed cross-entropy (zero where ignored) and the float32 mask of counted tokens."""
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0)
    mask = valid.astype(jnp.float32)
    return _smoothed_xent(logits.astype(jnp.float32), safe_labels, label_smoothing) * mask, mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _smoothed_xent(logits: Array, labels: Array, label_smoothing: float) -> Array:
    """``logsumexp(z) - (1 - ε) z[label] - ε mean(z)`` per token, float32."""
    return _smoothed_xent_forward(logits, labels, label_smoothing)[0]


def _smoothed_xent_forward(logits: Array, labels: Array, label_smoothing: float) -> tuple[Array, tuple]:
    lse = jax.nn.logsumexp(logits, axis=-1)
    loss = lse - (1.0 - label_smoothing) * jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if label_smoothing:
        loss = loss - label_smoothing * jnp.mean(logits, axis=-1)
    return loss, (logits, labels, lse)


def _smoothed_xent_backward(label_smoothing: float, residuals: tuple, cotangent: Array) -> tuple[Array, None]:
    # d loss / d z = softmax(z) - (1 - ε) onehot(label) - ε / V, in one elementwise pass: autodiff
    # of take_along_axis would instead scatter into a zeroed (tokens, vocab) array, two more passes
    # over the largest tensor of a language model's step.
    logits, labels, lse = residuals
    vocab = logits.shape[-1]
    onehot = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1) == labels[..., None]
    target = jnp.where(onehot, 1.0 - label_smoothing, 0.0) + label_smoothing / vocab
    return cotangent[..., None] * (jnp.exp(logits - lse[..., None]) - target), None


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


def token_accuracy(
    logits: Float[Array, "*batch vocab"], labels: Int[Array, "*batch"], *, ignore_index: int = IGNORE_INDEX
) -> Float[Array, ""]:
    """The fraction of counted tokens whose arg-max prediction equals the label (0 when none count)."""
    valid = labels != ignore_index
    correct = (jnp.argmax(logits, axis=-1) == labels) & valid
    return jnp.sum(correct.astype(jnp.float32)) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def perplexity(mean_loss: Float[Array, ""]) -> Float[Array, ""]:
    """Perplexity ``exp(loss)`` from a mean (unsmoothed) cross-entropy in nats."""
    return jnp.exp(mean_loss)
