"""The ``optim`` config group: an optimizer, its schedule and its weight decay, by name."""

import re
from dataclasses import dataclass

from xax.core.config import field
from xax.core.errors import ConfigError
from xax.optim.schedules import NEEDS_TOTAL, SCHEDULES

OPTIMIZERS = ("adamw", "lion", "sgd", "muon")


@dataclass
class OptimOptions:
    name: str = field(
        "adamw",
        help="adamw, lion, sgd (with momentum) or muon (Muon for 2-D weight matrices, AdamW for the rest)",
        choices=OPTIMIZERS,
    )
    lr: float = field(1e-3, help="Peak learning rate (reached at the end of the warmup)")
    schedule: str = field(
        "constant",
        help="Learning rate after the warmup: constant, cosine, linear, wsd, inverse_sqrt",
        choices=SCHEDULES,
    )
    warmup_steps: int = field(0, help="Steps of linear warmup from 0 to lr")
    total_steps: int | None = field(
        None, help="Last step of a decaying schedule (None: the run's length, from max_steps/max_samples/max_epochs)"
    )
    min_lr: float = field(0.0, help="Learning rate at the end of cosine, linear and wsd")
    decay_fraction: float = field(0.2, help="wsd: fraction of total_steps spent decaying at the end")
    weight_decay: float = field(0.0, help="Decoupled weight decay (sgd: L2 added to the gradient)")
    decay_pattern: str | None = field(
        None,
        help="Decay only parameters whose dotted path matches this regex (re.search), e.g. 'weight$' (None: all)",
    )
    b1: float | None = field(None, help="First-moment decay (None: the optimizer's default, 0.9 for adamw and lion)")
    b2: float | None = field(None, help="Second-moment decay (None: the optimizer's default, adamw 0.999, lion 0.99)")
    eps: float = field(1e-8, help="adamw and muon: added to the denominator")
    momentum: float | None = field(None, help="sgd and muon momentum (None: their defaults, sgd 0.9, muon 0.95)")
    nesterov: bool | None = field(
        None, help="Nesterov momentum for adamw, sgd and muon (None: their defaults, on for muon only)"
    )


def check_options(options: OptimOptions, total_steps: int | None, key: str = "optim") -> None:
    """Raises ``ConfigError`` naming the first bad value of ``options``.

    Args:
        options: The options to check.
        total_steps: The length the schedule will span, where already known (``options.total_steps`` or the
            run's own length), else None.
        key: The options' place in the config, for the messages.
    """
    if options.name not in OPTIMIZERS:
        raise ConfigError(f"{key}.name={options.name!r} is not one of {list(OPTIMIZERS)}")
    if options.schedule not in SCHEDULES:
        raise ConfigError(f"{key}.schedule={options.schedule!r} is not one of {list(SCHEDULES)}")
    for name in ("lr", "min_lr", "weight_decay", "warmup_steps"):
        if getattr(options, name) < 0:
            raise ConfigError(f"{key}.{name}={getattr(options, name)} must be >= 0")
    if options.total_steps is not None and options.total_steps < 1:
        raise ConfigError(f"{key}.total_steps={options.total_steps} must be >= 1 (or null: the run's length)")
    if options.min_lr > options.lr:
        raise ConfigError(f"{key}.min_lr={options.min_lr} is above {key}.lr={options.lr}; the schedule decays to it")
    for name in ("b1", "b2", "momentum"):
        value = getattr(options, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}.{name}={value} must lie in [0, 1)")
    if not 0.0 <= options.decay_fraction <= 1.0:
        raise ConfigError(f"{key}.decay_fraction={options.decay_fraction} must lie in [0, 1]")
    if options.decay_pattern is not None:
        try:
            re.compile(options.decay_pattern)
        except re.error as error:
            raise ConfigError(f"{key}.decay_pattern={options.decay_pattern!r} is not a regex: {error}") from None
    if total_steps is not None:
        check_length(options, total_steps, key)


def check_length(options: OptimOptions, total_steps: int | None, key: str = "optim") -> None:
    """Raises ``ConfigError`` when the schedule cannot span ``total_steps`` (None: unknown)."""
    if total_steps is None:
        if options.schedule in NEEDS_TOTAL:
            raise ConfigError(
                f"{key}.schedule={options.schedule} decays to a last step, but the run has no length: "
                f"set {key}.total_steps or max_steps"
            )
        return
    if options.warmup_steps > total_steps:
        raise ConfigError(
            f"{key}.warmup_steps={options.warmup_steps} is longer than the schedule's {total_steps} steps; "
            f"lower it or raise {key}.total_steps / max_steps"
        )
    if options.schedule == "wsd" and options.warmup_steps + round(options.decay_fraction * total_steps) > total_steps:
        raise ConfigError(
            f"{key}.warmup_steps={options.warmup_steps} and {key}.decay_fraction={options.decay_fraction} "
            f"leave no stable phase in {total_steps} steps; lower one of them"
        )
