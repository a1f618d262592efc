"""The hang watchdog: real runs that block or crawl (in their own processes, since a hung run ends
its process), and the watchdog thread's life."""

import subprocess
import threading
import time
from pathlib import Path
from typing import ClassVar

import datasets
import pytest

import xax
from tests.task.launchers.test_multi_host import free_port
from tests.task.toy import RegressionBase, RegressionConfig, read_jsonl, start_toy
from xax.utils.watchdog import Stall, Watchdog

# ---- real runs ---------------------------------------------------------------------------------


def start(run_dir: Path | str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Starts the streamed regression of ``watchdog_main`` (8 rows a batch) in its own process."""
    settings = ("log.every_n_steps=1", "data.shuffle_buffer=1")
    return start_toy(run_dir, *settings, *overrides, module="tests.task.mixins.watchdog_main", env=env)


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_runs_blocked_in_their_data_exit_124_and_a_slow_one_finishes(tmp_path: Path) -> None:
    # Three runs at once, to wait out their allowances together. One blocks after a few batches;
    # one on its first batch, before any step (its allowance runs out in the set-up or at that
    # batch, depending on how busy the machine is); one takes 1 s of the 1.7 s allowed for each
    # batch, over 5 steps (about 3 allowances), and its closing validation takes 2 such batches
    # (more than one allowance).
    hung_dir, startup_dir, slow_dir = tmp_path / "hung", tmp_path / "startup", tmp_path / "slow"
    began = time.monotonic()
    hung = start(hung_dir, "block_after_rows=40", "watchdog.step_s=2", "max_steps=1000", "valid_every_n_steps=null")
    stuck = start(startup_dir, "block_after_rows=0", "watchdog.startup_s=4", "max_steps=1000")
    slow = start(
        slow_dir,
        "seconds_per_batch=1",
        "watchdog.step_s=1.7",
        "max_steps=5",
        "num_valid=16",
        "valid_every_n_steps=null",
    )
    (_, hung_err), (_, stuck_err) = finish(hung), finish(stuck)
    slow_out, slow_err = finish(slow)
    slow_wall = time.monotonic() - began

    assert hung.returncode == 124, hung_err[-3000:]
    # The last step the loop completed is the one named (the logs handed over were written first).
    last_step = read_jsonl(hung_dir / "log.jsonl")[-1]["step"]
    assert last_step >= 1
    for text in (hung_err, (hung_dir / "run.log").read_text()):
        assert "watchdog: no progress for" in text and "(watchdog.step_s=2; phase: training)" in text
        assert f"last completed step: {last_step} ({8 * last_step} samples, epoch 0)" in text
        assert f"data position: epoch 0, batch {last_step} (the next batch to read)" in text
        # The data thread's frame and the loop's wait for it, with the threads' names.
        assert "in block_forever" in text and "in _train_loop" in text
        assert "MainThread" in text and "xax-data-prefetch" in text
        assert "device memory: 1 cpu device(s): memory not reported" in text
        assert "exiting with code 124; if the run is only slow, raise watchdog.step_s" in text

    assert stuck.returncode == 124, stuck_err[-3000:]
    for text in (stuck_err, (startup_dir / "run.log").read_text()):
        assert "the first training step did not complete within watchdog.startup_s=4 s (phase: start-up" in text
        assert "last completed step: none in this run yet" in text
        # Every thread's stack, the main thread's wherever in the set-up it is.
        assert "the stack of every thread" in text and "MainThread" in text
        assert "raise watchdog.startup_s" in text

    assert slow.returncode == 0, slow_err[-3000:]
    assert "steps=5" in slow_out
    records = read_jsonl(slow_dir / "log.jsonl")
    assert [r["step"] for r in records if r["phase"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if r["phase"] == "valid"] == [5]
    assert slow_wall > 7 * 1.0  # the data did crawl: 5 training and 2 validation batches
    assert "watchdog" not in slow_err and "watchdog" not in (slow_dir / "run.log").read_text()


@pytest.mark.slow  # about 10 s: the default suite's share goes to the single-process runs above
def test_every_process_of_a_multi_process_run_exits_124(tmp_path: Path) -> None:
    # Process 1's data blocks; process 0 waits for it in the next step's collective. Each process's
    # own watchdog ends it, with its own report.
    run_dir = tmp_path / "two"
    port = free_port()
    procs = [
        start(
            run_dir,
            "block_after_rows=40",
            "blocking_process=1",
            "watchdog.step_s=3",
            "max_steps=1000",
            "valid_every_n_steps=null",
            "launcher.kind=multi_host",
            f"launcher.distributed.coordinator_address=localhost:{port}",
            "launcher.distributed.num_processes=2",
            f"launcher.distributed.process_id={rank}",
            "launcher.distributed.init_timeout_s=60",
            env={"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"},
        )
        for rank in range(2)
    ]
    errors = [finish(proc)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [124, 124], errors[0][-2000:] + errors[1][-2000:]
    reports = [(errors[0], run_dir / "run.log"), (errors[1], run_dir / "run.1.log")]
    for rank, (err, log) in enumerate(reports):
        for text in (err, log.read_text()):
            assert f"process {rank} of 2" in text and "(watchdog.step_s=3; phase: training)" in text
            assert "in _train_loop" in text and "exiting with code 124" in text
    # The process that hung names the frame it hung in; the other waits for it in the loop.
    assert "in block_forever" in errors[1] and "in block_forever" not in errors[0]


# ---- the thread's life in a run ----------------------------------------------------------------


class ThreadSpy(RegressionBase[RegressionConfig]):
    """Notes the threads alive while the run opens its data (after every mixin's start)."""

    seen: ClassVar[set[str]] = set()

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset | datasets.IterableDataset:
        ThreadSpy.seen = {thread.name for thread in threading.enumerate()}
        return super().get_dataset(phase)


def watchdogs() -> int:
    return sum(thread.name == "xax-watchdog" for thread in threading.enumerate())


def test_on_by_default_stopped_at_the_end_and_off_when_disabled(tmp_path: Path) -> None:
    argv = ["log.stdout=false", "log.tensorboard=false", "compile.cache=false", "valid_every_n_steps=null"]
    on = [f"artifacts.run_dir={tmp_path / 'on'}", *argv]
    ThreadSpy.launch(RegressionConfig(batch_size=32, max_steps=1), argv=on)
    assert "xax-watchdog" in ThreadSpy.seen
    assert watchdogs() == 0  # so a second run in the process stacks nothing
    ThreadSpy.launch(
        RegressionConfig(batch_size=32, max_steps=1),
        argv=[f"artifacts.run_dir={tmp_path / 'off'}", "watchdog.enabled=false", *argv],
    )
    assert "xax-watchdog" not in ThreadSpy.seen and "xax-cpu-stats" in ThreadSpy.seen
    assert watchdogs() == 0


# ---- the watchdog alone ------------------------------------------------------------------------


def watch(startup_s: float, step_s: float) -> tuple[Watchdog, list[Stall]]:
    stalls: list[Stall] = []
    return Watchdog(startup_s, step_s, stalls.append, startup_key="up", step_key="step"), stalls


def wait_for(stalls: list[Stall], timeout_s: float = 10.0) -> Stall:
    deadline = time.monotonic() + timeout_s
    while not stalls:
        assert time.monotonic() < deadline, "the watchdog did not fire"
        time.sleep(0.01)
    return stalls[0]


def test_it_fires_once_when_start_up_or_a_step_overruns() -> None:
    dog, stalls = watch(startup_s=0.2, step_s=60.0)
    dog.start()
    stall = wait_for(stalls)
    assert (stall.limit_key, stall.limit_s, stall.last_progress) == ("up", 0.2, None)
    assert stall.waited_s >= 0.2
    dog.stop()
    assert len(stalls) == 1

    # A report ends start-up's long allowance: the next is due within step_s, not startup_s.
    dog, stalls = watch(startup_s=60.0, step_s=0.2)
    dog.start()
    began = time.monotonic()
    dog.progress("step 1")
    stall = wait_for(stalls)
    assert time.monotonic() - began < 5.0
    assert (stall.limit_key, stall.last_progress) == ("step", "step 1")
    dog.stop()


def test_reports_keep_it_quiet_and_a_compilation_gets_the_start_up_allowance() -> None:
    dog, stalls = watch(startup_s=0.7, step_s=0.3)
    dog.start()
    for index in range(20):  # 1 s in all, more than 3 allowances
        dog.progress(f"step {index}")
        time.sleep(0.05)
    dog.progress("validation begins", compiles=True)
    time.sleep(0.45)  # longer than step_s, within startup_s
    assert not stalls
    stall = wait_for(stalls)
    assert (stall.limit_key, stall.last_progress) == ("up", "validation begins")
    dog.stop()
    assert not dog.is_running
