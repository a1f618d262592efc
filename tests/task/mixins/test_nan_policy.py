"""Non-finite losses: halt, skip and rewind, each with an injected NaN."""

import logging
import re
import time
from pathlib import Path
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xax
from tests.task.toy import Regression, RegressionConfig, final_params, read_jsonl, regression_dataset
from xax.checkpoint import checkpoint_steps, load_arrays_anywhere
from xax.core.health import Health, NonfiniteCause
from xax.data import shuffle_order

POISONED_ROW = 100
# The step (1-based) whose batch holds the poisoned row in epoch 0 (batch 32, 512 rows, seed 0).
POISONED_STEP = int(np.argwhere(shuffle_order(512, 0, 0) == POISONED_ROW)[0, 0]) // 32 + 1


# The task of the latest launch() (launch returns the final state, not the task).
LAUNCHED: list["Poisoned"] = []


class Poisoned(Regression):
    def on_run_start(self) -> None:
        LAUNCHED[:] = [self]
        super().on_run_start()

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        num, seed = (self.config.num_train, 0) if phase == "train" else (self.config.num_valid, 1)
        dataset = regression_dataset(num, seed)
        if phase != "train":
            return dataset
        data = dataset.with_format("numpy")[:]
        data["x"][POISONED_ROW] = np.nan
        return datasets.Dataset.from_dict(data)


class LateAlert(Poisoned):
    """The host learns of the non-finite step seconds late, after later checkpoints are saved."""

    def on_health(self, state: xax.State, health: Health) -> None:
        if not health.ok:
            time.sleep(5.0)
        super().on_health(state, health)


def launch(tmp_path: Path, policy: str, *overrides: str, task: type[Poisoned] = Poisoned) -> Poisoned:
    LAUNCHED.clear()
    task.launch(
        RegressionConfig(batch_size=32, max_steps=16, valid_every_n_steps=None),
        argv=[
            f"artifacts.run_dir={tmp_path}",
            f"nan.policy={policy}",
            "log.every_n_steps=1",
            "log.stdout=false",
            "log.tensorboard=false",
            "checkpoint.every_n_steps=2",
            *overrides,
        ],
    )
    return LAUNCHED[0]


def all_finite(tree: object) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))


def assert_every_checkpoint_finite(run_dir: Path) -> None:
    sharding = jax.sharding.make_single_device_sharding(jax.devices()[0])
    for step in checkpoint_steps(run_dir / "checkpoints"):
        assert all_finite(load_arrays_anywhere(run_dir / "checkpoints", step, sharding)["params"]), step


def test_poisoned_step_is_inside_the_run() -> None:
    assert 3 <= POISONED_STEP <= 14


def test_halt_names_the_step_and_the_last_good_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, "halt")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert f"non-finite loss at step {POISONED_STEP}" in err
    before = max(step for step in checkpoint_steps(tmp_path / "checkpoints") if step < POISONED_STEP)
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / str(before)}" in err


