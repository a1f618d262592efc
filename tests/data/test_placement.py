"""Each process's rows of a global batch: what the sources read and how a batch is placed."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.task.toy import regression_dataset
from xax.data import (
    Cursor,
    IterableBatchSource,
    MapBatchSource,
    ProcessRows,
    batch_sharding,
    place_global_batch,
    process_rows,
)
from xax.parallel.mesh import make_mesh
from xax.parallel.plan import batch_spec


def second_quarter(size: int) -> slice:
    return slice(size // 4, size // 2)


def test_map_source_reads_only_the_kept_rows_in_the_same_order() -> None:
    dataset = regression_dataset(100, seed=0)
    whole = MapBatchSource(dataset, 16, seed=3)
    part = MapBatchSource(dataset, 16, seed=3)
    part.keep_rows(second_quarter)
    part.restore(Cursor(0, 4))
    whole.restore(Cursor(0, 4))
    for expected, got in zip(list(iter_n(whole, 5)), list(iter_n(part, 5)), strict=True):
        assert isinstance(got, ProcessRows) and got.global_size == 16
        np.testing.assert_array_equal(got["x"], expected["x"][4:8])
        np.testing.assert_array_equal(got["y"], expected["y"][4:8])
    assert part.cursor == whole.cursor == Cursor(1, 3)


def test_unsplit_last_batch_is_read_whole_when_the_rule_says_so() -> None:
    source = MapBatchSource(regression_dataset(35, seed=1), 16, shuffle=False, drop_last=False, repeat=False)
    source.keep_rows(lambda size: second_quarter(size) if size % 4 == 0 else slice(0, size))
    sizes = [(len(batch["x"]), batch.global_size) for batch in source if isinstance(batch, ProcessRows)]
    assert sizes == [(4, 16), (4, 16), (3, 3)]


def test_streamed_source_keeps_the_same_rows() -> None:
    stream = regression_dataset(48, seed=2).to_iterable_dataset()
    whole = list(iter_n(IterableBatchSource(stream, 16, shuffle=False), 3))
    part_source = IterableBatchSource(stream, 16, shuffle=False)
    part_source.keep_rows(second_quarter)
    for expected, got in zip(whole, iter_n(part_source, 3), strict=True):
        assert isinstance(got, ProcessRows) and got.global_size == 16
        np.testing.assert_array_equal(got["x"], expected["x"][4:8])


def iter_n(source: MapBatchSource | IterableBatchSource, count: int) -> list[dict[str, np.ndarray]]:
    batches = iter(source)
    return [next(batches) for _ in range(count)]


def test_batch_partition_is_the_step_batch_spec() -> None:
    mesh = make_mesh(jax.devices()[:4], data=2, fsdp=2, tensor=1)
    assert batch_sharding(mesh).spec == batch_spec(mesh) == batch_spec()
    assert batch_sharding(Mesh(np.array(jax.devices()[:2]), ("data",))).spec == PartitionSpec("data")


def test_one_process_places_whole_batches() -> None:
    mesh = make_mesh(jax.devices()[:4], data=4)
    assert process_rows(mesh, 8) == slice(0, 8)
    batch = {"x": np.arange(16, dtype=np.float32).reshape(8, 2)}
    placed = place_global_batch(batch, mesh)
    assert placed["x"].sharding == NamedSharding(mesh, batch_spec())
    np.testing.assert_array_equal(np.asarray(placed["x"]), batch["x"])
    short = place_global_batch({"x": batch["x"][:3]}, mesh)
    assert short["x"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(short["x"]), batch["x"][:3])
