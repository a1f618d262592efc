"""Guarantees that only show in runs shaped like real use: cadences past their first firing,
media hooks that return nothing, non-finite values that no single batch causes."""

from pathlib import Path

from jaxtyping import Array

import xax
from tests.task.toy import Regression, RegressionConfig

QUIET = ["log.stdout=false", "log.tensorboard=false", "compile.cache=false", "log.every_n_seconds=null"]


class EmptyMedia(Regression):
    """A task whose media hook runs but, at this cadence, has nothing to show."""

    calls = 0

    def compute_media(self, model: object, batch: dict[str, Array], output: Array, state: xax.State) -> dict:
        type(self).calls += 1
        return {}


class NoMedia(Regression):
    """The README's kind of task: no media hook at all."""

    heavy_passes = 0
    compute_media = xax.SupervisedTask.compute_media  # as if never overridden

    def log_heavy(self, ts: xax.TrainState, state: xax.State) -> None:
        type(self).heavy_passes += 1
        super().log_heavy(ts, state)


def test_empty_media_keeps_its_cadence(tmp_path: Path) -> None:
    # Before, an empty media dict left the cadence due, so every later step ran a media pass.
    EmptyMedia.calls = 0
    argv = [f"artifacts.run_dir={tmp_path}", *QUIET, "max_steps=100", "log.heavy_every_n_steps=10"]
    EmptyMedia.launch(RegressionConfig(batch_size=32), argv=[*argv, "log.heavy_every_n_seconds=null"])
    assert EmptyMedia.calls == 10  # steps 10, 20, ..., 100 (the last one also being the end)


def test_task_without_media_never_runs_a_media_pass(tmp_path: Path) -> None:
    NoMedia.heavy_passes = 0
    argv = [f"artifacts.run_dir={tmp_path}", *QUIET, "max_steps=50", "log.heavy_every_n_steps=5"]
    state = NoMedia.launch(RegressionConfig(batch_size=32), argv=argv)
    assert state.num_steps == 50
    assert NoMedia.heavy_passes == 0


class WithMedia(Regression):
    heavy_passes = 0

    def log_heavy(self, ts: xax.TrainState, state: xax.State) -> None:
        type(self).heavy_passes += 1
        super().log_heavy(ts, state)


def test_media_task_logs_at_its_cadence(tmp_path: Path) -> None:
    WithMedia.heavy_passes = 0
    argv = [f"artifacts.run_dir={tmp_path}", *QUIET, "max_steps=50", "log.heavy_every_n_steps=5", "media=true"]
    WithMedia.launch(RegressionConfig(batch_size=32), argv=[*argv, "log.heavy_every_n_seconds=null"])
    assert WithMedia.heavy_passes == 10
