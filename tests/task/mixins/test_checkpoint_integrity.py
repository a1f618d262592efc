"""Checkpoint integrity as a user meets it: damaged checkpoints are caught, set aside and written
anew; a failed write is one line and its own exit code; a changed config is not taken for
corruption; resuming says one line; keep_best ranks each checkpoint by its own validation."""

import re
import resource
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xax
from tests.task.toy import Regression, RegressionConfig, final_params, start_toy
from xax.checkpoint import checkpoint_steps, load_checkpoint, read_metadata
from xax.cli import main as xax_main
from xax.data import Cursor
from xax.task.mixins.artifacts import ArtifactsConfig, ArtifactsMixin
from xax.task.mixins.checkpointing import CheckpointingConfig, CheckpointingMixin

# A model whose weights fill a data file of their own (small values are stored inline in the index).
WIDE = ("num_features=4096", "learning_rate=0.001")


def run_toy(run_dir: Path, *overrides: str, timeout: float = 240, **popen: Any) -> subprocess.CompletedProcess[str]:
    quiet = ("log.stdout=false", "log.every_n_steps=1", "valid_every_n_steps=null")
    proc = start_toy(run_dir, *quiet, *overrides, **popen)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def largest_data_file(step_dir: Path) -> Path:
    files = [path for path in (step_dir / "state").rglob("*") if path.is_file() and path.parent.name == "d"]
    return max(files, key=lambda path: (path.stat().st_size, path.name))


