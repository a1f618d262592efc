"""A Grain MapDataset as a data source: batches, order and errors."""

import grain
import numpy as np
import pytest

from tests.task.toy import WEIGHTS
from xax.core.errors import DataError
from xax.data import Cursor, GrainBatchSource, shuffle_order


def elements(num: int) -> grain.MapDataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num, 4)).astype(np.float32)
    y = (x @ WEIGHTS).astype(np.float32)
    return grain.MapDataset.source([{"x": x[i], "y": y[i]} for i in range(num)])


def test_batches_follow_the_seeded_order() -> None:
    source = GrainBatchSource(elements(64), 16, seed=3)
    batch = next(iter(source))
    order = shuffle_order(64, 3, 0)
    dataset = elements(64)
    expected = np.stack([dataset[int(i)]["x"] for i in order[:16]])  # ty: ignore[not-subscriptable]
    np.testing.assert_array_equal(batch["x"], expected)
    assert source.cursor == Cursor(0, 1)


def test_missing_and_ragged_columns_are_named() -> None:
    with pytest.raises(DataError, match="column 'z'"):
        GrainBatchSource(elements(32), 8, columns=["x", "z"])
    ragged = grain.MapDataset.source([{"x": np.zeros(i % 3 + 1, np.float32)} for i in range(16)])
    with pytest.raises(DataError, match="column 'x' is ragged"):
        list(GrainBatchSource(ragged, 8, shuffle=False, repeat=False))