def test_skip_continues_without_applying_the_update(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        task = launch(tmp_path, "skip")
    assert all_finite(final_params(task).params)
    assert f"non-finite loss at step {POISONED_STEP}" in caplog.text
    losses = {r["step"]: r["scalars"]["loss"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train"}
    assert losses[POISONED_STEP] == "nan"
    assert all(np.isfinite(v) for step, v in losses.items() if step != POISONED_STEP)


def test_skip_halts_after_too_many_in_a_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, "skip", "nan.max_consecutive=1")
    assert exit_info.value.code == 1
    assert "nan.max_consecutive=1" in capsys.readouterr().err


def test_rewind_restores_and_skips_the_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        task = launch(tmp_path, "rewind")
    assert "rewinding to" in caplog.text
    assert f"(step {POISONED_STEP}), which gave a non-finite step" in caplog.text
    assert all_finite(final_params(task).params)
    steps = [r["step"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train"]
    assert steps[-1] == 16


def test_rewind_goes_back_past_checkpoints_saved_after_the_bad_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        task = launch(tmp_path, "rewind", task=LateAlert)
    before = (POISONED_STEP - 1) // 2 * 2  # the newest checkpoint (every 2 steps) before the bad step
    assert f"rewinding to {tmp_path / 'checkpoints' / str(before)} and skipping that batch" in caplog.text
    # Those saved while the alert was on its way (the last step waits for it before its own save).
    (deleted,) = re.findall(
        r"Deleted the checkpoints of steps \[([\d, ]+)\], which the rewound run replaces", caplog.text
    )
    assert [int(step) for step in deleted.split(", ")] == list(range(before + 2, 16, 2))
    assert f"(step {POISONED_STEP}), which gave a non-finite step" in caplog.text
    assert all_finite(final_params(task).params)
    # The rewound run saved its own checkpoints in place of the deleted ones, up to the last step.
    assert checkpoint_steps(tmp_path / "checkpoints")[-1] == 16
    steps = [r["step"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train"]
    assert steps[-1] == 16


def test_clean_data_raises_no_alert(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        state = Regression.launch(
            RegressionConfig(batch_size=32, max_steps=4),
            argv=[f"artifacts.run_dir={tmp_path}", "log.every_n_steps=1", "log.stdout=false", "nan.policy=halt"],
        )
    assert state.num_steps == 4
    assert "non-finite" not in caplog.text


ORDER = shuffle_order(512, 0, 0)


class TwoBadBatches(Regression):
    """NaN rows in the batches of steps 5 and 6: after skipping the first, the second lands on step 5."""

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        dataset = regression_dataset(*((self.config.num_train, 0) if phase == "train" else (self.config.num_valid, 1)))
        if phase != "train":
            return dataset
        data = dataset.with_format("numpy")[:]
        data["x"][ORDER[4 * 32]] = np.nan
        data["x"][ORDER[5 * 32]] = np.nan
        return datasets.Dataset.from_dict(data)


def test_rewind_skips_each_bad_batch_once_by_its_data_position(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Skipping by step number replayed the first bad batch after the second rewind, forever.
    with caplog.at_level(logging.WARNING):
        state = TwoBadBatches.launch(
            RegressionConfig(batch_size=32, max_steps=12, valid_every_n_steps=None),
            argv=[
                f"artifacts.run_dir={tmp_path}",
                "nan.policy=rewind",
                "log.every_n_steps=1",
                "log.stdout=false",
                "log.tensorboard=false",
                "checkpoint.every_n_steps=4",
                "log.every_n_seconds=null",
            ],
        )
    assert state.num_steps == 12
    assert caplog.text.count("rewinding to") == 2
    assert "Skipping the batch at epoch 0, batch 4 " in caplog.text
    assert "Skipping the batch at epoch 0, batch 5 " in caplog.text
    params = jax.tree.leaves(
        load_arrays_anywhere(tmp_path / "checkpoints", 12, jax.sharding.make_single_device_sharding(jax.devices()[0]))[
            "params"
        ]
    )
    assert all_finite(params)


class LearningRateBlowsUp(Regression):
    """A finite run until the 6th update, whose learning rate (1e38) makes the weights infinite."""

    def get_optimizer(self) -> optax.GradientTransformation:
        def learning_rate(count: Any) -> Any:
            return jnp.where(count >= 5, jnp.float32(1e38), jnp.float32(0.05))

        return optax.sgd(learning_rate)


def test_rewind_is_bounded_when_no_batch_is_the_cause(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        LearningRateBlowsUp.launch(
            RegressionConfig(batch_size=32, max_steps=40, valid_every_n_steps=None),
            argv=[
                f"artifacts.run_dir={tmp_path}",
                "nan.policy=rewind",
                "nan.max_rewinds=3",
                "log.every_n_steps=1",
                "log.stdout=false",
                "log.tensorboard=false",
                "checkpoint.every_n_steps=2",
                "log.every_n_seconds=null",
            ],
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nan.max_rewinds=3" in err
    # The 6th update leaves huge but finite weights; the loss of step 7 overflows, whatever its batch.
    assert "non-finite loss at step 7" in err
    assert "the cause is not the data; lower the learning rate" in err
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / '6'}" in err
    assert_every_checkpoint_finite(tmp_path)


def test_nan_learning_rate_never_reaches_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The loss and gradient of step 1 are finite; its update is not. Before, the weights became NaN,
    # were saved, and that checkpoint was called the last good one.
    with pytest.raises(SystemExit) as exit_info:
        Regression.launch(
            RegressionConfig(batch_size=32, max_steps=8, valid_every_n_steps=None),
            argv=[
                f"artifacts.run_dir={tmp_path}",
                "learning_rate=nan",
                "nan.policy=halt",
                "log.every_n_steps=4",
                "log.stdout=false",
                "log.tensorboard=false",
                "checkpoint.every_n_steps=2",
                "log.every_n_seconds=null",
            ],
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "update made weight non-finite (check the learning rate) at step 1 (4 step(s) skipped)" in err
    assert "last good checkpoint: none" in err
    assert_every_checkpoint_finite(tmp_path)


def test_a_pending_alert_is_merged_not_replaced() -> None:
    task = Regression(RegressionConfig(batch_size=32))
    first = Health(nonfinite_steps=1, first_step=2, first_cause=NonfiniteCause.LOSS, first_leaf=0, max_streak=1)
    second = Health(nonfinite_steps=1, first_step=3, first_cause=NonfiniteCause.LOSS, first_leaf=0, max_streak=2)
    task.on_health(xax.State(num_steps=2), first)
    task.on_health(xax.State(num_steps=3), second)
    alert = task._take_alert()
    assert alert is not None
    assert (alert.first_step, alert.nonfinite_steps, alert.max_streak) == (2, 2, 2)
    assert task._take_alert() is None
