"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

Training replaces each label by a reserved null label with probability ``p``, so that one network learns
both ``f(x, t, y)`` and ``f(x, t, null)``. Sampling mixes them: ``f = f_u + s (f_c - f_u)``, which is the
unconditional network at ``s = 0`` and the conditional one at ``s = 1``. The same mix applies to an
``eps``, ``x0``, ``v`` or flow-velocity output, as each is affine in the score.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from xax.arch.diffusion.gaussian import Denoiser

# A batched conditional network: (x of shape (B, ...), time (B,), labels (B,)) -> output of x's shape.
ConditionalNet = Callable[[Array, Array, Array], Array]


def drop_labels(labels: Int[Array, " b"], key: PRNGKeyArray, drop_prob: float, null_label: int) -> Int[Array, " b"]:
    """Replaces each label by ``null_label`` with probability ``drop_prob`` (0.1 in Ho & Salimans 2022).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> labels = jnp.array([1, 2, 3])
        >>> drop_labels(labels, jax.random.key(0), drop_prob=1.0, null_label=10).tolist()
        [10, 10, 10]
        >>> drop_labels(labels, jax.random.key(0), drop_prob=0.0, null_label=10).tolist()
        [1, 2, 3]
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob={drop_prob} must lie in [0, 1]")
    dropped = jax.random.bernoulli(key, drop_prob, labels.shape)
    return jnp.where(dropped, jnp.asarray(null_label, labels.dtype), labels)


def guided(net: ConditionalNet, labels: Int[Array, " b"], null_label: int, scale: float | Float[Array, ""]) -> Denoiser:
    """The guided network ``f_u + s (f_c - f_u)`` for fixed labels, as a :data:`Denoiser` for any sampler.

    The conditional and unconditional outputs come from one forward pass over the doubled batch.

    Args:
        net: The batched conditional network, trained with :func:`drop_labels`.
        labels: The class of each sample.
        null_label: The label that stands for "no class".
        scale: The guidance scale ``s``: 0 is unconditional, 1 conditional, larger is sharper.

    Returns:
        A function of ``(x, t)``.
    """

    def denoiser(x: Array, t: Array) -> Array:
        null = jnp.full_like(labels, null_label)
        out = net(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
        cond, uncond = jnp.split(out, 2)
        return uncond + jnp.asarray(scale, x.dtype) * (cond - uncond)

    return denoiser


def conditioned(net: ConditionalNet, labels: Int[Array, " b"]) -> Denoiser:
    """The network with fixed labels and no guidance, as a :data:`Denoiser`."""
    return lambda x, t: net(x, t, labels)
