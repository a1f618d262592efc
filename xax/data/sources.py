"""Batch sources: Hugging Face datasets to fixed-shape numpy batches, in a resumable order.

A :class:`BatchSource` turns a dataset into host-side batches (a dict of numpy arrays with a leading
batch axis). Its order is a pure function of (seed, epoch, position), so the :class:`Cursor` of the
next batch is all a checkpoint needs to continue the exact stream.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa

from xax.core.errors import ConfigError, DataError
from xax.data.columns import Batch, check_columns, table_to_batch
from xax.data.cursor import Cursor, shuffle_order
from xax.data.placement import ProcessRows


class BatchSource(ABC):
    """Host-side numpy batches in an order fixed by (seed, epoch, position).

    Iterating yields batches from the current cursor on and moves the cursor along; iterate one
    stream at a time. After the last batch of an epoch the cursor is (epoch + 1, 0).
    """

    _cursor: Cursor = Cursor()
    _share: Callable[[int], slice] | None = None

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    def keep_rows(self, rows: Callable[[int], slice] | None) -> None:
        """Makes every batch hold only ``rows(n)`` of the n rows of the global batch, as a
        ``ProcessRows``: in a run of several processes each reads only its share of each batch,
        in the same global order. None yields whole batches again."""
        self._share = rows

    def _local(self, rows: Batch, global_size: int) -> Batch:
        return rows if self._share is None else ProcessRows(rows, global_size)

    @property
    @abstractmethod
    def num_batches_per_epoch(self) -> int | None:
        """Batches in one epoch, or None where the dataset's length is unknown (a stream)."""

    @property
    def cursor(self) -> Cursor:
        """Position of the next batch."""
        return self._cursor

    def restore(self, cursor: Cursor) -> None:
        """Moves to a cursor saved earlier; the batches that follow are those that followed then.

        Raises:
            DataError: If the cursor lies outside the data (a different dataset or batch size).
        """
        num_batches = self.num_batches_per_epoch
        if cursor.epoch < 0 or cursor.index < 0 or (num_batches is not None and cursor.index > num_batches):
            raise DataError(
                f"cannot restore data cursor {cursor}: an epoch has {num_batches} batches; the checkpoint "
                "was made with a different dataset or batch size"
            )
        if cursor.index == num_batches:
            cursor = Cursor(cursor.epoch + 1, 0)
        self._cursor = cursor


