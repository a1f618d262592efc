"""What the training loop pulls each step: a batch on the devices, or only its indices."""

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array

from xax.data.columns import Batch
from xax.data.cursor import Cursor
from xax.data.placement import place_rows
from xax.data.prefetch import DevicePrefetcher
from xax.data.sources import MapBatchSource


class Feed(ABC):
    """One step's input for the jitted step, plus the data it gathers from (if any).

    Attributes:
        data: Device arrays the step gathers the batch from, or None when the input is the batch.
    """

    data: dict[str, Array] | None = None

    @abstractmethod
    def __next__(self) -> Any:
        """The next step's input: a batch on the devices, or the batch's sample indices."""

    @property
    @abstractmethod
    def cursor(self) -> Cursor:
        """Source position of the next input this feed returns."""

    @property
    @abstractmethod
    def wait_time_s(self) -> float:
        """Seconds the loop has waited for inputs so far."""

    @abstractmethod
    def close(self) -> None:
        """Stops any background work."""


class PrefetchFeed(Feed):
    """Whole batches, made and placed on the devices by a background worker."""

    def __init__(self, prefetcher: DevicePrefetcher) -> None:
        self._prefetcher = prefetcher

    def __next__(self) -> dict[str, Array]:
        return next(self._prefetcher)

    @property
    def cursor(self) -> Cursor:
        return self._prefetcher.cursor

    @property
    def wait_time_s(self) -> float:
        return self._prefetcher.wait_time_s

    def close(self) -> None:
        self._prefetcher.close()


def _replicate(arrays: Batch, replicated: NamedSharding) -> dict[str, Array]:
    """The arrays on every device of ``replicated``. With several processes, each builds its devices'
    copies from its own (identical) rows: ``device_put`` would first check across processes that the
    values agree, a check that NaN, which equals nothing, fails."""
    if jax.process_count() == 1:
        return jax.device_put(arrays, replicated)
    return {
        name: jax.make_array_from_callback(array.shape, replicated, lambda index, a=array: a[index])
        for name, array in arrays.items()
    }


class ResidentFeed(Feed):
    """The whole (in-memory) dataset on every device; each step receives only the batch's indices.

    Making a batch is then a gather inside the jitted step, and the host sends B int32 indices a
    step instead of the batch itself: for small datasets such as MNIST this is what keeps the
    device busy when a step takes well under a millisecond. In a run of several processes every
    process holds the whole dataset and places its rows of each batch's indices.
    """

    def __init__(self, source: MapBatchSource, replicated: NamedSharding) -> None:
        arrays = source.arrays
        if arrays is None:
            raise ValueError("ResidentFeed needs a source whose columns are loaded in memory")
        self._source = source
        self._indices: Iterator[np.ndarray] = source.iter_indices()
        self._wait_time_s = 0.0
        self.data = _replicate(arrays, replicated)
        self._mesh: Mesh | None = None
        if jax.process_count() > 1:
            assert isinstance(replicated.mesh, Mesh), "the launcher's mesh is a concrete one"
            self._mesh = replicated.mesh

    def __next__(self) -> np.ndarray | Array:
        start = time.perf_counter()
        indices = next(self._indices)
        self._wait_time_s += time.perf_counter() - start
        if self._mesh is None:
            return indices  # placed by the jitted step's input sharding
        # A jitted call cannot place numpy data on other processes' devices.
        return place_rows(indices, self._mesh, len(indices), local=False)

    @property
    def cursor(self) -> Cursor:
        return self._source.cursor

    @property
    def wait_time_s(self) -> float:
        return self._wait_time_s

    def close(self) -> None:
        """Nothing to stop: the indices are made on the loop's thread."""


def gather_batch(indices: Array, data: Batch | dict[str, Array]) -> dict[str, Array]:
    """The batch of the given sample indices, gathered on the device (inside the jitted step)."""
    return {name: values[indices] for name, values in data.items()}


def resident_bytes(source: MapBatchSource) -> int:
    """Bytes a ``ResidentFeed`` of ``source`` keeps on each device (0 when it is not in memory)."""
    arrays = source.arrays
    return 0 if arrays is None else sum(values.nbytes for values in arrays.values())
