"""ArrayRecord shards with a manifest: a round trip through Grain, exact resume from the cursor, and a
one-line error naming the file when a shard is missing or truncated."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_resume import assert_bitwise_equal, saved
from xax.core.errors import DataError
from xax.data import BatchSource, make_batch_source, read_manifest, read_records, write_records

NUM = 50


def columns() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "latent": rng.normal(size=(NUM, 2, 3, 3)).astype(np.float32),
        "label": rng.integers(0, 10, NUM).astype(np.int32),
        "index": np.arange(NUM, dtype=np.int64),
    }


def test_records_round_trip_bitwise_over_shards(tmp_path: Path) -> None:
    values = columns()
    manifest = write_records(tmp_path, "train", values, num_shards=3, metadata={"scale": 0.5})
    assert sorted(p.name for p in tmp_path.glob("*.array_record")) == [
        f"train-{i:05d}-of-00003.array_record" for i in range(3)
    ]
    assert json.loads(manifest.read_text())["metadata"] == {"scale": 0.5}
    assert [shard["records"] for shard in read_manifest(tmp_path, "train")["shards"]] == [17, 17, 16]
    dataset = read_records(tmp_path, "train")
    assert len(dataset) == NUM
    for i in (0, 16, 17, 49):
        element = dataset[i]
        for name, array in values.items():
            assert element[name].dtype == array.dtype and element[name].tobytes() == array[i].tobytes()


def test_a_resumed_stream_reads_exactly_the_records_of_a_straight_one(tmp_path: Path) -> None:
    write_records(tmp_path, "train", columns(), num_shards=2)

    def source() -> BatchSource:
        return make_batch_source(read_records(tmp_path, "train"), "train", 8, seed=5)

    straight = iter(source())
    expected = [next(straight) for _ in range(14)]  # over two epochs of 6 batches
    first = source()
    batches = iter(first)
    got = [next(batches) for _ in range(9)]
    resumed = source()
    resumed.restore(saved(first.cursor))
    batches = iter(resumed)
    got += [next(batches) for _ in range(5)]
    assert_bitwise_equal(expected, got)


def test_a_missing_or_truncated_shard_is_named(tmp_path: Path) -> None:
    write_records(tmp_path, "train", columns(), num_shards=2)
    shard = tmp_path / "train-00001-of-00002.array_record"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        read_records(tmp_path, "train")
    assert str(info.value).startswith(f"ArrayRecord shard {shard} has {len(data) // 2} bytes, {len(data)} when written")
    assert "\n" not in str(info.value)
    shard.unlink()
    with pytest.raises(DataError, match=f"ArrayRecord shard {shard} is missing"):
        read_records(tmp_path, "train")
    with pytest.raises(DataError, match=r"valid\.json does not exist"):
        read_records(tmp_path, "valid")


def test_a_shard_damaged_in_place_is_named(tmp_path: Path) -> None:
    # The same size, but the bytes changed: the reader's own checksum fails, and the error names the shard.
    write_records(tmp_path, "train", columns(), num_shards=2)
    shard = tmp_path / "train-00001-of-00002.array_record"
    data = bytearray(shard.read_bytes())
    data[100:400] = bytes(300)
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"ArrayRecord shard {shard} cannot be read"):
        [read_records(tmp_path, "train")[i] for i in range(NUM)]
