"""Noise schedules of Gaussian diffusion, in discrete steps and in continuous time.

A schedule gives the signal level ``alpha_bar(t)`` of ``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``.
Continuous time runs over ``t in [0, 1]`` (0 is data, 1 is noise). The discrete schedule of ``T`` steps has
``beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T)`` (clipped to ``max_beta``) and
``alpha_bar_i = prod_{j <= i} (1 - beta_j)``, so step ``i`` sits at continuous time ``(i + 1) / T``
(Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models").
"""

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, final

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# Ho et al. (2020) used T = 1000 steps with betas from 1e-4 to 0.02; the continuous form is the VP-SDE
# of Song et al. (2021) with beta_min = 1000 * 1e-4 and beta_max = 1000 * 0.02.
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02
REFERENCE_STEPS = 1000
COSINE_OFFSET = 0.008
SIGMOID_START, SIGMOID_END, SIGMOID_TAU = -3.0, 3.0, 1.0
# Betas near 1 at the noisy end make the reverse process singular (Nichol & Dhariwal 2021, section 3.2).
MAX_BETA = 0.999


def _linear(t: Any, xp: ModuleType) -> Any:
    b0, b1 = LINEAR_BETA_START * REFERENCE_STEPS, LINEAR_BETA_END * REFERENCE_STEPS
    return xp.exp(-(b0 * t + 0.5 * (b1 - b0) * t**2))


def _cosine(t: Any, xp: ModuleType) -> Any:
    s = COSINE_OFFSET
    return xp.cos(0.5 * math.pi * (t + s) / (1 + s)) ** 2 / math.cos(0.5 * math.pi * s / (1 + s)) ** 2


def _sigmoid(t: Any, xp: ModuleType) -> Any:
    s, e, tau = SIGMOID_START, SIGMOID_END, SIGMOID_TAU
    v_start, v_end = 1 / (1 + math.exp(-s / tau)), 1 / (1 + math.exp(-e / tau))
    return (v_end - 1 / (1 + xp.exp(-(t * (e - s) + s) / tau))) / (v_end - v_start)


def linear_alpha_bar(t: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Continuous linear schedule (the VP-SDE of Song et al. 2021).

    ``alpha_bar(t) = exp(-(b0 t + (b1 - b0) t^2 / 2))`` with ``b0 = 0.1`` and ``b1 = 20``: the limit of
    Ho et al. (2020)'s linear betas (1e-4 to 0.02 over 1000 steps) as the step size shrinks.

    Examples:
        >>> import jax.numpy as jnp
        >>> [round(a, 4) for a in linear_alpha_bar(jnp.array([0.0, 0.5, 1.0])).tolist()]  # data to noise
        [1.0, 0.0791, 0.0]
    """
    return _linear(t, jnp)


def cosine_alpha_bar(t: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ``alpha_bar(t) = f(t) / f(0)`` with ``f(t) = cos^2(pi / 2 * (t + s) / (1 + s))`` and ``s = 0.008``.

    Examples:
        >>> import jax.numpy as jnp
        >>> [round(a, 4) for a in cosine_alpha_bar(jnp.array([0.0, 0.5])).tolist()]
        [1.0, 0.4938]
    """
    return _cosine(t, jnp)


def sigmoid_alpha_bar(t: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Sigmoid schedule (Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models", Alg. 1).

    ``alpha_bar(t) = (sigmoid(e / tau) - sigmoid((t (e - s) + s) / tau)) / (sigmoid(e / tau) - sigmoid(s / tau))``
    with ``s = -3``, ``e = 3`` and ``tau = 1``.
    """
    return _sigmoid(t, jnp)


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al. (2020)'s betas, ``linspace(1e-4, 0.02, T)`` scaled by ``1000 / T`` so that any ``T`` spans
    the same noise range (Nichol & Dhariwal 2021), in float64.

    Examples:
        >>> betas = linear_betas(1000)
        >>> float(betas[0]), float(betas[-1])
        (0.0001, 0.02)
    """
    scale = REFERENCE_STEPS / num_steps
    return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_steps, dtype=np.float64)


def betas_from_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], num_steps: int) -> np.ndarray:
    """``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)``, in float64."""
    levels = alpha_bar(np.arange(num_steps + 1, dtype=np.float64) / num_steps)
    return np.minimum(1 - levels[1:] / levels[:-1], MAX_BETA)


