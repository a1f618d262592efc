"""Tests for the data loader: order, coverage, cursors, dtypes, column errors and prefetching."""

import threading
import time
from collections.abc import Iterator
from typing import TypeVar

import datasets
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xax.core.errors import DataError
from xax.core.state import Phase
from xax.task.mixins.data_loader import (
    Batch,
    BatchSource,
    Cursor,
    DataLoaderConfig,
    DataLoaderMixin,
    DevicePrefetcher,
    IterableBatchSource,
    MapBatchSource,
    check_columns,
    shuffle_order,
)

NUM_SAMPLES = 103
T = TypeVar("T")


def make_dataset(num_samples: int = NUM_SAMPLES) -> datasets.Dataset:
    """Samples whose "id" column is their index, with a uint8 image and a float32 vector."""
    ids = np.arange(num_samples)
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "image": datasets.Array2D((4, 3), "uint8"),
            "vector": datasets.List(datasets.Value("float32")),
            "flag": datasets.Value("bool"),
        }
    )
    columns = {
        "id": ids,
        "image": (ids[:, None, None] + np.zeros((1, 4, 3), np.int64)).astype(np.uint8),
        "vector": [[float(i), float(-i)] for i in ids],
        "flag": ids % 2 == 0,
    }
    return datasets.Dataset.from_dict(columns, features=features)


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    return make_dataset()


def take(iterator: Iterator[T], count: int) -> list[T]:
    return [next(iterator) for _ in range(count)]


def ids_of(batches: list[Batch]) -> list[list[int]]:
    return [batch["id"].tolist() for batch in batches]


@pytest.mark.parametrize("in_memory_max_mb", [4096, 0])
def test_order_is_a_pure_function_of_seed_and_epoch(dataset: datasets.Dataset, in_memory_max_mb: int) -> None:
    first = MapBatchSource(dataset, 10, seed=3, in_memory_max_mb=in_memory_max_mb)
    second = MapBatchSource(dataset, 10, seed=3, in_memory_max_mb=in_memory_max_mb)
    assert first.in_memory == (in_memory_max_mb > 0)
    first_ids = ids_of(take(iter(first), 25))
    assert first_ids == ids_of(take(iter(second), 25))
    # Each epoch is exactly the permutation the (seed, epoch) pair names.
    for epoch in (0, 1):
        expected = shuffle_order(NUM_SAMPLES, 3, epoch)[:100].reshape(10, 10).tolist()
        assert first_ids[epoch * 10 : (epoch + 1) * 10] == expected
    assert first_ids[:10] != first_ids[10:20]
    other_seed = MapBatchSource(dataset, 10, seed=4, in_memory_max_mb=in_memory_max_mb)
    assert ids_of(take(iter(other_seed), 10)) != first_ids[:10]


def test_training_epochs_cover_every_sample_once(dataset: datasets.Dataset) -> None:
    source = MapBatchSource(dataset, 10, seed=0)
    assert source.num_batches_per_epoch == 10
    stream = iter(source)
    dropped = []
    for epoch in range(3):
        ids = np.concatenate([batch["id"] for batch in take(stream, 10)])
        assert len(ids) == 100
        assert len(set(ids.tolist())) == 100
        assert set(ids.tolist()) <= set(range(NUM_SAMPLES))
        dropped.append(sorted(set(range(NUM_SAMPLES)) - set(ids.tolist())))
        assert source.cursor == Cursor(epoch + 1, 0)
    assert len({tuple(d) for d in dropped}) > 1  # the leftover samples change with the epoch


def test_validation_pass_yields_every_sample_once_in_order(dataset: datasets.Dataset) -> None:
    source = MapBatchSource(dataset, 10, shuffle=False, drop_last=False, repeat=False)
    assert source.num_batches_per_epoch == 11
    batches = list(source)
    assert [len(batch["id"]) for batch in batches] == [10] * 10 + [3]
    assert np.concatenate([batch["id"] for batch in batches]).tolist() == list(range(NUM_SAMPLES))
    assert source.cursor == Cursor(1, 0)
    assert len(list(source)) == 11  # the next iteration is a new full pass


@pytest.mark.parametrize("in_memory_max_mb", [4096, 0])
def test_cursor_restore_reproduces_the_rest_of_the_stream(dataset: datasets.Dataset, in_memory_max_mb: int) -> None:
    source = MapBatchSource(dataset, 10, seed=1, in_memory_max_mb=in_memory_max_mb)
    stream = iter(source)
    take(stream, 17)
    cursor = source.cursor
    assert cursor == Cursor(1, 7)
    rest = take(stream, 15)
    restored = MapBatchSource(dataset, 10, seed=1, in_memory_max_mb=in_memory_max_mb)
    restored.restore(cursor)
    again = take(iter(restored), 15)
    for expected, actual in zip(rest, again, strict=True):
        for name in expected:
            np.testing.assert_array_equal(expected[name], actual[name])
    with pytest.raises(DataError, match="different dataset or batch size"):
        restored.restore(Cursor(0, 11))