def truncate_largest(step_dir: Path) -> None:
    path = largest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(step_dir: Path) -> None:
    path = largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``xax ckpt inspect --verify PATH``: its exit code and stderr."""
    capsys.readouterr()
    code = xax_main(["ckpt", "inspect", "--verify", str(path)])
    return code, capsys.readouterr().err


def traceback_free(err: str) -> bool:
    return "Traceback" not in err and "WARNING:absl" not in err and "ERROR:absl" not in err


# --- A and B: damaged checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("damage", [truncate_largest, flip_a_byte])
def test_resume_falls_back_past_a_damaged_checkpoint_and_writes_its_step_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any
) -> None:
    first = run_toy(tmp_path, "max_steps=40", "checkpoint.every_n_steps=20", *WIDE)
    assert first.returncode == 0, first.stderr
    damaged = tmp_path / "checkpoints" / "40"
    damage(damaged)
    code, err = verify(damaged, capsys)
    assert code == 2, err
    if damage is flip_a_byte:
        assert "array params.weight does not match its checksum" in err

    second = run_toy(tmp_path, "max_steps=40", "checkpoint.every_n_steps=20", "resume=auto", *WIDE)
    assert second.returncode == 0, second.stderr
    moved = tmp_path / "checkpoints" / "corrupt" / "40"
    assert f"fell back past {damaged} (" in second.stderr
    assert f"moved it to {moved}" in second.stderr
    assert f"resumed from step 20 of {tmp_path / 'checkpoints'}" in second.stdout
    assert moved.is_dir()  # kept for the user to look at
    # The run ended at the step it fell back past: that checkpoint was written anew, and reads back.
    assert checkpoint_steps(tmp_path / "checkpoints") == [20, 40]
    code, err = verify(damaged, capsys)
    assert code == 0, err
    tree, metadata = load_checkpoint(tmp_path / "checkpoints", 40, None)
    assert metadata["state"]["num_steps"] == 40
    assert np.all(np.isfinite(np.asarray(tree["params"]["weight"])))


def test_checksums_verify_under_another_mesh_and_catch_a_flipped_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Saved with the weights sharded over four devices, restored on two and read on one.
    argv = [
        f"artifacts.run_dir={tmp_path}",
        "log.stdout=false",
        "log.tensorboard=false",
        "checkpoint.every_n_steps=2",
        "launcher.kind=multi_device",
        "parallel.plan=fsdp",
    ]
    config = RegressionConfig(batch_size=32, max_steps=4, num_features=4096, learning_rate=0.001)
    tasks: list[Regression] = []

    class Recorded(Regression):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    Recorded.launch(config, argv=[*argv, "launcher.num_devices=4"])
    shards = final_params(tasks[0]).params.weight.addressable_shards
    assert [shard.data.shape for shard in shards] == [(1, 1024)] * 4  # each device held a quarter
    checksums = (tmp_path / "checkpoints" / "4" / "checksums" / "metadata").read_text()
    assert "params.weight" in checksums
    capsys.readouterr()

    Recorded.launch(config, argv=[*argv, "launcher.num_devices=2", "resume=auto"])
    out, err = capsys.readouterr()
    assert f"resumed from step 4 of {tmp_path / 'checkpoints'}" in out
    assert "fell back" not in err
    assert [shard.data.shape for shard in final_params(tasks[1]).params.weight.addressable_shards] == [(1, 2048)] * 2
    assert verify(tmp_path / "checkpoints" / "4", capsys)[0] == 0  # one CPU device

    flip_a_byte(tmp_path / "checkpoints" / "4")
    code, err = verify(tmp_path / "checkpoints" / "4", capsys)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "array params.weight does not match its checksum" in err
    Regression.launch(config, argv=[*argv, "launcher.num_devices=2", "resume=auto"])
    out, err = capsys.readouterr()
    assert f"fell back past {tmp_path / 'checkpoints' / '4'} (array params.weight does not match its checksum)" in err
    assert f"resumed from step 2 of {tmp_path / 'checkpoints'}" in out


# --- C: a failed write ------------------------------------------------------------------------


def _limit_file_size() -> None:
    # Any file write past 64 KiB fails (EFBIG), as a full disk fails a write with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def _mount_small_disk(directory: Path, size: str) -> None:
    directory.mkdir(parents=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a small tmpfs here ({error}); the RLIMIT_FSIZE variant covers the path")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE variant covers it")


def assert_one_clear_line(result: subprocess.CompletedProcess[str], checkpoints: Path, reason: str) -> int:
    """Exit code 3, stderr's last line the failure (what, where, free space), no traceback; returns
    the step that failed."""
    assert result.returncode == 3, result.stderr[-3000:]
    assert traceback_free(result.stderr), result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"error: writing a checkpoint to {re.escape(str(checkpoints))}/(\d+) failed: {reason} "
        r"\(\d+(\.\d)? [KMG]?i?B free there, the last checkpoint took \S+ \S+\); "
        r"the previous checkpoints are intact \(steps [\d, ]+\)",
        last,
    )
    assert match is not None, result.stderr[-3000:]
    return int(match.group(1))


def assert_older_checkpoints_load(checkpoints: Path, num_features: int) -> None:
    steps = checkpoint_steps(checkpoints)
    assert steps
    for step in steps:
        tree, metadata = load_checkpoint(checkpoints, step, None)
        assert tree["params"]["weight"].shape == (1, num_features)
        assert metadata["state"]["num_steps"] == step


def test_full_disk_during_an_async_save_is_one_line_and_exit_3(tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    _mount_small_disk(checkpoints, "3m")
    try:
        # 1 MB of weights a checkpoint (and few rows of data, to keep the process small): the third
        # does not fit; its failure surfaces at the next save.
        result = run_toy(
            tmp_path / "run",
            "max_steps=60",
            "checkpoint.every_n_steps=10",
            "num_features=250000",
            "num_train=64",
            "num_valid=32",
            "learning_rate=0.00001",
        )
        failed = assert_one_clear_line(result, checkpoints, "No space left on device")
        assert failed < 60  # an async write, reported at the next save
        assert_older_checkpoints_load(checkpoints, 250000)
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False, timeout=60)


@pytest.mark.parametrize(("max_steps", "surfaces_at"), [(12, "next save"), (8, "final save")])
def test_failed_write_is_one_line_and_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_steps: int, surfaces_at: str
) -> None:
    # No git.diff in the run directory (a working tree's diff may exceed the file size limit).
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-repository"))
    small = ("num_features=65536", "num_train=64", "num_valid=32")  # a 256 KiB weight, little data
    first = run_toy(tmp_path, "max_steps=4", "checkpoint.every_n_steps=4", *small)
    assert first.returncode == 0, first.stderr
    result = run_toy(
        tmp_path,
        f"max_steps={max_steps}",
        "checkpoint.every_n_steps=4",
        "resume=auto",
        *small,
        preexec_fn=_limit_file_size,
    )
    # The write of step 8 fails in the background: reported when the save of step 12 begins, or
    # when the final save (step 8) is waited for.
    assert assert_one_clear_line(result, tmp_path / "checkpoints", "File too large") == 8, surfaces_at
    assert checkpoint_steps(tmp_path / "checkpoints") == [4]
    assert_older_checkpoints_load(tmp_path / "checkpoints", 65536)


# --- D: a config change on resume -------------------------------------------------------------


class _Adam(Regression):
    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(1e-3)


class _Deeper(Regression):
    def get_model(self, params: xax.InitParams) -> Any:
        return eqx.nn.MLP(self.config.num_features, "scalar", 8, depth=1, key=params.key)


@pytest.mark.parametrize(
    ("task", "overrides", "named"),
    [
        (Regression, ["ema.decay=0.9"], "ema.decay: None -> 0.9"),
        (Regression, ["max_grad_norm=1.0"], "max_grad_norm: None -> 1.0"),
        (Regression, ["num_features=6"], "num_features: 4 -> 6"),
        (_Adam, [], "the model or optimizer code changed"),
        (_Deeper, [], "the model or optimizer code changed"),
    ],
)
def test_resume_with_another_model_or_optimizer_names_the_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: type[Regression], overrides: list[str], named: str
) -> None:
    argv = [f"artifacts.run_dir={tmp_path / 'run'}", "log.stdout=false", "checkpoint.every_n_steps=2"]
    Regression.launch(RegressionConfig(batch_size=32, max_steps=4), argv=argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        task.launch(RegressionConfig(batch_size=32, max_steps=4), argv=[*argv, "resume=auto", *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    newest = tmp_path / "run" / "checkpoints" / "4"
    assert f"checkpoint {newest} does not fit this run's model and optimizer" in err
    assert named in err
    assert "unreadable" not in err and "partial_restore" not in err and "fell back" not in err
    # Nothing was taken for corrupt: both checkpoints are where they were.
    assert checkpoint_steps(tmp_path / "run" / "checkpoints") == [2, 4]
    assert not (tmp_path / "run" / "checkpoints" / "corrupt").exists()
    if "num_features=6" in overrides:  # a weight of another shape: only the old config resumes it
        assert "run with the checkpoint's config values" in err and "warm_start" not in err
        return
    # The advice works: a new run takes the weights.
    assert f"warm_start={newest}" in err
    state = task.launch(
        RegressionConfig(batch_size=32, max_steps=1),
        argv=[f"artifacts.run_dir={tmp_path / 'new'}", "log.stdout=false", f"warm_start={newest}", *overrides],
    )
    assert state.num_steps == 1


# --- E: what a resume says --------------------------------------------------------------------


def test_resume_says_one_line_and_fallback_is_one_short_line(tmp_path: Path) -> None:
    first = run_toy(tmp_path, "max_steps=20", "checkpoint.every_n_steps=10", *WIDE)
    assert first.returncode == 0, first.stderr
    resumed = run_toy(tmp_path, "max_steps=30", "checkpoint.every_n_steps=10", "resume=auto", *WIDE)
    assert resumed.returncode == 0, resumed.stderr
    assert traceback_free(resumed.stderr), resumed.stderr
    said = f"resumed from step 20 of {tmp_path / 'checkpoints'}; config changed since: max_steps: 20 -> 30"
    assert resumed.stdout.splitlines().count(said) == 1, resumed.stdout
    assert len(resumed.stderr.splitlines()) <= 1, resumed.stderr

    truncate_largest(tmp_path / "checkpoints" / "30")
    fallback = run_toy(tmp_path, "max_steps=30", "checkpoint.every_n_steps=10", "resume=auto", *WIDE)
    assert fallback.returncode == 0, fallback.stderr
    assert traceback_free(fallback.stderr), fallback.stderr
    lines = fallback.stderr.splitlines()
    assert len(lines) <= 2, fallback.stderr
    fell = [line for line in lines if line.startswith("fell back past")]
    assert len(fell) == 1, fallback.stderr
    assert fell[0].startswith(f"fell back past {tmp_path / 'checkpoints' / '30'} (")
    assert re.search(r" \((data file \S+|the data of params\.weight) is truncated\); moved it to \S+$", fell[0]), fell[
        0
    ]
    assert len(fell[0]) < 300, fell[0]
    assert any(
        line.startswith(f"resumed from step 20 of {tmp_path / 'checkpoints'}") for line in fallback.stdout.splitlines()
    )


# --- F: keep_best -----------------------------------------------------------------------------


@dataclass
class _SaveOnlyConfig(CheckpointingConfig, ArtifactsConfig):
    pass


class _SaveOnly(CheckpointingMixin[_SaveOnlyConfig], ArtifactsMixin[_SaveOnlyConfig]):
    """The checkpointing mixin alone, as the training loop drives it."""


def _saver(run_dir: Path) -> _SaveOnly:
    config = _SaveOnlyConfig()
    config.artifacts.run_dir = str(run_dir)
    config.checkpoint.keep_last = 1
    config.checkpoint.keep_best = 2
    config.checkpoint.best_metric = "loss"
    return _SaveOnly(config)


def _save(saver: _SaveOnly, step: int, loss: float | None = None, measured_at: int | None = None) -> None:
    """Saves at ``step``; ``loss`` is the validation loss measured at ``measured_at`` (default: ``step``)."""
    if loss is not None:
        saver.last_valid_metrics = {"loss": loss, "abs_error": loss / 2}
        saver.last_valid_step = step if measured_at is None else measured_at
    tree = {"params": {"w": jnp.full((3,), float(step))}, "key": jax.random.key_data(jax.random.key(step))}
    saver.save_checkpoint(tree, xax.State(num_steps=step), Cursor(), wait=True)


def test_keep_best_ranks_each_checkpoint_by_its_own_validation(tmp_path: Path) -> None:
    saver = _saver(tmp_path)
    for step, loss in zip([20, 40, 60, 80, 100], [5.0, 1.0, 4.0, 2.0, 3.0]):
        _save(saver, step, loss)
    checkpoints = tmp_path / "checkpoints"
    assert checkpoint_steps(checkpoints) == [40, 80, 100]  # the best two, however old, and the last
    # A validation at step 110 (the best yet) but no checkpoint there; the checkpoint of step 120 was
    # not validated: it must not be ranked by step 110's loss.
    _save(saver, 120, loss=0.5, measured_at=110)
    assert checkpoint_steps(checkpoints) == [40, 80, 120]
    assert read_metadata(checkpoints, 120)["valid_metrics"] == {}
    assert read_metadata(checkpoints, 40)["valid_metrics"] == {"loss": 1.0, "abs_error": 0.5}
    saver.on_run_end()

    # After a resume (a new manager), the earlier checkpoints keep their rankings.
    resumed = _saver(tmp_path)
    _save(resumed, 140, loss=1.5)
    assert checkpoint_steps(checkpoints) == [40, 140]
    _save(resumed, 160)  # no validation
    assert checkpoint_steps(checkpoints) == [40, 140, 160]
    resumed.on_run_end()
