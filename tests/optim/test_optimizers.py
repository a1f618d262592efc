"""Each optimizer built from options takes the same steps as optax's own, configured by hand."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.contrib
import pytest

from xax.optim import OptimOptions, decay_mask, make_optimizer
from xax.task.mixins.train_step import find_learning_rate

TOTAL, WARMUP, LR, MIN_LR, DECAY = 20, 5, 0.05, 0.005, 0.1


def params() -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "layer": {"weight": jax.random.normal(keys[0], (6, 4)), "bias": jax.random.normal(keys[1], (4,))},
        "scale": jax.random.normal(keys[2], ()),
    }


def loss(p: dict) -> jax.Array:
    x = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
    out = (x @ p["layer"]["weight"] + p["layer"]["bias"][None, :]) * p["scale"]
    return jnp.mean((out - 0.5) ** 2) + 0.1 * jnp.sum(p["layer"]["weight"] ** 2)


def train(optimizer: optax.GradientTransformation, steps: int = 8) -> dict:
    def step(p: Any, state: optax.OptState) -> tuple[Any, optax.OptState]:
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optimizer.update(jax.grad(loss)(p), state, p)
            return optax.apply_updates(p, updates), state

    p, jitted = params(), jax.jit(step)
    with jax.numpy_dtype_promotion("standard"):
        state = optimizer.init(p)
    for _ in range(steps):
        p, state = jitted(p, state)
    return p


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, LR, WARMUP, TOTAL, end_value=MIN_LR)
# Decay the weight matrix only (the options say it by the regex; optax by an explicit mask).
MASK = {"layer": {"weight": True, "bias": False}, "scale": False}

REFERENCES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(SCHEDULE, b1=0.8, b2=0.95, weight_decay=DECAY, mask=MASK),
    "lion": lambda: optax.lion(SCHEDULE, b1=0.8, b2=0.95, weight_decay=DECAY, mask=MASK),
    "sgd": lambda: optax.chain(
        optax.add_decayed_weights(DECAY, MASK), optax.sgd(SCHEDULE, momentum=0.8, nesterov=True)
    ),
    "muon": lambda: optax.contrib.muon(
        SCHEDULE, beta=0.8, weight_decay=DECAY, weight_decay_mask=MASK, adam_b1=0.8, adam_b2=0.95
    ),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_optimizer_matches_optax(name: str) -> None:
    options = OptimOptions(
        name=name,
        lr=LR,
        schedule="cosine",
        warmup_steps=WARMUP,
        min_lr=MIN_LR,
        weight_decay=DECAY,
        decay_pattern=r"weight$",
        b1=0.8,
        b2=0.95,
        momentum=0.8,
        nesterov=True if name == "sgd" else None,
    )
    got = train(make_optimizer(options, TOTAL))
    want = train(REFERENCES[name]())
    start = params()
    for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(start), strict=True):
        assert not jnp.allclose(a, s)  # it moved
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6), (name, a, b)


def test_defaults_are_the_optimizers_own() -> None:
    # b1, b2 and momentum left unset take each optimizer's default (Lion's b2 is 0.99, not Adam's 0.999).
    for name, reference in (("lion", optax.lion(1e-3, weight_decay=0.0)), ("sgd", optax.sgd(1e-3, momentum=0.9))):
        got, want = train(make_optimizer(OptimOptions(name=name)), 3), train(reference, 3)
        assert all(
            jnp.allclose(a, b, rtol=1e-5, atol=1e-7)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        ), name


def test_decay_mask_names_parameters_by_dotted_path() -> None:
    mask = decay_mask(r"^layer\.")
    assert mask is not None
    assert mask(params()) == {"layer": {"weight": True, "bias": True}, "scale": False}
    assert decay_mask(None) is None


def test_the_learning_rate_is_visible_in_the_state() -> None:
    optimizer = make_optimizer(OptimOptions(lr=LR, schedule="linear", warmup_steps=WARMUP), TOTAL)
    state = optimizer.init(params())
    found = find_learning_rate(state)  # what the training step logs
    assert found is not None and float(found) == 0.0
