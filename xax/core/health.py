"""The health of training steps: non-finite steps over a logging window, as one typed record.

The jitted step updates a ``Health`` next to its metric sums (a few int32 scalars, donated with
them); the logging thread reads it when it reads the metrics, and the training loop acts on it
per ``nan.policy``. A non-finite step never changes the weights: its update is dropped.
"""

import dataclasses
import enum
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import Array


class NonfiniteCause(enum.IntEnum):
    """What made a step non-finite first (checked in this order); 0 while every step was finite."""

    NONE = 0
    LOSS = 1
    GRADIENT = 2
    UPDATE = 3


# Not runtime type-checked: inside the jitted step the fields hold traced scalars, on the host ints.
@typing.no_type_check
@dataclass(frozen=True)
class Health:
    """Non-finite steps since the last log (int32 scalars in the step, Python ints on the host).

    Attributes:
        nonfinite_steps: Steps whose update was not applied (a non-finite loss, gradient or update).
        first_step: The first such step (counted from 1), or 0 when there was none.
        first_cause: What went wrong in that step (a ``NonfiniteCause`` value).
        first_leaf: The parameter leaf at fault in that step, counted from 1 in the parameters'
            flattening order (0 for a non-finite loss).
        max_streak: The longest run of non-finite steps in a row seen in the window.
    """

    nonfinite_steps: int | Array = 0
    first_step: int | Array = 0
    first_cause: int | Array = 0
    first_leaf: int | Array = 0
    max_streak: int | Array = 0

    @staticmethod
    def zeros() -> "Health":
        """A window with no steps yet, as int32 device scalars (the step's input structure)."""
        return Health(*(jnp.zeros((), jnp.int32) for _ in range(5)))

    def record(self, *, step: int | Array, applied: Array, cause: Array, leaf: Array, streak: Array) -> "Health":
        """Adds one step (traced inside the jitted step).

        Args:
            step: The step's number, counted from 1.
            applied: Whether its update was applied (everything was finite).
            cause: Its ``NonfiniteCause`` (ignored when applied).
            leaf: The parameter leaf at fault, counted from 1 (ignored when applied).
            streak: Non-finite steps in a row up to and including this one.
        """
        first = ~applied & (self.first_step == 0)
        return Health(
            nonfinite_steps=(self.nonfinite_steps + (~applied).astype(jnp.int32)).astype(jnp.int32),
            first_step=jnp.where(first, step, self.first_step).astype(jnp.int32),
            first_cause=jnp.where(first, cause, self.first_cause).astype(jnp.int32),
            first_leaf=jnp.where(first, leaf, self.first_leaf).astype(jnp.int32),
            max_streak=jnp.maximum(self.max_streak, streak).astype(jnp.int32),
        )

    def on_host(self) -> "Health":
        """The same record with Python ints (waits for the device values)."""
        host = jax.device_get(self)
        return Health(*(int(getattr(host, field.name)) for field in dataclasses.fields(Health)))

    @property
    def ok(self) -> bool:
        """Whether every step of the window was finite (read on the host)."""
        return int(self.nonfinite_steps) <= 0

    def merged(self, later: "Health") -> "Health":
        """This window's record followed by a ``later`` one's: counts add, the first bad step stays."""
        if self.ok:
            return later
        if later.ok:
            return self
        return Health(
            nonfinite_steps=int(self.nonfinite_steps) + int(later.nonfinite_steps),
            first_step=self.first_step,
            first_cause=self.first_cause,
            first_leaf=self.first_leaf,
            max_streak=max(int(self.max_streak), int(later.max_streak)),
        )

    def describe(self, leaf_names: Sequence[str]) -> str:
        """What went wrong, in words: the cause, the parameter by name, the step and the count.

        Args:
            leaf_names: The names of the parameter leaves, in flattening order.
        """
        cause = NonfiniteCause(int(self.first_cause))
        leaf = int(self.first_leaf)
        if cause == NonfiniteCause.GRADIENT:
            culprit = f"non-finite gradient of {leaf_names[leaf - 1]}"
        elif cause == NonfiniteCause.UPDATE:
            culprit = f"update made {leaf_names[leaf - 1]} non-finite (check the learning rate)"
        else:
            culprit = "non-finite loss"
        return f"{culprit} at step {int(self.first_step)} ({int(self.nonfinite_steps)} step(s) skipped)"


jax.tree_util.register_dataclass(
    Health,
    data_fields=["nonfinite_steps", "first_step", "first_cause", "first_leaf", "max_streak"],
    meta_fields=[],
)
