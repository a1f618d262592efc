"""Classification and language-model metrics, jittable and masked like the losses.

Each returns a float32 scalar averaged over the counted positions (labels other than
``ignore_index``), ready for ``xax.Scalar``; with no counted position it is 0.
"""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from xax.nn.losses import IGNORE_INDEX


def _mean_over(hits: Array, valid: Array) -> Float[Array, ""]:
    """The fraction of ``valid`` positions where the boolean ``hits`` holds (0 when none is valid)."""
    counted = (hits & valid).astype(jnp.float32)
    return jnp.sum(counted) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def token_accuracy(
    logits: Float[Array, "*batch classes"], labels: Int[Array, "*batch"], *, ignore_index: int = IGNORE_INDEX
) -> Float[Array, ""]:
    """The fraction of counted positions whose arg-max prediction equals the label.

    Examples:
        >>> import jax.numpy as jnp
        >>> logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
        >>> float(token_accuracy(logits, jnp.array([0, 0, -100])))  # the last label is not counted
        0.5
    """
    return _mean_over(jnp.argmax(logits, axis=-1) == labels, labels != ignore_index)


def top_k_accuracy(
    logits: Float[Array, "*batch classes"], labels: Int[Array, "*batch"], k: int, *, ignore_index: int = IGNORE_INDEX
) -> Float[Array, ""]:
    """The fraction of counted positions whose label is among the ``k`` largest logits (fewer than
    ``k`` classes score strictly higher, so ties count in the label's favour).

    Examples:
        >>> import jax.numpy as jnp
        >>> logits = jnp.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
        >>> float(top_k_accuracy(logits, jnp.array([1, 2]), k=2))
        0.5
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k_accuracy: k={k} must lie in [1, {logits.shape[-1]}] (the number of classes)")
    valid = labels != ignore_index
    label_logit = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)  # (*batch, 1)
    higher = jnp.sum(logits > label_logit, axis=-1)
    return _mean_over(higher < k, valid)


def perplexity(mean_loss: Float[Array, ""]) -> Float[Array, ""]:
    """Perplexity ``exp(loss)`` from a mean (unsmoothed) cross-entropy in nats.

    Examples:
        >>> import math
        >>> import jax.numpy as jnp
        >>> round(float(perplexity(jnp.array(math.log(4.0)))), 4)  # as unsure as a fair 4-way choice
        4.0
    """
    return jnp.exp(mean_loss)


def bits_per_token(mean_loss: Float[Array, ""]) -> Float[Array, ""]:
    """A mean cross-entropy in nats expressed in bits (``loss / ln 2``): bits per character for
    character-level models.

    Examples:
        >>> import math
        >>> import jax.numpy as jnp
        >>> round(float(bits_per_token(jnp.array(math.log(2.0)))), 4)
        1.0
    """
    return mean_loss / math.log(2.0)


def calibration_error(
    logits: Float[Array, "*batch classes"],
    labels: Int[Array, "*batch"],
    num_bins: int = 15,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> Float[Array, ""]:
    """The expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
    predictions are put in ``num_bins`` equal-width bins of confidence (the top softmax probability),
    and ``ECE = sum_b n_b / n |accuracy_b - mean confidence_b|``.

    Examples:
        >>> import jax.numpy as jnp
        >>> logits = jnp.log(jnp.array([[0.9, 0.1], [0.9, 0.1]]))  # 90% sure of class 0 both times
        >>> round(float(calibration_error(logits, jnp.array([0, 1]))), 4)  # right half the time
        0.4
    """
    if num_bins < 1:
        raise ValueError(f"calibration_error: num_bins={num_bins} must be at least 1")
    valid = (labels != ignore_index).reshape(-1)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, logits.shape[-1])
    confidence = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == labels.reshape(-1)).astype(jnp.float32)
    # Bin b holds confidences in (b / B, (b + 1) / B]; the top probability is at least 1 / classes > 0.
    bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    weight = valid.astype(jnp.float32)
    gap = jax.ops.segment_sum(weight * (correct - confidence), bins, num_segments=num_bins)
    return jnp.sum(jnp.abs(gap)) / jnp.maximum(jnp.sum(weight), 1.0)
