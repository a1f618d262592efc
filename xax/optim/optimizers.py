"""Optimizers by name (optax's own), with a learning-rate schedule and a weight-decay mask by parameter path."""

import re
from collections.abc import Callable
from typing import Any

import jax
import optax
import optax.contrib
from jaxtyping import PyTree

from xax.optim.options import OptimOptions
from xax.optim.schedules import make_schedule
from xax.utils.pytree import path_name


def decay_mask(pattern: str | None) -> Callable[[PyTree], PyTree] | None:
    """A mask function for optax's weight decay: True for the leaves whose dotted path (as
    ``xax.utils.pytree.path_name`` spells it) matches ``pattern`` (``re.search``); None decays every leaf.

    Examples:
        >>> mask = decay_mask(r"weight$")
        >>> mask({"linear": {"weight": 1.0, "bias": 2.0}})
        {'linear': {'bias': False, 'weight': True}}
    """
    if pattern is None:
        return None
    compiled = re.compile(pattern)

    def mask(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(lambda path, _: bool(compiled.search(path_name(path))), params)

    return mask


def _sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: Callable[[PyTree], PyTree] | None,
    nesterov: bool,
) -> optax.GradientTransformation:
    # L2 on the gradient before the momentum, as torch.optim.SGD's weight_decay does.
    return optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.sgd(learning_rate, momentum, nesterov))  # ty: ignore[invalid-argument-type]


def schedule_of(options: OptimOptions, total_steps: int | None = None) -> optax.Schedule:
    """The learning-rate schedule ``options`` names (``make_schedule``); ``total_steps`` is its last
    step when ``options.total_steps`` is None (the run's length)."""
    return make_schedule(
        options.schedule,
        options.lr,
        warmup_steps=options.warmup_steps,
        total_steps=options.total_steps if options.total_steps is not None else total_steps,
        min_lr=options.min_lr,
        decay_fraction=options.decay_fraction,
    )


def make_optimizer(options: OptimOptions, total_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer ``options`` names, with its schedule, behind ``optax.inject_hyperparams`` (so the
    learning rate is logged each step).

    - ``adamw``: ``optax.adamw`` (Loshchilov & Hutter 2019).
    - ``lion``: ``optax.lion`` (Chen et al. 2023); its learning rate is usually 3-10x below AdamW's.
    - ``sgd``: ``optax.sgd`` with momentum, L2 weight decay added to the gradient first.
    - ``muon``: ``optax.contrib.muon`` (Jordan et al. 2024): orthogonalized momentum for 2-D weight
      matrices and AdamW for the other parameters; the weight decay (and ``decay_pattern``) applies to
      the matrices only, as biases and norms are usually left undecayed.

    Args:
        options: The ``optim`` config group.
        total_steps: The schedule's last step when ``options.total_steps`` is None (the run's length).

    Returns:
        The optax optimizer.
    """
    schedule = schedule_of(options, total_steps)
    mask = decay_mask(options.decay_pattern)
    # Options left unset (None) take the optimizer's own default.
    betas: dict[str, Any] = {name: value for name in ("b1", "b2") if (value := getattr(options, name)) is not None}
    nesterov: dict[str, Any] = {} if options.nesterov is None else {"nesterov": options.nesterov}
    if options.name == "adamw":
        return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=schedule,
            eps=options.eps,
            weight_decay=options.weight_decay,
            mask=mask,
            **nesterov,
            **betas,
        )
    if options.name == "lion":
        return optax.inject_hyperparams(optax.lion, static_args=("mask",))(
            learning_rate=schedule, weight_decay=options.weight_decay, mask=mask, **betas
        )
    if options.name == "sgd":
        return optax.inject_hyperparams(_sgd, static_args=("mask",))(
            learning_rate=schedule,
            momentum=0.9 if options.momentum is None else options.momentum,
            weight_decay=options.weight_decay,
            mask=mask,
            nesterov=bool(options.nesterov),
        )
    if options.name == "muon":
        adam = {f"adam_{name}": value for name, value in betas.items()}
        return optax.inject_hyperparams(optax.contrib.muon, static_args=("weight_decay_mask",))(
            learning_rate=schedule,
            beta=0.95 if options.momentum is None else options.momentum,
            eps=options.eps,
            weight_decay=options.weight_decay,
            weight_decay_mask=mask,
            **nesterov,
            **adam,
        )
    raise ValueError(f"optimizer {options.name!r} is not one of adamw, lion, sgd, muon")
