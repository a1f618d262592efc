"""Signals and crashes, with real subprocesses: nothing saved is lost, and resumes are exact."""

import random
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from tests.task.toy import read_jsonl, start_toy
from xax.checkpoint import checkpoint_steps, load_checkpoint


def start(run_dir: Path, *overrides: str, **popen: Any) -> subprocess.Popen[str]:
    quiet = ("log.stdout=false", "log.every_n_steps=1", "valid_every_n_steps=null")
    return start_toy(run_dir, *quiet, *overrides, **popen)


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    return log.read_text().count("\n") if log.exists() else 0


def wait_for_steps(proc: subprocess.Popen[str], run_dir: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while logged_steps(run_dir) < steps:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "training did not progress"
        time.sleep(0.05)


def saved_params(run_dir: Path, step: int) -> list[np.ndarray]:
    tree, _ = load_checkpoint(run_dir / "checkpoints", step, None)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree["params"])]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_stop_signal_saves_and_exits(tmp_path: Path, signum: int, code: int) -> None:
    proc = start(tmp_path, "checkpoint.every_n_steps=100000")
    wait_for_steps(proc, tmp_path, 5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    name = signal.Signals(signum).name
    assert f"interrupted by {name} at step" in err
    stopped_at = int(err.split("at step ")[1].split(";")[0])
    assert checkpoint_steps(tmp_path / "checkpoints") == [stopped_at]
    assert read_jsonl(tmp_path / "log.jsonl")[-1]["step"] == stopped_at


def test_sigusr1_saves_and_continues(tmp_path: Path) -> None:
    proc = start(tmp_path, "checkpoint.every_n_steps=100000")
    wait_for_steps(proc, tmp_path, 5)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not checkpoint_steps(tmp_path / "checkpoints"):
        assert time.monotonic() < deadline, "SIGUSR1 did not save"
        time.sleep(0.05)
    saved_at = checkpoint_steps(tmp_path / "checkpoints")[0]
    wait_for_steps(proc, tmp_path, saved_at + 5)  # still training
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert checkpoint_steps(tmp_path / "checkpoints")[0] == saved_at


def test_second_sigint_stops_at_once() -> None:
    from tests.task.toy import Regression, RegressionConfig

    task = Regression(RegressionConfig())
    task._on_signal(signal.SIGINT, None)
    assert task.stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        task._on_signal(signal.SIGINT, None)


@pytest.mark.slow
def test_random_sigkills_lose_nothing(tmp_path: Path) -> None:
    # A checkpoint every 7 steps, written in the background: many of the kills land mid-write.
    overrides = ("max_steps=300", "checkpoint.every_n_steps=7", "resume=auto")
    straight = tmp_path / "straight"
    proc = start(straight, *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    crashed = tmp_path / "crashed"
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        proc = start(crashed, *overrides)
        before = logged_steps(crashed)
        try:
            wait_for_steps(proc, crashed, before + 1)
        except AssertionError:
            break  # finished before it could be killed
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.communicate(timeout=60)
        kills += 1
        # Every restart must find a complete checkpoint to resume from, or none at all.
        for step in checkpoint_steps(crashed / "checkpoints"):
            assert saved_params(crashed, step)
    assert kills >= 10
    proc = start(crashed, *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for a, b in zip(saved_params(straight, 300), saved_params(crashed, 300), strict=True):
        np.testing.assert_array_equal(a, b)


def _limit_file_size() -> None:
    # Any file write past 64 KiB fails with EFBIG, as a full disk fails a write with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    # A wide model: its checkpoint data file is larger than the 64 KiB the second run may write.
    first = start(tmp_path, "max_steps=4", "checkpoint.every_n_steps=4", "num_features=65536")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert checkpoint_steps(tmp_path / "checkpoints") == [4]
    second = start(tmp_path, "max_steps=8", "resume=auto", "num_features=65536", preexec_fn=_limit_file_size)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode != 0
    assert "writing a checkpoint" in stderr and "the previous checkpoints are intact" in stderr
    assert checkpoint_steps(tmp_path / "checkpoints") == [4]
    tree, metadata = load_checkpoint(tmp_path / "checkpoints", 4, None)
    assert tree["params"]["weight"].shape == (1, 65536)
    assert metadata["state"]["num_steps"] == 4
