"""Non-finite steps under each ``nan.policy``, caused by a bad batch (a row of NaN) or by a learning
rate that makes the weights non-finite: what the run says, how it ends, and that every checkpoint it
leaves holds finite weights."""

from pathlib import Path

import numpy as np
import pytest

import xax
from tests.soak.common import Finished, all_finite, assert_bitwise_equal, params, run, steps

pytestmark = pytest.mark.soak

MAX_STEPS = 12
RUN = (
    f"max_steps={MAX_STEPS}",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=20",
    "log.every_n_steps=1",
    "log.every_n_seconds=null",
    "valid_every_n_steps=null",
)
# A NaN feature in one row of step 5's batch; a learning rate of NaN from the 7th update on (its
# loss and gradient are finite, the weights it would make are not). A huge finite rate (1e38) is
# not the same test: with small gradients its update is finite, and the next step's loss overflows.
CAUSES = {"batch": (5, ("poison_steps=[5]",)), "learning_rate": (7, ("lr_jump_step=7", "lr_jump_to=nan"))}


def assert_every_checkpoint_finite(run_dir: Path) -> None:
    for step in steps(run_dir):
        assert all_finite(params(run_dir, step)), f"checkpoint {step} holds non-finite weights"


def error_line(done: Finished) -> str:
    lines = done.error_lines()
    assert len(lines) == 1, done.stderr[-4000:]
    return lines[0]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cause", list(CAUSES))
def test_halt_names_the_step_and_a_finite_last_good_checkpoint(tmp_path: Path, cause: str) -> None:
    bad_step, overrides = CAUSES[cause]
    done = run(tmp_path, *RUN, "nan.policy=halt", *overrides)
    assert done.returncode == 1, done.stderr[-4000:]
    line = error_line(done)
    assert "non-finite" in line and f"at step {bad_step} " in line, line
    last_good = bad_step - 1  # checkpoints every 2 steps; the bad steps are odd
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / str(last_good)}" in line, line
    if cause == "learning_rate":
        assert "learning rate" in line, line
    assert last_good in steps(tmp_path)
    assert_every_checkpoint_finite(tmp_path)


@pytest.mark.timeout(180)
def test_skip_continues_past_a_bad_batch(tmp_path: Path) -> None:
    bad_step, overrides = CAUSES["batch"]
    done = run(tmp_path, *RUN, "nan.policy=skip", *overrides)
    assert done.returncode == 0, done.stderr[-4000:]
    assert steps(tmp_path)[-1] == MAX_STEPS
    assert_every_checkpoint_finite(tmp_path)
    losses = {r["step"]: float(r["scalars"]["loss"]) for r in xax.read_history(tmp_path, "train")}
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert np.isnan(losses.pop(bad_step))
    assert all(np.isfinite(loss) for loss in losses.values()), losses


@pytest.mark.timeout(180)
def test_skip_keeps_the_weights_from_before_a_bad_learning_rate(tmp_path: Path) -> None:
    bad_step, overrides = CAUSES["learning_rate"]
    done = run(tmp_path, *RUN, "nan.policy=skip", "nan.max_consecutive=1000", *overrides)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "learning rate" in done.stderr, done.stderr[-4000:]
    assert_every_checkpoint_finite(tmp_path)
    # No update from the jump on reached the weights.
    assert_bitwise_equal(params(tmp_path, bad_step - 1), params(tmp_path, MAX_STEPS))


@pytest.mark.timeout(180)
def test_rewind_skips_each_bad_batch_by_its_data_position(tmp_path: Path) -> None:
    # Two bad batches in a row: once the first is skipped, the second is trained at the first's
    # step number, so a rewind that remembered step numbers would replay the first forever.
    done = run(tmp_path, *RUN, "nan.policy=rewind", "poison_steps=[5,6]", timeout=150)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("rewinding to") == 2, done.stderr[-4000:]
    assert steps(tmp_path)[-1] == MAX_STEPS
    assert_every_checkpoint_finite(tmp_path)
    history = xax.read_history(tmp_path, "train")
    assert [r["step"] for r in history] == list(range(1, MAX_STEPS + 1))
    assert all(np.isfinite(float(r["scalars"]["loss"])) for r in history), history


@pytest.mark.timeout(180)
def test_rewind_gives_up_on_a_bad_learning_rate(tmp_path: Path) -> None:
    bad_step, overrides = CAUSES["learning_rate"]
    done = run(tmp_path, *RUN, "nan.policy=rewind", "nan.max_rewinds=3", *overrides, timeout=150)
    assert done.returncode == 1, done.stderr[-4000:]
    line = error_line(done)
    assert "nan.max_rewinds=3" in line and "learning rate" in line, line
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / str(bad_step - 1)}" in line, line
    assert done.stderr.count("rewinding to") == 3, done.stderr[-4000:]
    assert_every_checkpoint_finite(tmp_path)
