"""Batch sources: order, coverage, cursors, dtypes and column errors."""

import datasets
import numpy as np
import pytest

from tests.data.toy import NUM_SAMPLES, ids_of, make_dataset, take
from xax.core.errors import DataError
from xax.data import Cursor, IterableBatchSource, MapBatchSource, check_columns, shuffle_order


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    return make_dataset()


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
