"""Flow matching against closed forms: the path and its conversions, Euler and Heun on linear ODEs with
known solutions (and their orders of convergence), and sampling Gaussian data with the exact velocity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array

from xax.arch.diffusion import flow

MU, S = -0.3, 0.6


def test_path_and_conversions_are_exact() -> None:
    rng = np.random.default_rng(0)
    x0, eps, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.uniform(size=5)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    jx0, jeps, jt = (jnp.asarray(a, jnp.float32) for a in (x0, eps, t))
    np.testing.assert_allclose(flow.flow_interpolate(jx0, jeps, jt), x_t, atol=1e-6)
    v = flow.flow_velocity(jx0, jeps)
    np.testing.assert_allclose(v, eps - x0, atol=1e-6)
    jxt = jnp.asarray(x_t, jnp.float32)
    np.testing.assert_allclose(flow.x0_from_velocity(jxt, v, jt), x0, atol=1e-5)
    np.testing.assert_allclose(flow.eps_from_velocity(jxt, v, jt), eps, atol=1e-5)


def linear_field(rate: float) -> flow.Denoiser:
    return lambda x, t: rate * x


def test_euler_matches_its_closed_form_and_is_first_order() -> None:
    # dx/dt = r x from t = 1 to 0 (h = -1/n): Euler gives x (1 + h r)^n; the solution is x exp(-r).
    rate, x = 0.8, jnp.array([[1.0, -2.0]])
    for n in (1, 7):
        np.testing.assert_allclose(flow.euler_sample(linear_field(rate), x, n), x * (1 - rate / n) ** n, rtol=1e-5)
    exact = x * np.exp(-rate)
    errors = [float(jnp.abs(flow.euler_sample(linear_field(rate), x, n) - exact).max()) for n in (20, 40)]
    assert 1.8 < errors[0] / errors[1] < 2.2


def test_heun_matches_its_closed_form_and_is_second_order() -> None:
    # Heun on dx/dt = r x multiplies by 1 + h r + (h r)^2 / 2 per step.
    rate, x = 0.8, jnp.array([[1.0, -2.0]])
    h = -1 / 5
    np.testing.assert_allclose(
        flow.heun_sample(linear_field(rate), x, 5), x * (1 + h * rate + (h * rate) ** 2 / 2) ** 5, rtol=1e-5
    )
    exact = x * np.exp(-rate)
    errors = [float(jnp.abs(flow.heun_sample(linear_field(rate), x, n) - exact).max()) for n in (8, 16)]
    assert 3.6 < errors[0] / errors[1] < 4.4


def test_heun_is_second_order_on_a_time_dependent_field() -> None:
    # dx/dt = -2 t x from t = 1 to 0: x(0) = x(1) e.
    field: flow.Denoiser = lambda x, t: -2.0 * t[:, None] * x  # noqa: E731
    x = jnp.array([[0.5]])
    exact = x * np.e
    errors = [float(jnp.abs(flow.heun_sample(field, x, n) - exact).max()) for n in (8, 16)]
    assert 3.6 < errors[0] / errors[1] < 4.4


def gaussian_velocity(x: Array, t: Array) -> Array:
    """E[eps - x0 | x_t] for x0 ~ N(mu, s^2) and x_t = (1 - t) x0 + t eps."""
    t = t[:, None]
    var = (1 - t) ** 2 * S**2 + t**2
    centered = x - (1 - t) * MU
    return t / var * centered - (MU + (1 - t) * S**2 / var * centered)


def test_heun_transports_noise_to_gaussian_data() -> None:
    # The flow of Gaussian data is linear: noise z ends at mu + s z.
    noise = jax.random.normal(jax.random.key(0), (512, 2))
    sample = jax.jit(lambda n: flow.heun_sample(gaussian_velocity, n, 50))(noise)
    np.testing.assert_allclose(sample, MU + S * noise, atol=1e-3)
    # Euler's global error is first order: about 0.005 |z| at 200 steps.
    euler = flow.euler_sample(gaussian_velocity, noise, 200)
    np.testing.assert_allclose(euler, MU + S * noise, atol=1e-2 * float(jnp.abs(noise).max()))


@pytest.mark.parametrize("time_sampler", ["uniform", "logit_normal"])
def test_loss_of_the_exact_velocity_of_a_point_mass_vanishes(time_sampler: str) -> None:
    point = jnp.full((32, 8), 0.5)
    # For x0 = c: eps = (x_t - (1 - t) c) / t, so v = eps - c = (x_t - c) / t.
    oracle: flow.Denoiser = lambda x, t: (x - point) / t[:, None]  # noqa: E731
    assert float(flow.flow_matching_loss(oracle, point, jax.random.key(1), time_sampler)) < 1e-6
    zero = flow.flow_matching_loss(lambda x, t: jnp.zeros_like(x), point, jax.random.key(1), time_sampler)
    assert abs(float(zero) - 1.25) < 0.08  # E[(eps - 0.5)^2] = 1.25 over 256 draws


def test_unknown_time_sampler_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"time_sampler='beta' is unknown; use one of \['logit_normal', 'uniform'\]"):
        flow.flow_matching_loss(lambda x, t: x, jnp.zeros((2, 2)), jax.random.key(0), "beta")


def test_trajectories_hold_every_step_of_the_closed_form() -> None:
    # Euler multiplies x by g = 1 + h r per step, Heun by 1 + h r + (h r)^2 / 2: after step k, x g^(k + 1).
    rate, x, n = 0.8, jnp.array([[1.0, -2.0]]), 6
    h = -1 / n
    for sample, growth in ((flow.euler_sample, 1 + h * rate), (flow.heun_sample, 1 + h * rate + (h * rate) ** 2 / 2)):
        states = sample(linear_field(rate), x, n, trajectory=True)
        assert states.shape == (n, 1, 2)
        expected = np.stack([np.asarray(x) * growth ** (k + 1) for k in range(n)])
        np.testing.assert_allclose(states, expected, rtol=1e-5)
        np.testing.assert_array_equal(states[-1], sample(linear_field(rate), x, n))