CONTINUOUS_SCHEDULES: dict[str, Callable[[Array], Array]] = {
    "linear": linear_alpha_bar,
    "cosine": cosine_alpha_bar,
    "sigmoid": sigmoid_alpha_bar,
}
DISCRETE_BETAS: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "cosine": lambda n: betas_from_alpha_bar(lambda t: _cosine(t, np), n),
    "sigmoid": lambda n: betas_from_alpha_bar(lambda t: _sigmoid(t, np), n),
}


def continuous_alpha_bar(name: str) -> Callable[[Array], Array]:
    """The continuous-time ``alpha_bar(t)`` of a schedule named in ``CONTINUOUS_SCHEDULES``."""
    if name not in CONTINUOUS_SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown; use one of {sorted(CONTINUOUS_SCHEDULES)}")
    return CONTINUOUS_SCHEDULES[name]


@final
class GaussianSchedule(eqx.Module):
    """A discrete noise schedule of ``T`` steps (float32 tables, built in float64).

    Examples:
        >>> import jax.numpy as jnp
        >>> schedule = GaussianSchedule.from_name("cosine", num_steps=4)
        >>> [round(a, 4) for a in schedule.alpha_bar.tolist()]  # from nearly clean to pure noise
        [0.847, 0.4938, 0.1443, 0.0001]
        >>> float(schedule.model_time(jnp.array(1)))
        0.5

    Attributes:
        betas: ``beta_i``, the variance added at step ``i`` (Ho et al. 2020).
        alpha_bar: ``alpha_bar_i = prod_{j <= i} (1 - beta_j)``.
    """

    betas: Float[Array, " T"]
    alpha_bar: Float[Array, " T"]

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "GaussianSchedule":
        """Builds the tables from float64 betas."""
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError(f"betas must be a 1-D array in (0, 1), got shape {betas.shape}")
        alpha_bar = np.cumprod(1 - betas)
        return cls(jnp.asarray(betas, jnp.float32), jnp.asarray(alpha_bar, jnp.float32))

    @classmethod
    def from_name(cls, name: str, num_steps: int = 1000) -> "GaussianSchedule":
        """Builds a named schedule ("linear", "cosine" or "sigmoid") of ``num_steps`` steps."""
        if name not in DISCRETE_BETAS:
            raise ValueError(f"schedule={name!r} is unknown; use one of {sorted(DISCRETE_BETAS)}")
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be at least 1")
        return cls.from_betas(DISCRETE_BETAS[name](num_steps))

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def alpha_bar_prev(self, step: Int[Array, "*shape"]) -> Float[Array, "*shape"]:
        """``alpha_bar_{i-1}``, with ``alpha_bar_{-1} = 1`` (clean data)."""
        return jnp.where(step > 0, self.alpha_bar[jnp.maximum(step - 1, 0)], 1.0)

    def model_time(self, step: Int[Array, "*shape"]) -> Float[Array, "*shape"]:
        """The continuous time ``(i + 1) / T`` in [0, 1] at which step ``i`` is shown to a network."""
        return (step + 1).astype(jnp.float32) / self.num_steps

    def snr(self, step: Int[Array, "*shape"]) -> Float[Array, "*shape"]:
        """Signal-to-noise ratio ``alpha_bar_i / (1 - alpha_bar_i)`` (Kingma et al. 2021)."""
        alpha_bar = self.alpha_bar[step]
        return alpha_bar / (1 - alpha_bar)