@pytest.mark.parametrize("in_memory_max_mb", [4096, 0])
def test_batches_keep_dtypes_and_shapes(dataset: datasets.Dataset, in_memory_max_mb: int) -> None:
    batch = next(iter(MapBatchSource(dataset, 8, in_memory_max_mb=in_memory_max_mb)))
    assert {name: (values.dtype, values.shape) for name, values in batch.items()} == {
        "id": (np.int64, (8,)),
        "image": (np.uint8, (8, 4, 3)),
        "vector": (np.float32, (8, 2)),
        "flag": (np.bool_, (8,)),
    }
    np.testing.assert_array_equal(batch["image"][:, 0, 0], batch["id"].astype(np.uint8))
    np.testing.assert_array_equal(batch["flag"], batch["id"] % 2 == 0)


def test_selected_rows_and_columns(dataset: datasets.Dataset) -> None:
    subset = dataset.filter(lambda row: row["id"] % 3 == 0)
    for in_memory_max_mb in (4096, 0):
        source = MapBatchSource(
            subset, 8, columns=["id"], shuffle=False, drop_last=False, repeat=False, in_memory_max_mb=in_memory_max_mb
        )
        batches = list(source)
        assert all(set(batch) == {"id"} for batch in batches)
        assert np.concatenate([batch["id"] for batch in batches]).tolist() == list(range(0, NUM_SAMPLES, 3))


def test_iterable_dataset_streams_batches(dataset: datasets.Dataset) -> None:
    stream = dataset.to_iterable_dataset(num_shards=4)
    source = IterableBatchSource(stream, 8, columns=["id", "image"], seed=2, shuffle_buffer=16)
    assert source.num_batches_per_epoch is None
    iterator = iter(source)
    epoch0 = take(iterator, 12)
    assert source.cursor == Cursor(1, 0)  # 103 samples make 12 full batches of 8
    assert (epoch0[0]["image"].dtype, epoch0[0]["image"].shape) == (np.uint8, (8, 4, 3))
    ids = np.concatenate([batch["id"] for batch in epoch0]).tolist()
    assert len(set(ids)) == 96
    assert ids != sorted(ids)
    epoch1 = take(iterator, 12)
    assert ids_of(epoch1) != ids_of(epoch0)

    again = IterableBatchSource(stream, 8, columns=["id", "image"], seed=2, shuffle_buffer=16)
    assert ids_of(take(iter(again), 12)) == ids_of(epoch0)
    again.restore(Cursor(1, 5))
    assert ids_of(take(iter(again), 7)) == ids_of(epoch1[5:])


def test_iterable_validation_keeps_the_partial_batch(dataset: datasets.Dataset) -> None:
    stream = dataset.to_iterable_dataset(num_shards=2)
    source = IterableBatchSource(stream, 10, shuffle=False, drop_last=False, repeat=False)
    batches = list(source)
    assert np.concatenate([batch["id"] for batch in batches]).tolist() == list(range(NUM_SAMPLES))
    assert set(batches[0]) == {"id", "image", "vector", "flag"}


def test_missing_column_is_named(dataset: datasets.Dataset) -> None:
    with pytest.raises(DataError, match=r"'pixels' is not in the dataset; available columns: 'id', 'image'"):
        MapBatchSource(dataset, 8, columns=["id", "pixels"])
    with pytest.raises(DataError, match="'pixels'"):
        IterableBatchSource(dataset.to_iterable_dataset(), 8, columns=["pixels"])


def test_ragged_column_is_named() -> None:
    ragged = datasets.Dataset.from_dict({"tokens": [[1, 2, 3], [4, 5], [6, 7, 8]], "label": [0, 1, 0]})
    with pytest.raises(DataError, match=r"column 'tokens' has variable-length values .* fixed shapes"):
        check_columns(ragged, ["tokens"])
    with pytest.raises(DataError, match="'tokens'"):
        MapBatchSource(ragged, 2)
    check_columns(ragged, ["label"])
    streamed = IterableBatchSource(ragged.to_iterable_dataset(), 3, shuffle=False)
    with pytest.raises(DataError, match="column 'tokens' has variable-length values"):
        next(iter(streamed))
    padded = datasets.Dataset.from_dict({"tokens": [[1, 2], [4, 5], [6, 7]]})
    assert next(iter(MapBatchSource(padded, 3)))["tokens"].shape == (3, 2)


def test_text_column_is_refused() -> None:
    text = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match=r"column 'text' holds .*string.* not numbers"):
        MapBatchSource(text, 2)


