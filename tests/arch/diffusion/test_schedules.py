"""Every schedule against its closed form, in discrete steps and in continuous time."""

import jax.numpy as jnp
import numpy as np
import pytest

from xax.arch.diffusion.schedules import GaussianSchedule, continuous_alpha_bar


def cosine_reference(t: np.ndarray) -> np.ndarray:
    # Nichol & Dhariwal (2021), eq. 17, with s = 0.008.
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0.0)


def sigmoid_reference(t: np.ndarray) -> np.ndarray:
    # Chen (2023), Algorithm 1, with start=-3, end=3, tau=1.
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return (sig(3.0) - sig(6.0 * t - 3.0)) / (sig(3.0) - sig(-3.0))


def linear_reference(t: np.ndarray) -> np.ndarray:
    # Song et al. (2021), VP-SDE with beta_min = 0.1 and beta_max = 20.
    return np.exp(-(0.1 * t + 0.5 * (20.0 - 0.1) * t**2))


REFERENCES = {"cosine": cosine_reference, "sigmoid": sigmoid_reference, "linear": linear_reference}


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_continuous_matches_closed_form(name: str) -> None:
    t = np.linspace(0.0, 1.0, 101)
    got = np.asarray(continuous_alpha_bar(name)(jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(got, REFERENCES[name](t), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["cosine", "sigmoid"])
def test_discrete_alpha_bar_is_continuous_at_step_ends(name: str) -> None:
    # The betas telescope: alpha_bar_i = alpha_bar((i + 1) / T) wherever no beta was clipped to 0.999.
    schedule = GaussianSchedule.from_name(name, 1000)
    t = np.arange(1, 1001) / 1000
    reference = REFERENCES[name](t) / REFERENCES[name](np.zeros(()))
    unclipped = np.asarray(schedule.betas) < 0.999
    keep = np.cumprod(unclipped).astype(bool) & (reference > 1e-4)
    assert keep.sum() > 950
    np.testing.assert_allclose(np.asarray(schedule.alpha_bar)[keep], reference[keep], rtol=1e-5)


def test_cosine_betas_clipped_at_the_noisy_end() -> None:
    betas = np.asarray(GaussianSchedule.from_name("cosine", 1000).betas)
    assert betas.max() == pytest.approx(0.999)
    assert betas[-1] == pytest.approx(0.999)


@pytest.mark.parametrize("num_steps", [1000, 250])
def test_linear_betas(num_steps: int) -> None:
    # Ho et al. (2020): 1e-4 to 0.02 over 1000 steps; Nichol & Dhariwal (2021) scale both ends by 1000 / T.
    schedule = GaussianSchedule.from_name("linear", num_steps)
    scale = 1000 / num_steps
    betas = np.linspace(1e-4 * scale, 0.02 * scale, num_steps)
    np.testing.assert_allclose(np.asarray(schedule.betas), betas, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(schedule.alpha_bar), np.cumprod(1 - betas), rtol=1e-5, atol=1e-9)


def test_discrete_linear_converges_to_continuous() -> None:
    # The discrete linear schedule is a first-order discretization of the VP-SDE: halving the step size
    # halves the gap in log alpha_bar.
    def gap(num_steps: int) -> float:
        schedule = GaussianSchedule.from_name("linear", num_steps)
        t = np.arange(1, num_steps + 1) / num_steps
        return float(np.max(np.abs(np.log(np.asarray(schedule.alpha_bar, np.float64)) - np.log(linear_reference(t)))))

    coarse, fine = gap(500), gap(1000)
    assert fine < 0.1
    assert 1.7 < coarse / fine < 2.3


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_alpha_bar_decreases_from_one_to_near_zero(name: str) -> None:
    alpha_bar = np.asarray(GaussianSchedule.from_name(name, 1000).alpha_bar)
    assert np.all(np.diff(alpha_bar) < 0)
    assert alpha_bar[0] > 0.999
    assert alpha_bar[-1] < 1e-3


def test_snr_and_model_time() -> None:
    schedule = GaussianSchedule.from_name("cosine", 100)
    steps = jnp.array([0, 49, 99])
    alpha_bar = np.asarray(schedule.alpha_bar)[[0, 49, 99]]
    np.testing.assert_allclose(np.asarray(schedule.snr(steps)), alpha_bar / (1 - alpha_bar), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(schedule.model_time(steps)), [0.01, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(schedule.alpha_bar_prev(steps)),
        [1.0, float(schedule.alpha_bar[48]), float(schedule.alpha_bar[98])],
        rtol=1e-6,
    )


def test_unknown_schedule_names_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"schedule='quadratic' is unknown; use one of \['cosine', 'linear', 'sigmoid'\]"
    ):
        GaussianSchedule.from_name("quadratic")
    with pytest.raises(ValueError, match="schedule='quadratic'"):
        continuous_alpha_bar("quadratic")
