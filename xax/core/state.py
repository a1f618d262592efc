"""The training state: counters kept on the host and saved in every checkpoint."""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

Phase = Literal["train", "valid"]
PHASES: tuple[Phase, ...] = get_args(Phase)


# Not runtime type-checked: inside the jitted step the same fields hold traced scalars.
@typing.no_type_check
@dataclass(frozen=True)
class State:
    """Where training stands.

    The counters live on the host as Python integers (saved as int64) so that reading them never
    waits on the device; a float32 counter would stop counting at 2**24 samples. Inside the jitted
    step the same fields arrive as traced scalars (int32 and float32).

    Examples:
        >>> state = State().replace(num_steps=3, num_samples=96)
        >>> State.from_dict(state.to_dict()) == state  # as a checkpoint saves and restores it
        True

    Attributes:
        num_steps: Optimizer steps taken.
        num_samples: Training samples consumed.
        num_valid_steps: Validation passes run.
        elapsed_time_s: Seconds of training, excluding time spent before the first step.
        epoch: Full passes over the training data (for map-style datasets).
        phase: The phase being run.
    """

    num_steps: int = 0
    num_samples: int = 0
    num_valid_steps: int = 0
    elapsed_time_s: float = 0.0
    epoch: int = 0
    phase: Phase = "train"

    def replace(self, **changes: object) -> "State":
        return dataclasses.replace(self, **changes)

    def pack(self) -> np.ndarray:
        """The counters as one int32 array, so the step receives them in a single transfer.

        Inside the step the counters are int32 (they wrap past 2**31) and the elapsed time is
        whole milliseconds; the host keeps the exact values.
        """
        values = [self.num_steps, self.num_samples, self.num_valid_steps, self.epoch, int(self.elapsed_time_s * 1000)]
        return (np.array(values, dtype=np.int64) % 2**31).astype(np.int32)

    @classmethod
    def unpack(cls, packed: Array, phase: Phase) -> "State":
        """The State seen inside the jitted step, from ``pack``'s array."""
        traced: dict[str, typing.Any] = {
            "num_steps": packed[0],
            "num_samples": packed[1],
            "num_valid_steps": packed[2],
            "epoch": packed[3],
            "elapsed_time_s": packed[4].astype(jnp.float32) / 1000.0,
        }
        return cls(**traced, phase=phase)

    def to_dict(self) -> dict[str, int | float | str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int | float | str]) -> "State":
        return cls(
            num_steps=int(values["num_steps"]),
            num_samples=int(values["num_samples"]),
            num_valid_steps=int(values["num_valid_steps"]),
            elapsed_time_s=float(values["elapsed_time_s"]),
            epoch=int(values["epoch"]),
            phase=str(values["phase"]),  # ty: ignore[invalid-argument-type]
        )


# Counters enter the jitted step as traced values (one compile for every step); phase is static.
jax.tree_util.register_dataclass(
    State,
    data_fields=["num_steps", "num_samples", "num_valid_steps", "elapsed_time_s", "epoch"],
    meta_fields=["phase"],
)
