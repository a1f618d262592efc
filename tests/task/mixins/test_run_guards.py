"""Guarantees that only show in runs shaped like real use: cadences past their first firing,
media hooks that return nothing, non-finite values that no single batch causes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
from jaxtyping import Array

import xax
from tests.task.toy import ROOT, Regression, RegressionConfig, regression_arrays, start_toy
from xax.checkpoint import checkpoint_steps

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


class MediaBreaks(Regression):
    """The task's own media hook fails at its second call (step 30)."""

    calls = 0

    def compute_media(self, model: object, batch: dict[str, Array], output: Array, state: xax.State) -> dict:
        type(self).calls += 1
        if type(self).calls == 2:
            raise ValueError("a bug in compute_media")
        return {"mean_output": xax.Scalar(output.mean())}


def test_an_error_in_task_code_saves_the_work_before_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    MediaBreaks.calls = 0
    argv = [f"artifacts.run_dir={tmp_path}", *QUIET, "max_steps=100", "log.heavy_every_n_steps=15"]
    argv += ["log.heavy_every_n_seconds=null", "checkpoint.every_n_steps=1000", "valid_every_n_steps=null"]
    with pytest.raises(ValueError, match="a bug in compute_media"):
        MediaBreaks.launch(RegressionConfig(batch_size=32), argv=argv)
    assert checkpoint_steps(tmp_path / "checkpoints") == [30]
    assert f"saved {tmp_path / 'checkpoints' / '30'} (step 30) before stopping" in capsys.readouterr().err
    # The saved work is a normal checkpoint: the run continues from it.
    state = Regression.launch(RegressionConfig(batch_size=32), argv=[*argv, "resume=auto", "max_steps=40"])
    assert state.num_steps == 40


def test_history_after_a_kill_and_resume_has_each_step_once(tmp_path: Path) -> None:
    overrides = ["log.every_n_steps=1", "log.every_n_seconds=null", "checkpoint.every_n_steps=20"]
    proc = start_toy(tmp_path, *overrides, "max_steps=100000", "valid_every_n_steps=null")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = tmp_path / "log.jsonl"
            if 20 in checkpoint_steps(tmp_path / "checkpoints") and log.exists() and log.read_text().count("\n") > 30:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = max(json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines())
    last_checkpoint = checkpoint_steps(tmp_path / "checkpoints")[-1]
    assert killed_at > last_checkpoint
    resumed = start_toy(tmp_path, *overrides, f"max_steps={killed_at + 10}", "valid_every_n_steps=null", "resume=auto")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1]
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    events = [line for line in lines if "event" in line]
    assert [(e["event"], e["step"]) for e in events] == [("resume", last_checkpoint)]
    raw_steps = [line["step"] for line in lines if line.get("phase") == "train"]
    assert len(raw_steps) > len(set(raw_steps))  # the killed run's last steps were computed twice
    history = xax.read_history(tmp_path, phase="train")
    assert [record["step"] for record in history] == list(range(1, killed_at + 11))


EARLY = (
    "import time\n"
    "from tests.task.toy_main import FaultyConfig, FaultyRegression\n"
    "class SlowStart(FaultyRegression):\n"
    "    def __init__(self, config):\n"
    "        print('starting', flush=True)\n"  # inside launch(), before the run starts
    "        time.sleep(1.0)\n"
    "        super().__init__(config)\n"
    "SlowStart.launch(FaultyConfig(batch_size=32))\n"
)


@pytest.mark.parametrize(("signum", "code", "saved"), [(signal.SIGUSR1, 0, 2), (signal.SIGTERM, 0, 1)])
def test_a_signal_during_start_up_is_kept_for_the_run(tmp_path: Path, signum: int, code: int, saved: int) -> None:
    # Before, the handlers came with the run's start, seconds after launch(): SIGUSR1 killed the
    # process (exit -10) and SIGTERM ended it without a checkpoint.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    argv = [f"artifacts.run_dir={tmp_path}", "compile.cache=false", "log.tensorboard=false", "max_steps=2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", EARLY, *argv, "checkpoint.every_n_steps=1000", "valid_every_n_steps=null"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "starting"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    # SIGUSR1 saves at the first step and again at the end; SIGTERM saves at the first step and stops.
    assert len(checkpoint_steps(tmp_path / "checkpoints")) == saved, err
    if signum == signal.SIGTERM:
        assert "interrupted by SIGTERM at step 1" in err


