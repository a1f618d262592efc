"""Gaussian diffusion against closed forms: parameterization conversions, the DDPM posterior, the loss,
and the DDPM/DDIM samplers on Gaussian data, whose optimal denoiser and probability-flow map are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array

from xax.arch.diffusion import gaussian as g
from xax.arch.diffusion.samplers import ddim_invert, ddim_sample, ddim_steps, ddpm_sample
from xax.arch.diffusion.schedules import GaussianSchedule

SCHEDULE = GaussianSchedule.from_name("cosine", 1000)
# Data x_0 ~ N(MU, S^2) in every coordinate.
MU, S = 0.7, 0.5


def level_of_time(schedule: GaussianSchedule, t: Array) -> Array:
    """alpha_bar of the step that the sampler shows to the network as time (i + 1) / T."""
    step = jnp.round(t * schedule.num_steps).astype(jnp.int32) - 1
    return schedule.alpha_bar[step]


def gaussian_oracle(schedule: GaussianSchedule, prediction: str = "eps") -> g.Denoiser:
    """The exact E[eps | x_t] for Gaussian data, x_t = a x_0 + b eps: b (x_t - a mu) / (a^2 s^2 + b^2)."""

    def denoiser(x: Array, t: Array) -> Array:
        alpha_bar = level_of_time(schedule, t)[:, None]
        a, b = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
        eps = b * (x - a * MU) / (alpha_bar * S**2 + b**2)
        x0 = (x - b * eps) / a
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]

    return denoiser


def random_triple(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(6, 3, 4))
    eps = rng.normal(size=(6, 3, 4))
    alpha_bar = rng.uniform(0.05, 0.95, size=6)
    return x0, eps, alpha_bar


def f32(*arrays: np.ndarray) -> tuple[Array, ...]:
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def test_conversions_are_exact() -> None:
    x0, eps, ab = random_triple()
    a, b = np.sqrt(ab)[:, None, None], np.sqrt(1 - ab)[:, None, None]
    x_t, v = a * x0 + b * eps, a * eps - b * x0  # definitions (Ho et al. 2020; Salimans & Ho 2022)
    jx0, jeps, jab, jxt, jv = f32(x0, eps, ab, x_t, v)
    np.testing.assert_allclose(g.q_sample(jx0, jeps, jab), x_t, atol=1e-6)
    np.testing.assert_allclose(g.v_from_eps_x0(jeps, jx0, jab), v, atol=1e-6)
    np.testing.assert_allclose(g.x0_from_eps(jxt, jeps, jab), x0, atol=1e-5)
    np.testing.assert_allclose(g.eps_from_x0(jxt, jx0, jab), eps, atol=1e-5)
    np.testing.assert_allclose(g.x0_from_v(jxt, jv, jab), x0, atol=1e-5)
    np.testing.assert_allclose(g.eps_from_v(jxt, jv, jab), eps, atol=1e-5)
    for prediction in ("eps", "x0", "v"):
        got_x0, got_eps = g.to_x0_eps(g.target(jx0, jeps, jab, prediction), jxt, jab, prediction)
        np.testing.assert_allclose(got_x0, x0, atol=1e-5)
        np.testing.assert_allclose(got_eps, eps, atol=1e-5)


def test_posterior_matches_ho_formula_and_bayes() -> None:
    rng = np.random.default_rng(1)
    x0, x_t = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    step = np.array([0, 1, 10, 500, 999])
    mean, var = g.posterior_mean_variance(SCHEDULE, *f32(x0, x_t), jnp.asarray(step))
    beta = np.asarray(SCHEDULE.betas, np.float64)[step]
    ab = np.asarray(SCHEDULE.alpha_bar, np.float64)
    ab_t, ab_prev = ab[step], np.where(step > 0, ab[np.maximum(step - 1, 0)], 1.0)
    # Ho et al. (2020), eq. 7.
    ho_mean = (np.sqrt(ab_prev) * beta / (1 - ab_t))[:, None] * x0 + (np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t))[
        :, None
    ] * x_t
    np.testing.assert_allclose(mean, ho_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, (1 - ab_prev) / (1 - ab_t) * beta, rtol=1e-4)
    # Bayes: q(x_{t-1} | x0) = N(sqrt(ab_prev) x0, 1 - ab_prev) times
    # q(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta).
    inner = step > 0
    precision = 1 / (1 - ab_prev[inner]) + (1 - beta[inner]) / beta[inner]
    bayes_mean = (
        (np.sqrt(ab_prev[inner]) / (1 - ab_prev[inner]))[:, None] * x0[inner]
        + (np.sqrt(1 - beta[inner]) / beta[inner])[:, None] * x_t[inner]
    ) / precision[:, None]
    np.testing.assert_allclose(np.asarray(mean)[inner], bayes_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var)[inner], 1 / precision, rtol=1e-4)
    assert float(var[0]) == 0.0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weight_is_min_snr_gamma_on_x0_error(prediction: str) -> None:
    # Whatever the parameterization, the weighted target error equals min(snr, gamma) ||x0_hat - x0||^2.
    x0, eps, ab = random_triple(2)
    x0, eps, ab = f32(x0, eps, ab)
    x_t = g.q_sample(x0, eps, ab)
    output = g.target(x0, eps, ab, prediction) + 0.3 * jax.random.normal(jax.random.key(0), x0.shape)
    x0_hat, _ = g.to_x0_eps(output, x_t, ab, prediction)
    snr = ab / (1 - ab)
    gamma = 5.0
    target_err = ((output - g.target(x0, eps, ab, prediction)) ** 2).reshape(6, -1).mean(axis=1)
    x0_err = ((x0_hat - x0) ** 2).reshape(6, -1).mean(axis=1)
    weighted = g.snr_weight(snr, gamma, prediction) * target_err
    np.testing.assert_allclose(weighted, jnp.minimum(snr, gamma) * x0_err, rtol=1e-4)
    np.testing.assert_array_equal(g.snr_weight(snr, None, prediction), np.ones(6))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_vanishes_for_the_exact_denoiser_of_a_point_mass(prediction: g.Prediction) -> None:
    point = jnp.full((16, 8), 0.4)
    schedule = GaussianSchedule.from_name("linear", 1000)

    def oracle(x: Array, t: Array) -> Array:
        ab = level_of_time(schedule, t)[:, None]
        a, b = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        eps = (x - a * point) / b
        return {"eps": eps, "x0": point, "v": a * eps - b * point}[prediction]

    loss = jax.jit(lambda key: g.diffusion_loss(oracle, schedule, point, key, prediction, snr_gamma=5.0))(
        jax.random.key(3)
    )
    assert loss.dtype == jnp.float32
    assert float(loss) < 1e-8


def test_loss_of_a_zero_eps_network_is_the_noise_variance() -> None:
    x0 = jnp.zeros((64, 64))
    loss = g.diffusion_loss(lambda x, t: jnp.zeros_like(x), SCHEDULE, x0, jax.random.key(4), "eps")
    assert abs(float(loss) - 1.0) < 0.05  # E[eps^2] = 1 over 4096 draws (standard error 0.022)


def test_unknown_prediction_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"prediction='score' is unknown; use one of \['eps', 'x0', 'v'\]"):
        g.check_prediction("score")


def _noise(batch: int = 2048, dim: int = 2) -> Array:
    return jax.random.normal(jax.random.key(10), (batch, dim))


def test_ddpm_samples_gaussian_data() -> None:
    samples = jax.jit(lambda n, k: ddpm_sample(gaussian_oracle(SCHEDULE), SCHEDULE, n, k))(_noise(), jax.random.key(1))
    # 4096 draws of N(0.7, 0.25): standard errors 0.008 (mean) and 0.006 (std).
    assert abs(float(samples.mean()) - MU) < 0.04
    assert abs(float(samples.std()) - S) < 0.03


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_follows_the_probability_flow_map(prediction: g.Prediction) -> None:
    # For Gaussian data the probability-flow ODE is linear and maps x_T to mu + s x_T exactly; DDIM is a
    # first-order solver of it, 0.012 off at 200 steps.
    noise = _noise(256)
    sample = ddim_sample(
        gaussian_oracle(SCHEDULE, prediction), SCHEDULE, noise, jax.random.key(0), 200, 0.0, prediction
    )
    np.testing.assert_allclose(sample, MU + S * noise, atol=2e-2)


def test_ddim_is_first_order() -> None:
    noise = _noise(256)

    def error(num_steps: int) -> float:
        sample = ddim_sample(gaussian_oracle(SCHEDULE), SCHEDULE, noise, jax.random.key(0), num_steps)
        return float(jnp.abs(sample - (MU + S * noise)).max())

    assert 0.4 < error(200) / error(100) < 0.6


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not() -> None:
    noise, oracle = _noise(64), gaussian_oracle(SCHEDULE)
    a = ddim_sample(oracle, SCHEDULE, noise, jax.random.key(0), 20, eta=0.0)
    b = ddim_sample(oracle, SCHEDULE, noise, jax.random.key(1), 20, eta=0.0)
    np.testing.assert_array_equal(a, b)
    c = ddim_sample(oracle, SCHEDULE, noise, jax.random.key(0), 20, eta=1.0)
    d = ddim_sample(oracle, SCHEDULE, noise, jax.random.key(1), 20, eta=1.0)
    assert float(jnp.abs(c - d).max()) > 0.1


def test_ddim_with_eta_one_over_all_steps_is_ddpm() -> None:
    schedule = GaussianSchedule.from_name("linear", 100)
    noise, oracle = _noise(64), gaussian_oracle(schedule)
    ddpm = ddpm_sample(oracle, schedule, noise, jax.random.key(5), clip_x0=1.0)
    ddim = ddim_sample(oracle, schedule, noise, jax.random.key(5), num_steps=100, eta=1.0, clip_x0=1.0)
    np.testing.assert_allclose(ddim, ddpm, atol=1e-4)


def test_trajectories_end_at_the_sample() -> None:
    schedule = GaussianSchedule.from_name("linear", 50)
    noise, oracle, key = _noise(16), gaussian_oracle(schedule), jax.random.key(3)
    for eta in (0.0, 1.0):  # stochastic too: the same key draws the same noise with or without the trajectory
        states = ddim_sample(oracle, schedule, noise, key, 10, eta=eta, trajectory=True)
        assert states.shape == (10, *noise.shape)
        np.testing.assert_array_equal(states[-1], ddim_sample(oracle, schedule, noise, key, 10, eta=eta))
    states = ddpm_sample(oracle, schedule, noise, key, clip_x0=1.0, trajectory=True)
    assert states.shape == (50, *noise.shape)
    np.testing.assert_array_equal(states[-1], ddpm_sample(oracle, schedule, noise, key, clip_x0=1.0))


def test_clipped_ddpm_stays_in_range() -> None:
    samples = ddpm_sample(gaussian_oracle(SCHEDULE), SCHEDULE, _noise(256), jax.random.key(2), clip_x0=1.0)
    assert float(jnp.abs(samples).max()) <= 1.0
    assert float(jnp.abs(samples).max()) > 0.99  # N(0.7, 0.25) puts about 27% of its mass above 1


def test_ddim_inversion_round_trips() -> None:
    x = MU + S * _noise(256)
    oracle = gaussian_oracle(SCHEDULE)
    latent = ddim_invert(oracle, SCHEDULE, x, num_steps=200)
    # The exact flow maps x back to (x - mu) / s; inverting with the network at the current point is first order.
    np.testing.assert_allclose(latent, (x - MU) / S, atol=3e-2)
    back = ddim_sample(oracle, SCHEDULE, latent, jax.random.key(0), num_steps=200)
    np.testing.assert_allclose(back, x, atol=3e-2)


def test_ddim_steps_are_evenly_spaced_and_distinct() -> None:
    np.testing.assert_array_equal(ddim_steps(1000, 5), [0, 250, 500, 749, 999])
    np.testing.assert_array_equal(ddim_steps(10, 10), np.arange(10))
    with pytest.raises(ValueError, match=r"num_steps=0 must lie in \[1, 10\]"):
        ddim_steps(10, 0)
