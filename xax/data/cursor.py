"""The resumable position in a batch stream, and the epoch order it indexes into.

A source's order is a pure function of (seed, epoch, position), so the :class:`Cursor` of the next
batch is all a checkpoint needs to continue the exact stream.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cursor:
    """Position of the next batch in a batch stream.

    Attributes:
        epoch: The pass over the data the next batch belongs to.
        index: Batches already consumed in that epoch.
    """

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> "Cursor":
        return cls(epoch=int(values["epoch"]), index=int(values["index"]))


def shuffle_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch).

    Args:
        num_samples: Samples in the dataset.
        seed: The shuffle seed (non-negative).
        epoch: The epoch (non-negative).

    Returns:
        An int64 permutation of ``range(num_samples)``.
    """
    return np.random.default_rng((seed, epoch)).permutation(num_samples)
