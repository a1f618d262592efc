"""Data loading: Hugging Face datasets to fixed-shape numpy batches, prefetched onto the devices.

A :class:`BatchSource` turns a dataset into host-side batches (a dict of numpy arrays with a leading
batch axis). Its order is a pure function of (seed, epoch, position), so the :class:`Cursor` of the
next batch is all a checkpoint needs to continue the exact stream. A :class:`DevicePrefetcher`
runs a source in a background thread and keeps a few batches already placed (sharded) on the devices.

Columns are read at the Arrow level, never row by row, and keep their stored dtypes (a uint8 image
stays uint8; the numpy formatter of ``datasets`` would widen every integer column to int64).
"""

import functools
import math
import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import datasets
import jax
import numpy as np
import pyarrow as pa
from jax.sharding import Mesh
from typing_extensions import override

from xax.core.config import check_range, field
from xax.core.errors import ConfigError, DataError
from xax.core.state import Phase
from xax.task.base import BaseConfig, BaseTask
from xax.task.process_batches import ProcessRows, process_rows

Batch = dict[str, np.ndarray]
AnyDataset = datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict

VALID_SPLITS = ("validation", "valid", "test")
_SCAN_ROWS = 65_536  # rows per Arrow batch when scanning a column for ragged values
_POLL_S = 0.05  # how often a blocked worker or consumer checks whether it should stop
_JOIN_TIMEOUT_S = 5.0


@dataclass
class DataOptions:
    prefetch: int = field(2, help="Batches prepared ahead by a background worker and kept on the devices")
    shuffle_buffer: int = field(10_000, help="Examples in the shuffle buffer when streaming an IterableDataset")
    in_memory_max_mb: int = field(4096, help="Load map-style datasets up to this size (MB) into numpy arrays")
    device_resident_max_mb: int = field(
        1024,
        help="Keep an in-memory training set up to this size (MB) on each device and gather every batch inside "
        "the jitted step, so only the batch's indices cross to the device (0 turns it off)",
    )


@dataclass
class DataLoaderConfig(BaseConfig):
    batch_size: int = field(128, help="Samples per optimizer step, over all devices")
    valid_batch_size: int | None = field(None, help="Samples per validation step; None uses batch_size")
    data: DataOptions = field(DataOptions(), help="Data loading options")


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


def _ragged_error(name: str, lengths: object) -> DataError:
    return DataError(
        f"column {name!r} has variable-length values ({lengths}); batches need fixed shapes: pad or "
        "truncate it to one length in a map(), or leave it out of batch_columns()"
    )


def _flatten_lists(name: str, array: pa.Array) -> tuple[pa.Array, tuple[int, ...]]:
    """Strips list levels off an Arrow array, checking that each level has one length.

    Returns:
        The flat values and the shape of one row (without the row axis).
    """
    shape: list[int] = []
    while True:
        if isinstance(array.type, pa.ExtensionType):  # datasets' Array2D..Array5D
            array = array.storage
        kind = array.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            return array, tuple(shape)
        if array.null_count:
            raise DataError(f"column {name!r} has missing (null) values; fill or filter them in a map()")
        if pa.types.is_fixed_size_list(kind):
            shape.append(kind.list_size)
        elif len(array):
            lengths = array.value_lengths().to_numpy()
            low, high = int(lengths.min()), int(lengths.max())
            if low != high:
                raise _ragged_error(name, f"lengths from {low} to {high}")
            shape.append(low)
        else:
            shape.append(0)
        array = array.flatten()