def test_a_second_run_on_the_same_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = start_toy(
        tmp_path, "max_steps=100000", "log.every_n_steps=1", "checkpoint.every_n_steps=50", "valid_every_n_steps=null"
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "log.jsonl").exists() or not (tmp_path / "log.jsonl").read_text():
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        argv = [f"artifacts.run_dir={tmp_path}", *QUIET, "max_steps=5", "resume=auto"]
        with pytest.raises(SystemExit) as exit_info:
            Regression.launch(RegressionConfig(batch_size=32), argv=argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: run directory {tmp_path} is in use by process {first.pid} on {socket.gethostname()}; "
            "wait for that run to end or stop it, or choose another artifacts.run_dir"
        )
        # Only the first run's records: training steps in order (the refused run, resuming, would
        # have written its own from an earlier step).
        lines = (tmp_path / "log.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.endswith("}")]  # the last may be mid-write
        assert records and all(record["phase"] == "train" for record in records)
        steps = [record["step"] for record in records]
        assert steps == sorted(set(steps))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # A run that died holds nothing: its resume takes the directory.
    state = Regression.launch(RegressionConfig(batch_size=32), argv=[*argv, "max_steps=200"])
    assert state.num_steps == 200


class SlowStart(Regression):
    """Start-up (building the model, compiling) outlasts the logging interval."""

    def get_model(self, params: xax.InitParams) -> Any:
        time.sleep(4.0)
        return super().get_model(params)


def test_time_cadences_count_from_the_first_step(tmp_path: Path) -> None:
    argv = [f"artifacts.run_dir={tmp_path}", "log.stdout=false", "log.tensorboard=false", "compile.cache=false"]
    argv += ["max_steps=10", "log.every_n_steps=5", "log.every_n_seconds=3", "valid_every_n_steps=null"]
    SlowStart.launch(RegressionConfig(batch_size=32), argv=argv)
    steps = [record["step"] for record in xax.read_history(tmp_path, phase="train")]
    assert steps == [5, 10]  # before, the 4 s of start-up put a record at step 1


class CountsTraces(Regression):
    traces = 0
    traces_at_media: list[int] = []  # noqa: RUF012

    def get_output(self, model: Any, batch: dict[str, Array], state: xax.State, key: Any) -> Array:
        type(self).traces += 1  # runs only while JAX traces
        return super().get_output(model, batch, state, key)

    def log_heavy(self, ts: xax.TrainState, state: xax.State) -> None:
        super().log_heavy(ts, state)
        type(self).traces_at_media.append(type(self).traces)


def test_media_passes_compile_once(tmp_path: Path) -> None:
    # The State's counters change every pass; as static arguments they re-traced (and kept a new
    # compiled copy of) get_output each time: memory grew for as long as the run lasted.
    CountsTraces.traces, CountsTraces.traces_at_media = 0, []
    argv = [f"artifacts.run_dir={tmp_path}", *QUIET, "max_steps=40", "log.heavy_every_n_steps=4", "media=true"]
    CountsTraces.launch(RegressionConfig(batch_size=32), argv=[*argv, "log.heavy_every_n_seconds=null"])
    assert len(CountsTraces.traces_at_media) == 10
    # (The last pass follows the final validation, which traces the model for its own step.)
    assert CountsTraces.traces_at_media[-2] == CountsTraces.traces_at_media[0]


class HalfwayBest(Regression):
    """Validation targets are half the training ones: the validation loss falls while the weights
    grow through the halfway point, then rises, so the best checkpoint is not the last."""

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset | datasets.IterableDataset:
        if phase == "train":
            return super().get_dataset(phase)
        x, y = regression_arrays(self.config.num_valid, 1)
        return datasets.Dataset.from_dict({"x": x, "y": 0.5 * y})


def test_keep_best_validates_every_checkpoint_it_ranks(tmp_path: Path) -> None:
    # Validation every 25 steps, checkpoints every 10: without a pass of their own, most
    # checkpoints could not be ranked, and keep_best would keep the wrong ones.
    argv = [f"artifacts.run_dir={tmp_path}", *QUIET, "max_steps=60", "valid_every_n_steps=25", "learning_rate=0.01"]
    argv += ["checkpoint.every_n_steps=10", "checkpoint.keep_last=1", "checkpoint.keep_best=2"]
    HalfwayBest.launch(RegressionConfig(batch_size=32), argv=argv)
    valid = {r["step"]: r["scalars"]["loss"] for r in xax.read_history(tmp_path, phase="valid")}
    saved = [10, 20, 30, 40, 50, 60]
    assert set(saved) <= set(valid)
    best_two = sorted(sorted(saved, key=lambda step: valid[step])[:2])
    assert 60 not in best_two, valid  # the setup makes the best checkpoints old ones
    assert checkpoint_steps(tmp_path / "checkpoints") == [*best_two, 60]
