"""Gaussian diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): the forward process,
the three parameterizations of the network's output and the training loss.

With ``a = sqrt(alpha_bar)`` and ``b = sqrt(1 - alpha_bar)`` the forward process is ``x_t = a x_0 + b eps``.
A network predicts one of ``eps`` (Ho et al. 2020), ``x0``, or the velocity ``v = a eps - b x_0``
(Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"); each one determines
the other two given ``x_t``.
"""

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from xax.arch.diffusion.schedules import GaussianSchedule

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")

# A batched network: (x_t of shape (B, ...), time of shape (B,) in [0, 1]) -> output of x_t's shape.
Denoiser = Callable[[Array, Array], Array]


def _bcast(level: Float[Array, " b"], x: Array) -> Array:
    """(B,) -> (B, 1, ..., 1) to broadcast against x, in x's dtype."""
    return level.reshape(level.shape + (1,) * (x.ndim - level.ndim)).astype(x.dtype)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is unknown; use one of {list(PREDICTIONS)}")


def q_sample(x0: Float[Array, " b *dims"], eps: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"]) -> Array:
    """The forward process ``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps`` (Ho et al. 2020, eq. 4).

    Examples:
        >>> import jax.numpy as jnp
        >>> x0, eps = jnp.ones((2, 2)), jnp.zeros((2, 2))
        >>> q_sample(x0, eps, jnp.array([1.0, 0.25])).tolist()  # one level per sample
        [[1.0, 1.0], [0.5, 0.5]]
    """
    return _bcast(jnp.sqrt(alpha_bar), x0) * x0 + _bcast(jnp.sqrt(1 - alpha_bar), x0) * eps


def x0_from_eps(x_t: Float[Array, " b *dims"], eps: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"]) -> Array:
    """``x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> x0, eps, alpha_bar = jnp.array([[3.0]]), jnp.array([[1.0]]), jnp.array([0.64])
        >>> [round(v, 4) for v in x0_from_eps(q_sample(x0, eps, alpha_bar), eps, alpha_bar)[0].tolist()]
        [3.0]
    """
    return (x_t - _bcast(jnp.sqrt(1 - alpha_bar), x_t) * eps) / _bcast(jnp.sqrt(alpha_bar), x_t)


def eps_from_x0(x_t: Float[Array, " b *dims"], x0: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"]) -> Array:
    """``eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar)``."""
    return (x_t - _bcast(jnp.sqrt(alpha_bar), x_t) * x0) / _bcast(jnp.sqrt(1 - alpha_bar), x_t)


def v_from_eps_x0(eps: Float[Array, " b *dims"], x0: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"]) -> Array:
    """The velocity ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0`` (Salimans & Ho 2022, section 4)."""
    return _bcast(jnp.sqrt(alpha_bar), x0) * eps - _bcast(jnp.sqrt(1 - alpha_bar), x0) * x0


def x0_from_v(x_t: Float[Array, " b *dims"], v: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"]) -> Array:
    """``x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v``."""
    return _bcast(jnp.sqrt(alpha_bar), x_t) * x_t - _bcast(jnp.sqrt(1 - alpha_bar), x_t) * v


def eps_from_v(x_t: Float[Array, " b *dims"], v: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"]) -> Array:
    """``eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v``."""
    return _bcast(jnp.sqrt(1 - alpha_bar), x_t) * x_t + _bcast(jnp.sqrt(alpha_bar), x_t) * v


def to_x0_eps(
    output: Float[Array, " b *dims"], x_t: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"], prediction: str
) -> tuple[Array, Array]:
    """Converts a network output of the given parameterization to the pair ``(x_0, eps)``."""
    check_prediction(prediction)
    if prediction == "eps":
        return x0_from_eps(x_t, output, alpha_bar), output
    if prediction == "x0":
        return output, eps_from_x0(x_t, output, alpha_bar)
    return x0_from_v(x_t, output, alpha_bar), eps_from_v(x_t, output, alpha_bar)


def target(
    x0: Float[Array, " b *dims"], eps: Float[Array, " b *dims"], alpha_bar: Float[Array, " b"], prediction: str
) -> Array:
    """What a network of the given parameterization is trained to output."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_from_eps_x0(eps, x0, alpha_bar)


def posterior_mean_variance(
    schedule: GaussianSchedule, x0: Float[Array, " b *dims"], x_t: Float[Array, " b *dims"], step: Int[Array, " b"]
) -> tuple[Array, Float[Array, " b"]]:
    """Mean and variance of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. 2020, eqs. 6-7).

    ``mean = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t`` and
    ``variance = (1 - ab_{t-1}) / (1 - ab_t) beta_t``, with ``ab_{-1} = 1`` (so the variance at ``t = 0`` is 0).
    """
    beta = schedule.betas[step]
    alpha_bar, alpha_bar_prev = schedule.alpha_bar[step], schedule.alpha_bar_prev(step)
    coef_x0 = jnp.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
    coef_xt = jnp.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar)
    mean = _bcast(coef_x0, x0) * x0 + _bcast(coef_xt, x_t) * x_t
    return mean, (1 - alpha_bar_prev) / (1 - alpha_bar) * beta


def snr_weight(snr: Float[Array, " b"], gamma: float | None, prediction: str) -> Float[Array, " b"]:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The weight on the ``x_0`` error is ``min(snr, gamma)``; written on each target's MSE it is
    ``min(snr, gamma) / snr`` for ``eps``, ``min(snr, gamma)`` for ``x0`` and ``min(snr, gamma) / (snr + 1)``
    for ``v``. ``gamma=None`` gives every sample weight 1.
    """
    check_prediction(prediction)
    if gamma is None:
        return jnp.ones_like(snr)
    clipped = jnp.minimum(snr, gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def diffusion_loss(
    denoiser: Denoiser,
    schedule: GaussianSchedule,
    x0: Float[Array, " b *dims"],
    key: PRNGKeyArray,
    prediction: Prediction = "eps",
    snr_gamma: float | None = None,
) -> Float[Array, ""]:
    """The denoising loss ``E_{t, eps} w(t) ||f(x_t, t) - target||^2`` (Ho et al. 2020, eq. 14, "L_simple").

    Args:
        denoiser: The batched network; it sees time ``(i + 1) / T`` for step ``i``.
        schedule: The discrete noise schedule.
        x0: A batch of clean data.
        key: Draws one uniform step and one Gaussian noise per sample.
        prediction: What the network outputs: "eps", "x0" or "v".
        snr_gamma: Min-SNR-gamma weighting (see :func:`snr_weight`); None weighs every step equally.

    Returns:
        The weighted mean squared error, a float32 scalar.
    """
    step_key, noise_key = jax.random.split(key)
    step = jax.random.randint(step_key, (x0.shape[0],), 0, schedule.num_steps)
    eps = jax.random.normal(noise_key, x0.shape, x0.dtype)
    alpha_bar = schedule.alpha_bar[step]
    output = denoiser(q_sample(x0, eps, alpha_bar), schedule.model_time(step))
    error = (output - target(x0, eps, alpha_bar, prediction)).astype(jnp.float32) ** 2
    per_sample = error.reshape(error.shape[0], -1).mean(axis=1)
    return (snr_weight(schedule.snr(step), snr_gamma, prediction) * per_sample).mean()
