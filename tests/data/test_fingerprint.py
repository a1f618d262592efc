"""Dataset fingerprints: equal for the same data, different when a sampled row or the size changes."""

import datasets
import grain
import numpy as np

from xax.data.fingerprint import SAMPLED_ROWS, UNKNOWN_CONTENT, dataset_fingerprint


def rows(num: int, *, changed: int | None = None) -> list[dict[str, np.ndarray]]:
    values = [{"x": np.full(3, i, np.float32), "y": np.array(i % 10, np.int32)} for i in range(num)]
    if changed is not None:
        values[changed]["x"][0] = -1.0
    return values


def test_a_grain_dataset_is_fingerprinted_by_its_size_and_sampled_rows() -> None:
    a = dataset_fingerprint(grain.MapDataset.source(rows(100)))
    assert a == dataset_fingerprint(grain.MapDataset.source(rows(100)))
    assert a["kind"] == "grain.MapDataset" and a["rows"] == 100
    assert a["sampled_rows"][0] == 0 and a["sampled_rows"][-1] == 99 and len(a["sampled_rows"]) == SAMPLED_ROWS
    sampled, unsampled = a["sampled_rows"][3], a["sampled_rows"][3] + 1
    assert dataset_fingerprint(grain.MapDataset.source(rows(100, changed=sampled))) != a
    # A row between the sampled ones is not read: the fingerprint is cheap, not a checksum.
    assert dataset_fingerprint(grain.MapDataset.source(rows(100, changed=unsampled))) == a
    assert dataset_fingerprint(grain.MapDataset.source(rows(101)))["sample_sha256"] != a["sample_sha256"]


def test_a_hugging_face_dataset_uses_its_own_fingerprint_and_splits_are_named() -> None:
    train = datasets.Dataset.from_dict({"x": np.arange(12, dtype=np.float32)})
    test = datasets.Dataset.from_dict({"x": np.arange(5, dtype=np.float32)})
    found = dataset_fingerprint(datasets.DatasetDict({"train": train, "test": test}))
    assert found["splits"]["train"] == {
        "kind": "datasets.Dataset",
        "fingerprint": train._fingerprint,
        "rows": 12,
        "features": {"x": "Value('float32')"},
    }
    assert found["splits"]["test"]["rows"] == 5


def test_a_stream_is_not_read_and_says_its_content_is_unknown() -> None:
    def generate() -> object:
        raise AssertionError("the stream was read")
        yield {}

    stream = datasets.IterableDataset.from_generator(generate)
    found = dataset_fingerprint(stream)
    assert found["kind"] == "datasets.IterableDataset" and found["content"] == UNKNOWN_CONTENT
    assert found["shards"] == 1
