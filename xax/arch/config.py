"""The convention every model config in ``xax.arch`` follows, and the checks they share.

A model config is a frozen dataclass registered with :func:`xax.core.config.register_config`
(hashable, so a model can keep it as a static field, and a pytree with no leaves, so it passes
through ``jax.jit``). Every field is ``field(default, help=...)`` whose help says why the default is
what it is, and the same thing has the same name in every model: ``d_model`` (the width of the
residual stream or of the tokens), ``num_layers``, ``num_heads``, ``scan_layers``, ``remat``,
``attention_impl``, ``compute_dtype``, ``vocab_size``, ``norm_eps``, ``tie_embeddings``,
``in_channels``/``out_channels``, ``num_classes``. Each config checks itself in ``__post_init__``
and raises :class:`ModelConfigError`, one line naming the field and the fix. A copy with changes is
``dataclasses.replace(config, ...)`` (validated again).

Each model module also declares ``SHARDING_RULES``: pairs of a regular expression over dotted
parameter paths and the logical axis of each dimension, which ``xax.parallel.rules`` applies.
"""

from collections.abc import Callable, Collection
from typing import Any

import jax

from xax.core.errors import ConfigError

# The ``remat`` field's rematerialization policies by name; None means no rematerialization.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# The ``attention_impl`` values of the diffusion networks: None lets JAX pick (cuDNN on a GPU where it
# can, else XLA).
ATTENTION_IMPLS: tuple[str | None, ...] = ("xla", "cudnn", None)

# (pattern over a dotted parameter path, logical axis of each dimension); see xax.parallel.rules.
ShardingRules = tuple[tuple[str, tuple[str | None, ...]], ...]


class ModelConfigError(ConfigError, ValueError):
    """A model config field holds a value the model cannot be built with."""


def check_choice(config: object, name: str, choices: Collection[object]) -> None:
    """Raises unless ``config.<name>`` is one of ``choices``.

    Raises:
        ModelConfigError: Naming the field, its value and the legal values.
    """
    value = getattr(config, name)
    if value not in choices:
        legal = sorted(choices, key=str)
        raise ModelConfigError(f"{type(config).__name__}.{name}={value!r} is unknown; expected one of {legal}")


def check_positive(config: object, *names: str) -> None:
    """Raises unless every ``config.<name>`` is at least 1.

    Raises:
        ModelConfigError: Naming the first field that is not.
    """
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ModelConfigError(f"{type(config).__name__}.{name}={value} must be at least 1")
