"""The data loader mixin: splits, batch sizes and source kinds from a task's dataset, and exact resume
of a training run on a Grain dataset."""

from dataclasses import dataclass
from pathlib import Path

import datasets
import grain
import jax
import numpy as np
import pytest

import xax
from tests.data.test_grain import elements
from tests.data.toy import NUM_SAMPLES, make_dataset
from tests.task.toy import RegressionBase, RegressionConfig, final_params, read_jsonl
from xax.core.errors import DataError
from xax.core.state import Phase
from xax.data import IterableBatchSource, MapBatchSource
from xax.task.mixins.data_loader import DataLoaderConfig, DataLoaderMixin


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    return make_dataset()


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
