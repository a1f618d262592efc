"""Checkpoints: exact resume, restore across device counts, retention, corruption, warm start."""

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from tests.task.toy import Digits, DigitsConfig, Regression, RegressionConfig, final_params, read_jsonl
from xax.checkpoint import checkpoint_steps, read_metadata


def launch_digits(run_dir: Path, *overrides: str, max_steps: int = 20) -> Digits:
    tasks: list[Digits] = []

    class Recorded(Digits):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    Recorded.launch(
        DigitsConfig(batch_size=32, max_steps=max_steps, valid_every_n_steps=5),
        argv=[
            f"artifacts.run_dir={run_dir}",
            "log.every_n_steps=1",
            "log.every_n_seconds=null",
            "log.stdout=false",
            "log.tensorboard=false",
            "checkpoint.every_n_steps=10",
            *overrides,
        ],
    )
    return tasks[0]


def losses(run_dir: Path, phase: str) -> list[tuple[int, float]]:
    records = read_jsonl(run_dir / "log.jsonl")
    return [(r["step"], r["scalars"]["loss"]) for r in records if r.get("phase") == phase]


def assert_trees_equal(a: object, b: object) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stop_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    straight = launch_digits(tmp_path / "straight", max_steps=20)
    launch_digits(tmp_path / "resumed", max_steps=10)
    resumed = launch_digits(tmp_path / "resumed", "resume=auto", max_steps=20)
    assert_trees_equal(final_params(straight), final_params(resumed))
    assert losses(tmp_path / "straight", "train") == losses(tmp_path / "resumed", "train")
    assert losses(tmp_path / "straight", "valid") == losses(tmp_path / "resumed", "valid")
    assert checkpoint_steps(tmp_path / "resumed" / "checkpoints") == [10, 20]


@pytest.mark.parametrize(("saved_on", "restored_on"), [(1, 4), (4, 1)])
def test_restore_on_another_device_count(tmp_path: Path, saved_on: int, restored_on: int) -> None:
    kind = "launcher.kind=multi_device"
    saved = launch_digits(tmp_path, kind, f"launcher.num_devices={saved_on}", max_steps=10)
    restored = launch_digits(tmp_path, kind, f"launcher.num_devices={restored_on}", "resume=auto", max_steps=10)
    assert_trees_equal(final_params(saved), final_params(restored))
    assert final_params(restored).params.conv.weight.sharding.mesh.devices.size == restored_on


def test_retention_keeps_last_and_best_in_numeric_order(tmp_path: Path) -> None:
    # Checkpoints every 2 steps to step 24 (steps 2..24: 10 sorts after 8 only numerically).
    launch_digits(
        tmp_path,
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=2",
        "checkpoint.keep_best=1",
        "checkpoint.best_metric=loss",
        max_steps=24,
    )
    valid = dict(losses(tmp_path, "valid"))
    steps = checkpoint_steps(tmp_path / "checkpoints")
    assert steps[-2:] == [22, 24]
    # The best kept checkpoint is the one saved after the lowest validation loss seen so far.
    best_valid_step = min(valid, key=lambda step: valid[step])
    kept_for_best = [step for step in steps if step not in (22, 24)]
    assert len(kept_for_best) <= 1
    if best_valid_step < 22:
        assert kept_for_best and kept_for_best[0] >= best_valid_step


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    launch_digits(tmp_path, max_steps=20)
    for path in (tmp_path / "checkpoints" / "20" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    launch_digits(tmp_path, "resume=auto", max_steps=20)
    out, err = capsys.readouterr()
    assert f"fell back past {tmp_path / 'checkpoints' / '20'} (" in err
    assert f"resumed from step 10 of {tmp_path / 'checkpoints'}" in out
    # It trained steps 11..20 again, after the 20 logged before the corruption.
    assert [step for step, _ in losses(tmp_path, "train")] == list(range(1, 21)) + list(range(11, 21))


def test_explicit_corrupt_checkpoint_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    launch_digits(tmp_path / "run", max_steps=10)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "10" / "state")
    (tmp_path / "run" / "checkpoints" / "10" / "state").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        launch_digits(tmp_path / "other", f"resume={tmp_path / 'run' / 'checkpoints' / '10'}", max_steps=10)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run" / "checkpoints" / "10") in err


def test_warm_start_copies_weights_and_reports_shape_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = launch_digits(tmp_path / "source", max_steps=10)
    tasks = []

    class Recorded(Digits):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

        def get_optimizer(self):
            import optax

            return optax.sgd(0.0)  # keeps the warm-started weights as they were loaded

    Recorded.launch(
        DigitsConfig(batch_size=32, max_steps=1, seed=7),
        argv=[f"artifacts.run_dir={tmp_path / 'warm'}", "log.stdout=false", f"warm_start={tmp_path / 'source'}"],
    )
    assert_trees_equal(final_params(source).params, final_params(tasks[0]).params)

    class Wider(Regression):
        def get_model(self, params):
            return eqx.nn.Linear(4, 3, key=params.key)

        def get_output(self, model, batch, state, key):
            return jax.vmap(model)(batch["x"])[:, 0]

    Regression.launch(RegressionConfig(batch_size=32, max_steps=2), argv=[f"artifacts.run_dir={tmp_path / 'lin'}"])
    with pytest.raises(SystemExit):
        Wider.launch(
            RegressionConfig(batch_size=32, max_steps=1),
            argv=[f"artifacts.run_dir={tmp_path / 'wide'}", f"warm_start={tmp_path / 'lin'}"],
        )
    err = capsys.readouterr().err
    assert "parameter weight" in err and "(3, 4)" in err and "(1, 4)" in err


def test_resume_with_an_incompatible_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [f"artifacts.run_dir={tmp_path}", "log.stdout=false"]
    Regression.launch(RegressionConfig(batch_size=32, max_steps=2), argv=argv)
    with pytest.raises(SystemExit) as exit_info:
        Regression.launch(RegressionConfig(batch_size=32, max_steps=4), argv=[*argv, "resume=auto", "num_features=6"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "parameter params.weight has shape (1, 6) in the model but (1, 4)" in err
    assert "num_features: 4 -> 6" in err


def test_git_is_read_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # git runs from the test's working directory: this checkout, a repository.
    from xax.task.mixins import artifacts

    git_calls: list[list[str]] = []
    run = artifacts.subprocess.run

    def counting_run(args: list[str], **kwargs: object) -> object:
        if args[0] == "git":
            git_calls.append(list(args))
        return run(args, **kwargs)  # ty: ignore[no-matching-overload]

    monkeypatch.setattr(artifacts.subprocess, "run", counting_run)
    argv = [f"artifacts.run_dir={tmp_path}", "log.stdout=false", "log.tensorboard=false", "max_steps=8"]
    Regression.launch(
        RegressionConfig(batch_size=32), argv=[*argv, "checkpoint.every_n_steps=2", "checkpoint.keep_last=10"]
    )
    assert checkpoint_steps(tmp_path / "checkpoints") == [2, 4, 6, 8]
    # One read_git_state: HEAD's commit, the branch and the diff, at the start of the run.
    assert [call[1] for call in git_calls] == ["rev-parse", "rev-parse", "diff"]
    commit = json.loads((tmp_path / "git.json").read_text())["commit"]
    for step in (2, 8):
        assert read_metadata(tmp_path / "checkpoints", step)["git_commit"] == commit
