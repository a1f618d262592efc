"""Stopping a batch stream mid-epoch and resuming it from the saved cursor gives, bit for bit, the
batches of a straight pass: for a Hugging Face dataset (in memory, read from Arrow, streamed), for a
Grain dataset, and through the device prefetcher, with no Task involved."""

import json
from collections.abc import Callable

import datasets
import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from xax.data import BatchSource, Cursor, DevicePrefetcher, batch_sharding, make_batch_source

NUM_ROWS = 90
BATCH_SIZE = 8  # 11 full batches an epoch, 2 rows dropped
TOTAL_BATCHES = 30  # a little under three epochs
STOP_AFTER = (5, 11, 16)  # mid-epoch, exactly at an epoch's end, mid-epoch of the second


def columns() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "id": np.arange(NUM_ROWS, dtype=np.int64),
        "x": rng.normal(size=(NUM_ROWS, 3)).astype(np.float32),
        "image": rng.integers(0, 256, size=(NUM_ROWS, 2, 2), dtype=np.uint8),
    }


def hf_dataset() -> datasets.Dataset:
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "x": datasets.List(datasets.Value("float32"), length=3),
            "image": datasets.Array2D((2, 2), "uint8"),
        }
    )
    return datasets.Dataset.from_dict(columns(), features=features)


def grain_dataset() -> grain.MapDataset:
    values = columns()
    return grain.MapDataset.source([{name: array[i] for name, array in values.items()} for i in range(NUM_ROWS)])


SOURCES: dict[str, Callable[[], BatchSource]] = {
    "in_memory": lambda: make_batch_source(hf_dataset(), "train", BATCH_SIZE, seed=3),
    "arrow": lambda: make_batch_source(hf_dataset(), "train", BATCH_SIZE, seed=3, in_memory_max_mb=0),
    "streamed": lambda: make_batch_source(
        hf_dataset().to_iterable_dataset(num_shards=3), "train", BATCH_SIZE, seed=3, shuffle_buffer=16
    ),
    "grain": lambda: make_batch_source(grain_dataset(), "train", BATCH_SIZE, seed=3),
}


def straight_pass(make: Callable[[], BatchSource]) -> list[dict[str, np.ndarray]]:
    batches = iter(make())
    return [next(batches) for _ in range(TOTAL_BATCHES)]


def saved(cursor: Cursor) -> Cursor:
    """The cursor as a checkpoint stores it: through JSON and back."""
    return Cursor.from_dict(json.loads(json.dumps(cursor.to_dict())))


def assert_bitwise_equal(expected: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        assert sorted(have) == sorted(want)
        for name in want:
            assert have[name].dtype == want[name].dtype and have[name].shape == want[name].shape
            assert have[name].tobytes() == want[name].tobytes(), name


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_resumed_stream_equals_a_straight_pass(kind: str) -> None:
    make = SOURCES[kind]
    expected = straight_pass(make)
    if kind != "streamed":
        assert {name: batch.dtype for name, batch in expected[0].items()} == {
            "id": np.int64,
            "x": np.float32,
            "image": np.uint8,
        }
    # Epoch orders differ, so resuming at the wrong epoch or position could not pass unnoticed.
    assert expected[0]["id"].tolist() != expected[11]["id"].tolist()
    for stop in STOP_AFTER:
        first = make()
        batches = iter(first)
        got = [next(batches) for _ in range(stop)]
        cursor = saved(first.cursor)
        assert cursor == Cursor(stop // 11, stop % 11)
        del first, batches  # the stopped run is gone; only its cursor is left
        resumed = make()
        resumed.restore(cursor)
        batches = iter(resumed)
        got += [next(batches) for _ in range(TOTAL_BATCHES - stop)]
        assert_bitwise_equal(expected, got)


@pytest.mark.parametrize("kind", ["in_memory", "grain"])
def test_prefetcher_cursor_resumes_where_the_consumer_stopped(kind: str) -> None:
    make = SOURCES[kind]
    # On the devices, without x64, int64 columns are int32 (the ids fit); the rest keep their dtypes.
    expected = [
        {name: values.astype(jax.dtypes.canonicalize_dtype(values.dtype)) for name, values in batch.items()}
        for batch in straight_pass(make)
    ]
    sharding = batch_sharding(Mesh(np.array(jax.devices()[:4]), ("data",)))
    got: list[dict[str, np.ndarray]] = []
    with DevicePrefetcher(make(), sharding, depth=3) as prefetcher:
        for _ in range(13):
            got.append({name: np.asarray(values) for name, values in next(prefetcher).items()})
        cursor = saved(prefetcher.cursor)  # the worker has run ahead; the cursor has not
    assert cursor == Cursor(1, 2)
    source = make()
    source.restore(cursor)
    with DevicePrefetcher(source, sharding, depth=3) as prefetcher:
        for _ in range(TOTAL_BATCHES - 13):
            got.append({name: np.asarray(values) for name, values in next(prefetcher).items()})
    assert_bitwise_equal(expected, got)
