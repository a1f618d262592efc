"""The device prefetcher: placement, cursor, errors, shutdown and wait time."""

import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.data.toy import make_dataset, take
from xax.core.errors import DataError
from xax.data import Batch, BatchSource, Cursor, DevicePrefetcher, MapBatchSource


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


def test_prefetcher_shards_batches_over_the_data_axis() -> None:
    dataset = make_dataset()
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
