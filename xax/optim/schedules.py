"""Learning-rate schedules by name, each behind a linear warmup from zero."""

import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike

SCHEDULES = ("constant", "cosine", "linear", "wsd", "inverse_sqrt")

# The schedules that decay to ``min_lr`` by a last step, and so need the run's length.
NEEDS_TOTAL = ("cosine", "linear", "wsd")


def make_schedule(
    name: str,
    lr: float,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr: float = 0.0,
    decay_fraction: float = 0.2,
) -> optax.Schedule:
    """The learning rate at each step ``t``, rising linearly from 0 to ``lr`` over ``warmup_steps`` (W), then:

    - ``constant``: ``lr``.
    - ``cosine``: ``min_lr + (lr - min_lr) (1 + cos(pi (t - W) / (T - W))) / 2`` up to ``total_steps`` (T),
      then ``min_lr`` (Loshchilov & Hutter 2017, SGDR, without restarts).
    - ``linear``: from ``lr`` at W down to ``min_lr`` at T, straight.
    - ``wsd`` (warmup-stable-decay): ``lr`` until the last ``D = round(decay_fraction T)`` steps, then
      straight down to ``min_lr`` at T (Hu et al. 2024, MiniCPM).
    - ``inverse_sqrt``: ``lr sqrt(W / t)`` after the warmup (Vaswani et al. 2017), ``lr / sqrt(t)`` without
      one (``t >= 1``).

    Args:
        name: One of ``SCHEDULES``.
        lr: The peak learning rate, reached at the end of the warmup.
        warmup_steps: Steps of the linear warmup (0: none).
        total_steps: The last step of a decaying schedule (``cosine``, ``linear``, ``wsd``).
        min_lr: Where a decaying schedule ends.
        decay_fraction: The fraction of ``total_steps`` that ``wsd`` spends decaying.

    Returns:
        An optax schedule: step count -> learning rate.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is not one of {list(SCHEDULES)}")
    if name in NEEDS_TOTAL and total_steps is None:
        raise ValueError(f"the {name} schedule needs total_steps")
    total = total_steps or 0
    if name == "constant":
        after: optax.Schedule = optax.constant_schedule(lr)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total - warmup_steps, 1), alpha=min_lr / lr if lr else 0.0)
    elif name == "linear":
        after = optax.linear_schedule(lr, min_lr, max(total - warmup_steps, 1))
    elif name == "wsd":
        decay = round(decay_fraction * total)
        stable = max(total - decay - warmup_steps, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, min_lr, max(decay, 1))], [stable]
        )
    else:
        after = _inverse_sqrt(lr, warmup_steps)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def _inverse_sqrt(lr: float, warmup_steps: int) -> optax.Schedule:
    """``lr sqrt(max(W, 1) / max(W + t, 1))``, counting ``t`` from the end of the warmup."""
    start = max(warmup_steps, 1)

    def schedule(count: ArrayLike) -> Array:
        step = jnp.maximum(jnp.asarray(count, jnp.float32) + warmup_steps, start)
        return lr * jnp.sqrt(start / step)

    return schedule
