"""Each schedule against its closed form, written out here in float64, at every step of a run and past it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.optim import make_schedule

LR, MIN_LR, WARMUP, TOTAL = 3e-3, 3e-4, 40, 400


def closed_form(name: str, t: int) -> float:
    if t < WARMUP:
        return LR * t / WARMUP
    if name == "constant":
        return LR
    if name == "cosine":
        progress = min(t - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
        return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        progress = min(t - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
        return LR + (MIN_LR - LR) * progress
    if name == "wsd":
        decay = 0.25 * TOTAL
        progress = min(max(t - (TOTAL - decay), 0) / decay, 1.0)
        return LR + (MIN_LR - LR) * progress
    assert name == "inverse_sqrt"
    return LR * math.sqrt(WARMUP / t)


@pytest.mark.parametrize("name", ["constant", "cosine", "linear", "wsd", "inverse_sqrt"])
def test_schedule_matches_its_closed_form(name: str) -> None:
    schedule = make_schedule(name, LR, warmup_steps=WARMUP, total_steps=TOTAL, min_lr=MIN_LR, decay_fraction=0.25)
    steps = np.arange(0, TOTAL + 50)
    with jax.numpy_dtype_promotion("standard"):  # as in the training step: optax relies on it
        got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)), np.float64)
    want = np.array([closed_form(name, int(t)) for t in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
    assert got[0] == 0.0 and got[WARMUP] == pytest.approx(LR)


def test_without_warmup_each_schedule_starts_at_the_peak() -> None:
    for name in ("constant", "cosine", "linear", "wsd"):
        assert float(np.asarray(make_schedule(name, LR, total_steps=TOTAL, min_lr=MIN_LR)(0))) == pytest.approx(LR)
    # inverse_sqrt without warmup: lr / sqrt(t), lr at steps 0 and 1.
    schedule = make_schedule("inverse_sqrt", LR)
    assert [float(np.asarray(schedule(t))) for t in (0, 1, 4, 100)] == pytest.approx([LR, LR, LR / 2, LR / 10])


def test_a_decaying_schedule_needs_its_length() -> None:
    with pytest.raises(ValueError, match="cosine schedule needs total_steps"):
        make_schedule("cosine", LR)