def column_to_numpy(name: str, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Converts one Arrow column into a numpy array of shape (rows, *row_shape), keeping its dtype.

    Args:
        name: The column name, for error messages.
        column: The column's values.

    Returns:
        The values as one array.

    Raises:
        DataError: If the column holds nulls, variable-length lists or values that are not numbers.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    num_rows = len(array)
    values, row_shape = _flatten_lists(name, array)
    kind = values.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DataError(
            f"column {name!r} holds {kind} values, not numbers; convert it to numeric arrays in a map() "
            "(tokenize text, decode images) or leave it out of batch_columns()"
        )
    if values.null_count:
        raise DataError(f"column {name!r} has missing (null) values; fill or filter them in a map()")
    return values.to_numpy(zero_copy_only=False).reshape((num_rows, *row_shape))


def table_to_batch(table: pa.Table, columns: Sequence[str]) -> Batch:
    """Converts the named columns of an Arrow table to numpy arrays."""
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise _missing_error(missing[0], table.column_names)
    return {name: column_to_numpy(name, table.column(name)) for name in columns}


def _missing_error(name: str, available: Sequence[str]) -> DataError:
    return DataError(
        f"column {name!r} is not in the dataset; available columns: {', '.join(map(repr, available))}; "
        "fix batch_columns() or add the column in a map()"
    )


def _feature_kind(feature: object) -> str:
    """Whether a feature gives rows of one shape: 'fixed', 'variable' or 'unsupported'."""
    if isinstance(feature, datasets.ClassLabel):
        return "fixed"
    if isinstance(feature, datasets.Value):
        kind = feature.pa_type
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
        return "fixed" if numeric else "unsupported"
    if isinstance(feature, datasets.Array2D | datasets.Array3D | datasets.Array4D | datasets.Array5D):
        return "variable" if feature.shape[0] is None else "fixed"
    if isinstance(feature, datasets.List | datasets.LargeList):
        inner = _feature_kind(feature.feature)
        if inner == "unsupported":
            return inner
        fixed = isinstance(feature, datasets.List) and feature.length >= 0
        return inner if fixed else "variable"
    return "unsupported"


def _scan_ragged(dataset: datasets.Dataset, name: str) -> None:
    """Reads a variable-length column in Arrow batches and raises if its rows differ in shape."""
    shapes: set[tuple[int, ...]] = set()
    for table in dataset.select_columns([name]).with_format("arrow").iter(batch_size=_SCAN_ROWS):
        shapes.add(_flatten_lists(name, table.column(name).combine_chunks())[1])
        if len(shapes) > 1:
            raise _ragged_error(name, "row shapes " + " and ".join(map(str, sorted(shapes))))


def check_columns(dataset: datasets.Dataset | datasets.IterableDataset, columns: Sequence[str]) -> None:
    """Checks that the columns exist and that each holds numbers of one shape per row.

    A map-style dataset's variable-length list columns are scanned to confirm that every row has the
    same length; an IterableDataset's rows are checked batch by batch as they stream.

    Args:
        dataset: The dataset to check.
        columns: The columns batches will hold.

    Raises:
        DataError: Naming the first missing, non-numeric or ragged column.
    """
    available = dataset.column_names
    if available is None:  # a stream whose features are unknown until it is read
        return
    for name in columns:
        if name not in available:
            raise _missing_error(name, available)
    features = dataset.features or {}
    for name in columns:
        feature = features.get(name)
        kind = "variable" if feature is None else _feature_kind(feature)
        if kind == "unsupported":
            raise DataError(
                f"column {name!r} holds {feature}, not numbers; convert it to numeric arrays in a map() "
                "(tokenize text, decode images) or leave it out of batch_columns()"
            )
        if kind == "variable" and isinstance(dataset, datasets.Dataset):
            _scan_ragged(dataset, name)


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


def _check_batching(batch_size: int, seed: int) -> None:
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
        _check_batching(batch_size, seed)
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
        _check_batching(batch_size, seed)
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


_BATCH, _END, _ERROR = "batch", "end", "error"


def _put(out: queue.Queue, item: tuple[str, Any, Cursor | None], stop: threading.Event) -> bool:
    """Puts an item, giving up (False) once ``stop`` is set, so a full queue never blocks close()."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(source: BatchSource, place: Callable[[Batch], Any], out: queue.Queue, stop: threading.Event) -> None:
    """The worker: places each batch on the devices and queues it with the cursor that follows it.

    It holds no reference to the prefetcher, so a prefetcher that is dropped without close() can
    still be collected (its finalizer sets ``stop``).
    """
    try:
        for batch in source:
            if not _put(out, (_BATCH, place(batch), source.cursor), stop):
                return
        _put(out, (_END, None, None), stop)
    except BaseException as error:  # the consumer re-raises it
        _put(out, (_ERROR, error, None), stop)


class DevicePrefetcher:
    """Iterates a batch source in a background thread, keeping batches placed on the devices.

    Args:
        source: Where the host batches come from; it is iterated from its current cursor.
        sharding: The sharding each batch is placed with (``jax.device_put(batch, sharding)``), e.g.
            ``NamedSharding(mesh, PartitionSpec("data"))`` to split the batch axis over the data axis;
            or a function that places a host batch itself and returns the device batch (e.g. with
            ``jax.make_array_from_process_local_data`` on several hosts).
        depth: Batches kept ready in the queue.
    """

    def __init__(
        self,
        source: BatchSource,
        sharding: jax.sharding.Sharding | Callable[[Batch], Any],
        depth: int = 2,
    ) -> None:
        if depth < 1:
            raise ConfigError(f"data.prefetch={depth} must be at least 1")
        if isinstance(sharding, jax.sharding.Sharding):
            target = sharding

            def place(batch: Batch) -> Any:
                return jax.device_put(batch, target)

        else:
            place = sharding
        self.wait_time_s = 0.0
        self._cursor = source.cursor
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._closed = False
        self._thread = threading.Thread(
            target=_produce, args=(source, place, self._queue, self._stop), name="xax-data-prefetch", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    @property
    def cursor(self) -> Cursor:
        """Source position of the next batch this iterator returns (not of the worker, which runs ahead)."""
        return self._cursor

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._closed:
            raise RuntimeError("the DevicePrefetcher was closed; make a new one to read more batches")
        if self._finished:
            raise StopIteration
        start = time.perf_counter()
        while True:
            try:
                kind, value, cursor = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data worker stopped without a result") from None
        self.wait_time_s += time.perf_counter() - start
        if kind == _ERROR:
            self.close()
            raise value
        if kind == _END:
            self._finished = True
            raise StopIteration
        self._cursor = cursor
        return value

    def close(self) -> None:
        """Stops the worker and frees the queued batches; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=_JOIN_TIMEOUT_S)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> "DevicePrefetcher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Config = TypeVar("Config", bound=DataLoaderConfig)


