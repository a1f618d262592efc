"""A Grain MapDataset as a data source: batches, order, errors, and exact resume."""

from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

import xax
from tests.task.toy import WEIGHTS, RegressionBase, RegressionConfig, final_params, read_jsonl
from xax.core.errors import DataError
from xax.task.grain_source import GrainBatchSource
from xax.task.mixins.data_loader import Cursor, shuffle_order


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


@dataclass
class GrainConfig(RegressionConfig):
    pass


class GrainRegression(RegressionBase[GrainConfig]):
    def get_dataset(self, phase: xax.Phase) -> grain.MapDataset:  # ty: ignore[incompatible-method-override]
        return elements(256 if phase == "train" else 64)


def test_training_on_grain_resumes_exactly(tmp_path: Path) -> None:
    argv = ["log.stdout=false", "log.every_n_steps=1", "checkpoint.every_n_steps=6", "valid_every_n_steps=null"]
    tasks: list[GrainRegression] = []

    class Recorded(GrainRegression):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    Recorded.launch(GrainConfig(batch_size=32, max_steps=12), argv=[f"artifacts.run_dir={tmp_path / 'a'}", *argv])
    Recorded.launch(GrainConfig(batch_size=32, max_steps=6), argv=[f"artifacts.run_dir={tmp_path / 'b'}", *argv])
    Recorded.launch(
        GrainConfig(batch_size=32, max_steps=12), argv=[f"artifacts.run_dir={tmp_path / 'b'}", "resume=auto", *argv]
    )
    losses_a = [r["scalars"]["loss"] for r in read_jsonl(tmp_path / "a" / "log.jsonl") if r["phase"] == "train"]
    losses_b = [r["scalars"]["loss"] for r in read_jsonl(tmp_path / "b" / "log.jsonl") if r["phase"] == "train"]
    assert losses_a == losses_b
    assert losses_a[-1] < losses_a[0]
    for a, b in zip(jax.tree.leaves(final_params(tasks[0])), jax.tree.leaves(final_params(tasks[2])), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