class ListSource(BatchSource):
    """Batches of consecutive ids, optionally slow, optionally failing after some batches."""

    def __init__(self, num_batches: int | None, *, delay_s: float = 0.0, fail_at: int | None = None) -> None:
        self.limit, self.delay_s, self.fail_at = num_batches, delay_s, fail_at
        self._cursor = Cursor()

    @property
    def num_batches_per_epoch(self) -> int | None:
        return self.limit

    def __iter__(self) -> Iterator[Batch]:
        index = self._cursor.index
        while self.limit is None or index < self.limit:
            if index == self.fail_at:
                raise DataError("broken sample in shard 3")
            time.sleep(self.delay_s)
            index += 1
            self._cursor = Cursor(0, index)
            yield {"id": np.arange(8, dtype=np.int32) + 8 * index}


def data_sharding() -> NamedSharding:
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def test_prefetcher_shards_batches_over_the_data_axis(dataset: datasets.Dataset) -> None:
    assert len(jax.devices()) >= 4
    sharding = data_sharding()
    expected = take(iter(MapBatchSource(dataset, 8, seed=5)), 4)
    with DevicePrefetcher(MapBatchSource(dataset, 8, seed=5), sharding, depth=2) as prefetcher:
        batches = take(prefetcher, 3)
        time.sleep(0.1)  # the worker runs ahead; the cursor must follow the consumer
        assert prefetcher.cursor == Cursor(0, 3)
        batches.append(next(prefetcher))
    for want, got in zip(expected, batches, strict=True):
        image = got["image"]
        assert isinstance(image, jax.Array)
        assert image.dtype == np.uint8
        assert image.sharding == sharding
        assert sorted(shard.data.shape for shard in image.addressable_shards) == [(2, 4, 3)] * 4
        np.testing.assert_array_equal(np.asarray(image), want["image"])


def test_prefetcher_accepts_a_placement_function() -> None:
    def place(batch: Batch) -> dict[str, jax.Array]:
        return {name: jax.device_put(values, jax.devices()[1]) for name, values in batch.items()}

    with DevicePrefetcher(ListSource(3), place) as prefetcher:
        batches = list(prefetcher)
    assert [batch["id"].devices() for batch in batches] == [{jax.devices()[1]}] * 3
    assert prefetcher.cursor == Cursor(0, 3)


def test_prefetcher_reraises_worker_errors() -> None:
    prefetcher = DevicePrefetcher(ListSource(None, fail_at=2), data_sharding())
    take(prefetcher, 2)
    with pytest.raises(DataError, match="broken sample in shard 3"):
        next(prefetcher)
    prefetcher.close()


def test_close_returns_promptly_with_a_full_queue() -> None:
    prefetcher = DevicePrefetcher(ListSource(None), data_sharding(), depth=1)
    next(prefetcher)
    time.sleep(0.2)  # the worker is now blocked on the full queue
    start = time.perf_counter()
    prefetcher.close()
    prefetcher.close()
    assert time.perf_counter() - start < 1.0
    assert not any(thread.name == "xax-data-prefetch" and thread.is_alive() for thread in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        next(prefetcher)


def test_wait_time_grows_when_the_source_is_slow() -> None:
    with DevicePrefetcher(ListSource(4, delay_s=0.05), data_sharding()) as slow:
        assert len(list(slow)) == 4
    assert slow.wait_time_s >= 0.15
    with DevicePrefetcher(ListSource(2), data_sharding()) as fast:
        time.sleep(0.2)
        assert len(list(fast)) == 2
    assert fast.wait_time_s < 0.05


class SplitTask(DataLoaderMixin[DataLoaderConfig]):
    def __init__(self, config: DataLoaderConfig, data: datasets.DatasetDict | datasets.IterableDataset) -> None:
        super().__init__(config)
        self.data = data

    def get_dataset(self, phase: Phase) -> datasets.DatasetDict | datasets.IterableDataset:
        return self.data

    def batch_columns(self) -> list[str]:
        return ["id", "image"]


def test_mixin_picks_splits_and_batch_sizes(dataset: datasets.Dataset) -> None:
    splits = datasets.DatasetDict({"train": dataset, "test": make_dataset(11)})
    task = SplitTask(DataLoaderConfig(batch_size=8, valid_batch_size=5), splits)
    train = task.get_batch_source("train", seed=0)
    assert isinstance(train, MapBatchSource)
    assert (train.shuffle, train.drop_last, train.repeat) == (True, True, True)
    assert train.num_batches_per_epoch == NUM_SAMPLES // 8
    assert set(next(iter(train))) == {"id", "image"}
    valid = task.get_batch_source("valid", seed=0)
    assert [len(batch["id"]) for batch in valid] == [5, 5, 1]

    no_valid = SplitTask(DataLoaderConfig(), datasets.DatasetDict({"train": dataset}))
    with pytest.raises(DataError, match=r"get_dataset\('valid'\) returned splits \['train'\]"):
        no_valid.get_batch_source("valid", seed=0)

    streamed = SplitTask(DataLoaderConfig(batch_size=4), dataset.to_iterable_dataset())
    assert isinstance(streamed.get_batch_source("train", seed=0), IterableBatchSource)