def _split_for(dataset: Mapping[Any, Any], phase: Phase) -> str:
    # Typed as a Mapping: runtime type checkers cannot resolve DatasetDict's generic parameters.
    names = ("train",) if phase == "train" else VALID_SPLITS
    for name in names:
        if name in dataset:
            return name
    raise DataError(
        f"get_dataset({phase!r}) returned splits {sorted(dataset)}, none of {', '.join(map(repr, names))}; "
        f"rename the split or return the {phase} split itself"
    )


class DataLoaderMixin(BaseTask[Config], Generic[Config]):
    """Builds the batch source of each phase from the task's dataset.

    In a run of several processes, each process's sources read only the rows of each global batch
    that its devices hold on ``mesh`` (set by the launcher).
    """

    mesh: Mesh | None = None

    def __init__(self, config: Config) -> None:
        super().__init__(config)

    @override
    def validate_config(self) -> None:
        super().validate_config()
        config = self.config
        check_range("batch_size", config.batch_size, minimum=1)
        check_range("valid_batch_size", config.valid_batch_size, minimum=1, unset="batch_size")
        check_range("data.prefetch", config.data.prefetch, minimum=1)
        check_range("data.shuffle_buffer", config.data.shuffle_buffer, minimum=1)
        check_range("data.in_memory_max_mb", config.data.in_memory_max_mb, minimum=0)
        check_range("data.device_resident_max_mb", config.data.device_resident_max_mb, minimum=0)

    @abstractmethod
    def get_dataset(self, phase: Phase) -> AnyDataset:
        """The dataset of a phase: a Dataset, an IterableDataset, or a dict of splits.

        A dict of splits gives "train" for training and the first of "validation", "valid", "test"
        for validation.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement get_dataset(phase)")

    def batch_columns(self) -> Sequence[str] | None:
        """The columns batches hold; None loads every column."""
        return None

    def get_batch_source(self, phase: Phase, *, seed: int) -> BatchSource:
        """The batch source of a phase.

        Training shuffles, drops the last partial batch and repeats forever; validation makes one
        pass in order and keeps the last partial batch.

        Args:
            phase: "train" or "valid".
            seed: The shuffle seed.

        Returns:
            A source at cursor (0, 0).
        """
        config = self.config
        train = phase == "train"
        batch_size = config.batch_size if train or config.valid_batch_size is None else config.valid_batch_size
        key = "batch_size" if train or config.valid_batch_size is None else "valid_batch_size"
        if batch_size < 1:
            raise ConfigError(f"{key}={batch_size} must be at least 1")
        dataset = self.get_dataset(phase)
        if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
            dataset = dataset[_split_for(dataset, phase)]
        source = self._make_source(dataset, phase, batch_size, seed)
        if self.mesh is not None and jax.process_count() > 1:
            source.keep_rows(functools.partial(process_rows, self.mesh))
        return source

    def _make_source(self, dataset: object, phase: Phase, batch_size: int, seed: int) -> BatchSource:
        config = self.config
        train = phase == "train"
        columns = self.batch_columns()
        kwargs: dict[str, Any] = {"columns": columns, "seed": seed, "shuffle": train, "drop_last": train}
        if isinstance(dataset, datasets.IterableDataset):
            return IterableBatchSource(
                dataset, batch_size, repeat=train, shuffle_buffer=config.data.shuffle_buffer, **kwargs
            )
        if isinstance(dataset, datasets.Dataset):
            max_mb = config.data.in_memory_max_mb
            return MapBatchSource(dataset, batch_size, repeat=train, in_memory_max_mb=max_mb, **kwargs)
        from xax.task.grain_source import GrainBatchSource, is_grain_map_dataset

        if is_grain_map_dataset(dataset):
            return GrainBatchSource(dataset, batch_size, repeat=train, **kwargs)
        raise DataError(
            f"get_dataset({phase!r}) returned a {type(dataset).__name__}; return a datasets.Dataset, "
            "IterableDataset, DatasetDict or grain.MapDataset"
        )
