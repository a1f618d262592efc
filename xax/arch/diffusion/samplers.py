"""Samplers of Gaussian diffusion: DDPM ancestral sampling and DDIM (with inversion), as ``lax.scan`` loops
over a batch; and the choice of the EMA weights to sample with."""

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from xax.arch.diffusion.gaussian import (
    Denoiser,
    Prediction,
    check_prediction,
    eps_from_x0,
    posterior_mean_variance,
    to_x0_eps,
)
from xax.arch.diffusion.schedules import GaussianSchedule


def _predict(
    denoiser: Denoiser, x: Array, time: Array, alpha_bar: Array, prediction: str, clip_x0: float | None
) -> tuple[Array, Array]:
    """``(x_0, eps)`` predicted at ``x`` of level ``alpha_bar``; a clipped ``x_0`` gets a consistent ``eps``."""
    batch = x.shape[0]
    time, alpha_bar = jnp.full((batch,), time), jnp.full((batch,), alpha_bar)
    x0, eps = to_x0_eps(denoiser(x, time), x, alpha_bar, prediction)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = eps_from_x0(x, x0, alpha_bar)
    return x0, eps


def ddpm_sample(
    denoiser: Denoiser,
    schedule: GaussianSchedule,
    noise: Float[Array, " b *dims"],
    key: PRNGKeyArray,
    prediction: Prediction = "eps",
    clip_x0: float | None = None,
    trajectory: bool = False,
) -> Float[Array, "..."]:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) through all ``T`` steps.

    Each step draws ``x_{t-1} ~ q(x_{t-1} | x_t, x_0 = f(x_t, t))``: the posterior mean of
    :func:`posterior_mean_variance` plus ``sqrt(beta_tilde_t) z``, with no noise at the last step.

    Args:
        denoiser: The batched network (time ``(i + 1) / T`` for step ``i``).
        schedule: The noise schedule it was trained with.
        noise: ``x_T``, standard Gaussian noise of the output's shape.
        key: The noise of the ``T`` steps.
        prediction: What the network outputs: "eps", "x0" or "v".
        clip_x0: Clip the predicted ``x_0`` to ``[-clip_x0, clip_x0]`` (1.0 for data scaled to [-1, 1]); None
            does not clip.
        trajectory: Return every step's ``x`` (see :func:`scan_steps`) instead of the last.

    Returns:
        The samples ``x_0`` (b, *dims), or with ``trajectory`` the states after each step (T, b, *dims).
    """
    check_prediction(prediction)
    num_steps = schedule.num_steps
    steps = jnp.arange(num_steps - 1, -1, -1)

    def body(x: Array, inputs: tuple[Array, Array]) -> Array:
        step, step_key = inputs
        x0, _ = _predict(denoiser, x, schedule.model_time(step), schedule.alpha_bar[step], prediction, clip_x0)
        batch_step = jnp.full((x.shape[0],), step)
        mean, variance = posterior_mean_variance(schedule, x0, x, batch_step)
        z = jax.random.normal(step_key, x.shape, x.dtype)
        return mean + jnp.sqrt(variance[0]).astype(x.dtype) * z

    return scan_steps(body, noise, (steps, jax.random.split(key, num_steps)), trajectory)


def scan_steps(body: Callable[[Array, Any], Array], x: Array, inputs: Any, trajectory: bool) -> Array:
    """Applies ``x = body(x, inputs[i])`` for each step ``i`` (a ``lax.scan``); returns the last ``x``, or
    with ``trajectory`` the ``x`` after every step stacked on a new leading axis (the last is the sample)."""

    if not trajectory:
        return jax.lax.scan(lambda x, step_inputs: (body(x, step_inputs), None), x, inputs)[0]

    def step(x: Array, step_inputs: Any) -> tuple[Array, Array]:
        x = body(x, step_inputs)
        return x, x

    return jax.lax.scan(step, x, inputs)[1]


def ddim_steps(total_steps: int, num_steps: int) -> np.ndarray:
    """The ``num_steps`` evenly spaced steps in ``[0, T - 1]`` that DDIM visits (ascending, first 0, last T - 1).

    Examples:
        >>> ddim_steps(1000, 5).tolist()
        [0, 250, 500, 749, 999]
    """
    if not 1 <= num_steps <= total_steps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {total_steps}] (the schedule's number of steps)")
    if num_steps == 1:
        return np.array([total_steps - 1])
    return np.round(np.linspace(0, total_steps - 1, num_steps)).astype(np.int32)


def _ddim_scan(
    denoiser: Denoiser,
    x: Array,
    times: Array,
    levels: Array,
    next_levels: Array,
    key: PRNGKeyArray,
    eta: float,
    prediction: str,
    clip_x0: float | None,
    trajectory: bool,
) -> Array:
    """Runs the generalized DDIM update from level ``levels[j]`` (model time ``times[j]``) to ``next_levels[j]``:
    ``x' = sqrt(a') x_0 + sqrt(1 - a' - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')`` (Song et al. 2021, eqs. 12 and 16)."""

    def body(x: Array, inputs: tuple[Array, Array, Array, Array]) -> Array:
        time, level, next_level, step_key = inputs
        x0, eps = _predict(denoiser, x, time, level, prediction, clip_x0)
        sigma = eta * jnp.sqrt((1 - next_level) / (1 - level) * jnp.maximum(1 - level / next_level, 0.0))
        direction = jnp.sqrt(jnp.maximum(1 - next_level - sigma**2, 0.0))
        z = jax.random.normal(step_key, x.shape, x.dtype)
        dtype = x.dtype
        return jnp.sqrt(next_level).astype(dtype) * x0 + direction.astype(dtype) * eps + sigma.astype(dtype) * z

    keys = jax.random.split(key, times.shape[0])
    return scan_steps(body, x, (times, levels, next_levels, keys), trajectory)


def ddim_sample(
    denoiser: Denoiser,
    schedule: GaussianSchedule,
    noise: Float[Array, " b *dims"],
    key: PRNGKeyArray,
    num_steps: int = 50,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    clip_x0: float | None = None,
    trajectory: bool = False,
) -> Float[Array, "..."]:
    """DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") over a subsequence of steps.

    ``eta = 0`` is deterministic (the noise ``x_T`` alone fixes the sample); ``eta = 1`` with
    ``num_steps = T`` is DDPM's ancestral sampler. The last update goes to ``alpha_bar = 1``, i.e. to the
    predicted ``x_0``.

    Args:
        denoiser: The batched network (time ``(i + 1) / T`` for step ``i``).
        schedule: The noise schedule it was trained with.
        noise: ``x_T``, standard Gaussian noise of the output's shape.
        key: The noise of the steps (unused when ``eta = 0``).
        num_steps: How many of the schedule's steps to visit, evenly spaced (see :func:`ddim_steps`).
        eta: The stochasticity, from 0 (deterministic) to 1 (DDPM's posterior variance).
        prediction: What the network outputs: "eps", "x0" or "v".
        clip_x0: Clip the predicted ``x_0`` to ``[-clip_x0, clip_x0]``; None does not clip.
        trajectory: Return every step's ``x`` (see :func:`scan_steps`) instead of the last.

    Returns:
        The samples ``x_0`` (b, *dims), or with ``trajectory`` the states after each step (num_steps, b, *dims).
    """
    check_prediction(prediction)
    steps = jnp.asarray(ddim_steps(schedule.num_steps, num_steps)[::-1])  # descending
    levels = schedule.alpha_bar[steps]
    next_levels = jnp.concatenate([levels[1:], jnp.ones((1,), levels.dtype)])
    times = schedule.model_time(steps)
    return _ddim_scan(denoiser, noise, times, levels, next_levels, key, eta, prediction, clip_x0, trajectory)


def ddim_invert(
    denoiser: Denoiser,
    schedule: GaussianSchedule,
    x: Float[Array, " b *dims"],
    num_steps: int = 50,
    prediction: Prediction = "eps",
) -> Float[Array, " b *dims"]:
    """Runs deterministic DDIM backwards, from data to the noise that :func:`ddim_sample` (``eta = 0``, same
    ``num_steps``) maps back to it; each step uses the network at the current point (Song et al. 2021,
    section 4.3; Dhariwal & Nichol 2021, appendix F).

    ``x`` is taken to sit at the least noisy visited step (step 0, within ``sqrt(1 - alpha_bar_0)`` of clean
    data), so the first update needs no network output at ``alpha_bar = 1``.

    Returns:
        ``x_T``, the latent noise.
    """
    check_prediction(prediction)
    steps = jnp.asarray(ddim_steps(schedule.num_steps, num_steps))  # ascending
    levels = schedule.alpha_bar[steps]
    key = jax.random.key(0)  # unused: eta = 0 draws no noise
    times = schedule.model_time(steps[:-1])
    return _ddim_scan(denoiser, x, times, levels[:-1], levels[1:], key, 0.0, prediction, None, trajectory=False)


@runtime_checkable
class HasEMA(Protocol):
    """A train-state-like object: the arrays to train, the other arrays, and an optional EMA of the first."""

    @property
    def params(self) -> PyTree: ...

    @property
    def frozen(self) -> PyTree: ...

    @property
    def ema(self) -> PyTree | None: ...


def sampling_params(state: HasEMA) -> PyTree:
    """The weights to sample with: the EMA (Ho et al. 2020, appendix B) when the state keeps one."""
    return state.params if state.ema is None else state.ema


def sampling_model(state: HasEMA, static: Any) -> Any:
    """Rebuilds the model from a train state and the model's static part, with the EMA weights when kept."""
    return eqx.combine(sampling_params(state), state.frozen, static)
