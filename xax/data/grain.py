"""Batches from a Grain ``MapDataset`` (pipelines that keep their data in ArrayRecord files)."""

from collections.abc import Sequence
from typing import Any

import numpy as np

from xax.core.errors import DataError
from xax.data.columns import Batch
from xax.data.cursor import Cursor
from xax.data.sources import MapBatchSource, check_batching


def is_grain_map_dataset(dataset: object) -> bool:
    """Whether ``dataset`` is a Grain MapDataset (Grain is an optional extra: never imported here
    unless installed)."""
    try:
        import grain
    except ImportError:
        return False
    return isinstance(dataset, grain.MapDataset)


class GrainBatchSource(MapBatchSource):
    """A Grain ``MapDataset`` read by index, batched like a Hugging Face map-style dataset.

    The order is the same pure function of (seed, epoch) and the cursor the same (epoch, batch),
    so Grain's iterator state is exactly the cursor saved in every checkpoint. Elements must be
    dicts of fixed-shape arrays (or scalars).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        columns: Sequence[str] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        repeat: bool = True,
    ) -> None:
        check_batching(batch_size, seed)
        self.num_samples = len(dataset)
        if self.num_samples == 0 or (drop_last and self.num_samples < batch_size):
            raise DataError(
                f"the Grain dataset has {self.num_samples} elements, fewer than one batch of {batch_size}; "
                "lower the batch size or add data"
            )
        first = dataset[0]
        if not isinstance(first, dict):
            raise DataError(f"Grain elements must be dicts of arrays, got {type(first).__name__}; map() them to dicts")
        self.columns = list(first) if columns is None else list(columns)
        for name in self.columns:
            if name not in first:
                raise DataError(f"column '{name}' is not in the Grain elements; they have {sorted(first)}")
        self._shapes = {name: np.shape(first[name]) for name in self.columns}
        self._grain = dataset
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_last, self.repeat = drop_last, repeat
        self._cursor = Cursor()
        self._arrays = None

    def gather(self, indices: np.ndarray) -> Batch:
        # One batched read: Grain passes it to a source that reads many records at once (ArrayRecord files).
        elements = self._grain._getitems([int(i) for i in indices])
        batch = {}
        for name in self.columns:
            values = [np.asarray(element[name]) for element in elements]
            for index, value in zip(indices, values, strict=True):
                if value.shape != self._shapes[name]:
                    raise DataError(
                        f"column '{name}' is ragged: element {int(index)} has shape {value.shape}, element 0 "
                        f"{self._shapes[name]}; batches need fixed shapes (pad or truncate in a map())"
                    )
            batch[name] = np.stack(values)
        return batch