def check_batching(batch_size: int, seed: int) -> None:
    """Raises unless the batch size is positive and the shuffle seed non-negative.

    Raises:
        ConfigError: Naming the value to fix.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if seed < 0:
        raise ConfigError(f"seed={seed} must be non-negative")


class MapBatchSource(BatchSource):
    """Batches from a map-style ``datasets.Dataset`` (known length, random access).

    Training uses ``shuffle=True, drop_last=True, repeat=True``: every epoch is a fresh permutation,
    every batch is full, and epochs follow each other forever. Validation uses ``shuffle=False,
    drop_last=False, repeat=False``: one pass in order whose last batch may be smaller, so every
    sample counts once.

    A dataset whose columns fit in ``in_memory_max_mb`` is converted to numpy arrays once; each batch
    is then a fancy index into them. A larger one is read from Arrow batch by batch.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        *,
        columns: Sequence[str] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        repeat: bool = True,
        in_memory_max_mb: int = 4096,
    ) -> None:
        check_batching(batch_size, seed)
        self.columns = list(dataset.column_names if columns is None else columns)
        check_columns(dataset, self.columns)
        self.num_samples = len(dataset)
        if self.num_samples == 0 or (drop_last and self.num_samples < batch_size):
            raise DataError(
                f"the dataset has {self.num_samples} samples, fewer than one batch of {batch_size}; "
                "lower the batch size or add data"
            )
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_last, self.repeat = drop_last, repeat
        self._cursor = Cursor()
        self._rows = dataset.select_columns(self.columns).with_format("arrow")
        self._arrays: Batch | None = None
        if _estimated_nbytes(dataset, self.columns) <= in_memory_max_mb * 2**20:
            self._arrays = {
                name: _owned(values) for name, values in table_to_batch(self._rows[:], self.columns).items()
            }

    @property
    def num_batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def in_memory(self) -> bool:
        """Whether the columns were loaded into numpy arrays."""
        return self._arrays is not None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample indices of one epoch, in the order they are batched."""
        if self.shuffle:
            return shuffle_order(self.num_samples, self.seed, epoch)
        return np.arange(self.num_samples)

    def gather(self, indices: np.ndarray) -> Batch:
        """The batch made of the given sample indices (always fresh arrays, never views)."""
        if self._arrays is not None:
            return {name: np.take(values, indices, axis=0) for name, values in self._arrays.items()}
        return table_to_batch(self._rows[indices], self.columns)

    @property
    def arrays(self) -> Batch | None:
        """The columns as numpy arrays when they were loaded into memory, else None."""
        return self._arrays

    def iter_indices(self) -> Iterator[np.ndarray]:
        """The sample indices (int32) of each batch from the cursor on, advancing the cursor."""
        epoch, index = self._cursor.epoch, self._cursor.index
        num_batches = self.num_batches_per_epoch
        while True:
            order = self.epoch_order(epoch).astype(np.int32)
            for i in range(index, num_batches):
                indices = order[i * self.batch_size : (i + 1) * self.batch_size]
                self._cursor = Cursor(epoch, i + 1) if i + 1 < num_batches else Cursor(epoch + 1, 0)
                yield indices
            epoch, index = epoch + 1, 0
            if not self.repeat:
                return

    def __iter__(self) -> Iterator[Batch]:
        for indices in self.iter_indices():
            local = indices if self._share is None else indices[self._share(len(indices))]
            yield self._local(self.gather(local), len(indices))


def _estimated_nbytes(dataset: datasets.Dataset, columns: Sequence[str]) -> float:
    """Bytes the columns take, scaled to the rows the dataset selects from its table."""
    table = dataset.data
    total = sum(table.column(name).nbytes for name in columns)
    return total * len(dataset) / max(table.num_rows, 1)


def _owned(values: np.ndarray) -> np.ndarray:
    """A writable array that owns its memory, not a view into an Arrow (possibly mapped) buffer."""
    return values if values.flags.writeable and values.flags.owndata else np.array(values)


class IterableBatchSource(BatchSource):
    """Batches streamed from a ``datasets.IterableDataset``.

    Shuffling uses the dataset's buffer shuffle with ``set_epoch(epoch)``, so an epoch's order is a
    pure function of (seed, epoch). Restoring a cursor replays the epoch's stream up to that batch.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        batch_size: int,
        *,
        columns: Sequence[str] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        drop_last: bool = True,
        repeat: bool = True,
    ) -> None:
        check_batching(batch_size, seed)
        if columns is not None:
            check_columns(dataset, columns)
            dataset = dataset.select_columns(list(columns))
        self.columns = None if columns is None else list(columns)
        self.batch_size, self.seed, self.shuffle, self.shuffle_buffer = batch_size, seed, shuffle, shuffle_buffer
        self.drop_last, self.repeat = drop_last, repeat
        # Formatting first: with_format() forgets an earlier shuffle's seed and epoch.
        self._dataset = dataset.with_format("arrow")
        self._cursor = Cursor()

    @property
    def num_batches_per_epoch(self) -> None:
        return None

    def _epoch_tables(self, epoch: int) -> Iterator[pa.Table]:
        dataset = self._dataset
        if self.shuffle:
            # shuffle() returns a new dataset, so set_epoch never touches the caller's object.
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            dataset.set_epoch(epoch)
        return iter(dataset.iter(batch_size=self.batch_size, drop_last_batch=self.drop_last))

    def __iter__(self) -> Iterator[Batch]:
        epoch, index = self._cursor.epoch, self._cursor.index
        while True:
            tables = self._epoch_tables(epoch)
            current = next(tables, None)
            if current is None and index == 0:
                raise DataError(
                    f"the stream yields no {'full ' if self.drop_last else ''}batch of {self.batch_size} "
                    "samples in an epoch; lower the batch size or add data"
                )
            position = 0
            while current is not None:
                # Look one table ahead so the cursor after an epoch's last batch is (epoch + 1, 0).
                following = next(tables, None)
                position += 1
                if position > index:
                    columns = self.columns if self.columns is not None else current.column_names
                    rows = slice(None) if self._share is None else self._share(current.num_rows)
                    batch = self._local(table_to_batch(current[rows], columns), current.num_rows)
                    self._cursor = Cursor(epoch, position) if following is not None else Cursor(epoch + 1, 0)
                    yield batch
                current = following
            epoch, index = epoch + 1, 0
            if not self.repeat:
                return
