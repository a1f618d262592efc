"""Flow matching with the rectified-flow path (Lipman et al. 2022, "Flow Matching for Generative Modeling";
Liu et al. 2022, "Flow Straight and Fast").

The path is ``x_t = (1 - t) x_0 + t eps`` for ``t in [0, 1]`` (data at 0, noise at 1), whose velocity
``dx_t / dt = eps - x_0`` is the network's regression target. Sampling integrates ``dx/dt = v(x, t)`` from
``t = 1`` (noise) down to ``t = 0`` with Euler or Heun steps.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from xax.arch.diffusion.gaussian import Denoiser
from xax.arch.diffusion.samplers import scan_steps


def _bcast(t: Float[Array, " b"], x: Array) -> Array:
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def flow_interpolate(x0: Float[Array, " b *dims"], eps: Float[Array, " b *dims"], t: Float[Array, " b"]) -> Array:
    """The point ``x_t = (1 - t) x_0 + t eps`` of the straight path.

    Examples:
        >>> import jax.numpy as jnp
        >>> x0, eps = jnp.zeros((2, 3)), jnp.ones((2, 3))
        >>> flow_interpolate(x0, eps, jnp.array([0.25, 1.0])).tolist()  # one time per sample
        [[0.25, 0.25, 0.25], [1.0, 1.0, 1.0]]
    """
    return (1 - _bcast(t, x0)) * x0 + _bcast(t, x0) * eps


def flow_velocity(x0: Float[Array, " b *dims"], eps: Float[Array, " b *dims"]) -> Array:
    """The path's velocity ``v = eps - x_0``, the regression target."""
    return eps - x0


def x0_from_velocity(x_t: Float[Array, " b *dims"], v: Float[Array, " b *dims"], t: Float[Array, " b"]) -> Array:
    """``x_0 = x_t - t v``.

    Examples:
        >>> import jax.numpy as jnp
        >>> x0, eps, t = jnp.array([[2.0]]), jnp.array([[-1.0]]), jnp.array([0.5])
        >>> x0_from_velocity(flow_interpolate(x0, eps, t), flow_velocity(x0, eps), t).tolist()
        [[2.0]]
    """
    return x_t - _bcast(t, x_t) * v


def eps_from_velocity(x_t: Float[Array, " b *dims"], v: Float[Array, " b *dims"], t: Float[Array, " b"]) -> Array:
    """``eps = x_t + (1 - t) v``."""
    return x_t + (1 - _bcast(t, x_t)) * v


def uniform_times(key: PRNGKeyArray, batch: int) -> Float[Array, " b"]:
    """``t ~ U(0, 1)`` (Liu et al. 2022)."""
    return jax.random.uniform(key, (batch,))


def logit_normal_times(key: PRNGKeyArray, batch: int) -> Float[Array, " b"]:
    """``t = sigmoid(n)``, ``n ~ N(0, 1)``: more weight on the middle of the path (Esser et al. 2024, section 3.1)."""
    return jax.nn.sigmoid(jax.random.normal(key, (batch,)))


TIME_SAMPLERS: dict[str, Callable[[PRNGKeyArray, int], Array]] = {
    "uniform": uniform_times,
    "logit_normal": logit_normal_times,
}


def flow_matching_loss(
    velocity: Denoiser, x0: Float[Array, " b *dims"], key: PRNGKeyArray, time_sampler: str = "uniform"
) -> Float[Array, ""]:
    """The conditional flow matching loss ``E_{t, eps} ||v(x_t, t) - (eps - x_0)||^2`` (Lipman et al. 2022, eq. 23).

    Args:
        velocity: The batched network, seeing ``x_t`` and ``t`` in [0, 1].
        x0: A batch of clean data.
        key: Draws the times and the noise.
        time_sampler: How ``t`` is drawn: "uniform" or "logit_normal".

    Returns:
        The mean squared error, a float32 scalar.
    """
    if time_sampler not in TIME_SAMPLERS:
        raise ValueError(f"time_sampler={time_sampler!r} is unknown; use one of {sorted(TIME_SAMPLERS)}")
    time_key, noise_key = jax.random.split(key)
    t = TIME_SAMPLERS[time_sampler](time_key, x0.shape[0])
    eps = jax.random.normal(noise_key, x0.shape, x0.dtype)
    error = velocity(flow_interpolate(x0, eps, t), t) - flow_velocity(x0, eps)
    return jnp.mean(error.astype(jnp.float32) ** 2)


def _time_grid(num_steps: int, t_start: float, t_end: float) -> Array:
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1")
    return jnp.linspace(t_start, t_end, num_steps + 1, dtype=jnp.float32)


def _call(velocity: Denoiser, x: Array, t: Array) -> Array:
    return velocity(x, jnp.full((x.shape[0],), t))


def euler_sample(
    velocity: Denoiser,
    noise: Float[Array, " b *dims"],
    num_steps: int = 50,
    t_start: float = 1.0,
    t_end: float = 0.0,
    trajectory: bool = False,
) -> Float[Array, "..."]:
    """Integrates ``dx/dt = v(x, t)`` with Euler steps ``x' = x + (t' - t) v(x, t)`` on a uniform grid.

    Args:
        velocity: The batched network.
        noise: The starting point at ``t_start`` (standard Gaussian noise for sampling).
        num_steps: The number of steps (network evaluations).
        t_start: Where to start: 1 is pure noise.
        t_end: Where to stop: 0 is data.
        trajectory: Return every step's ``x`` (see :func:`scan_steps`) instead of the last.

    Returns:
        ``x`` at ``t_end`` (b, *dims), or with ``trajectory`` the states after each step (num_steps, b, *dims).
    """
    grid = _time_grid(num_steps, t_start, t_end)

    def body(x: Array, times: tuple[Array, Array]) -> Array:
        t, t_next = times
        return x + (t_next - t).astype(x.dtype) * _call(velocity, x, t)

    return scan_steps(body, noise, (grid[:-1], grid[1:]), trajectory)


def heun_sample(
    velocity: Denoiser,
    noise: Float[Array, " b *dims"],
    num_steps: int = 25,
    t_start: float = 1.0,
    t_end: float = 0.0,
    trajectory: bool = False,
) -> Float[Array, "..."]:
    """Integrates ``dx/dt = v(x, t)`` with Heun's second-order method (Karras et al. 2022, Algorithm 1).

    ``x~ = x + h v(x, t)``, then ``x' = x + h / 2 (v(x, t) + v(x~, t'))`` with ``h = t' - t``: two network
    evaluations per step and a global error of order ``h^2``.

    Args:
        velocity: The batched network.
        noise: The starting point at ``t_start``.
        num_steps: The number of steps (twice as many network evaluations).
        t_start: Where to start: 1 is pure noise.
        t_end: Where to stop: 0 is data.
        trajectory: Return every step's ``x`` (see :func:`scan_steps`) instead of the last.

    Returns:
        ``x`` at ``t_end`` (b, *dims), or with ``trajectory`` the states after each step (num_steps, b, *dims).
    """
    grid = _time_grid(num_steps, t_start, t_end)

    def body(x: Array, times: tuple[Array, Array]) -> Array:
        t, t_next = times
        h = (t_next - t).astype(x.dtype)
        slope = _call(velocity, x, t)
        predicted = x + h * slope
        return x + 0.5 * h * (slope + _call(velocity, predicted, t_next))

    return scan_steps(body, noise, (grid[:-1], grid[1:]), trajectory)
