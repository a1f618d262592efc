"""SIGKILL at random moments, half of them while a checkpoint is being written, each time followed
by ``resume=auto``: the finished run equals one trained straight through, bit for bit, and so does
its log."""

import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import xax
from tests.soak.common import assert_bitwise_equal, lines, params, records, run, saved, start, steps

pytestmark = pytest.mark.soak

MAX_STEPS = 120
# Four megabytes of weights saved every second step: the loop spends about half its time with a
# checkpoint being written.
RUN = (
    f"max_steps={MAX_STEPS}",
    "ballast=1000000",
    "checkpoint.every_n_steps=2",
    "log.every_n_steps=1",
    "log.every_n_seconds=null",
    "valid_every_n_steps=null",
    "resume=auto",
)
# When each restart is killed: as soon as a checkpoint is being written, at a random moment of
# training, or at a random moment after it started (imports, compilation, restore).
KILLS = ("mid_save", "any", "mid_save", "startup", "mid_save", "any", "mid_save", "any")


def being_written(run_dir: Path) -> list[Path]:
    """Checkpoints not yet complete (orbax writes a step under a temporary name, then renames it)."""
    directory = run_dir / "checkpoints"
    return [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name] if directory.is_dir() else []


def wait_until(
    proc: subprocess.Popen[str], condition: Callable[[], object], every_s: float = 0.01, timeout: float = 120
) -> bool:
    """Polls ``condition`` every ``every_s`` seconds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(every_s)
    return True


def newest(run_dir: Path) -> int:
    return max(steps(run_dir), default=0)


def kill_at(proc: subprocess.Popen[str], run_dir: Path, kind: str, rng: random.Random) -> bool:
    """Kills the run at a moment of ``kind``; False if it finished before. Except at start-up, the
    run first saves a checkpoint of its own, so that every restart gets further."""
    if kind == "startup":
        time.sleep(rng.uniform(0.5, 4.0))
    else:
        resumed_at = newest(run_dir)
        if not wait_until(proc, lambda: newest(run_dir) > resumed_at):
            return False
        if kind == "mid_save":
            if not wait_until(proc, lambda: being_written(run_dir), every_s=0.001):
                return False
            time.sleep(rng.uniform(0.0, 0.02))
        else:
            time.sleep(rng.uniform(0.0, 0.5))
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.communicate(timeout=60)
    return True


@pytest.mark.timeout(600)
def test_sigkills_mid_save_then_resume_equal_a_straight_run(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    done = run(straight, *RUN)
    assert done.returncode == 0, done.stderr

    crashed = tmp_path / "crashed"
    rng = random.Random(20240611)
    kills, mid_save = 0, 0
    for kind in KILLS:
        if not kill_at(start(crashed, *RUN), crashed, kind, rng):
            break
        kills += 1
        mid_save += bool(being_written(crashed))
        # What a restart finds: complete checkpoints, every one of them readable.
        for step in steps(crashed):
            assert saved(crashed, step)["params"], step
    assert kills == len(KILLS), f"the run finished after {kills} kills; give it more steps"
    assert mid_save >= 3, f"only {mid_save} of the kills landed while a checkpoint was being written"

    done = run(crashed, *RUN)
    assert done.returncode == 0, done.stderr
    assert not being_written(crashed), "a partial checkpoint was left behind"
    assert steps(crashed)[-1] == MAX_STEPS
    assert_bitwise_equal(params(straight, MAX_STEPS), params(crashed, MAX_STEPS))

    # The log keeps what every attempt wrote: steps trained again after a resume appear again, with
    # the same values; the history read back has each step once, as the straight run's.
    reference = {r["step"]: r for r in xax.read_history(straight, "train")}
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    written = records(crashed, "train")
    assert len(written) > MAX_STEPS, "no step was logged twice, so no resume went back"
    assert sum(line.get("event") == "resume" for line in lines(crashed)) >= len(KILLS) - 2
    for record in written:
        for name in ("loss", "grad_norm", "abs_error"):
            assert record["scalars"][name] == reference[record["step"]]["scalars"][name], (record["step"], name)
    history = xax.read_history(crashed, "train")
    assert [r["step"] for r in history] == list(range(1, MAX_STEPS + 1))
    for record in history:
        expected = reference[record["step"]]
        assert (record["num_samples"], record["scalars"]["loss"]) == (
            expected["num_samples"],
            expected["scalars"]["loss"],
        )
