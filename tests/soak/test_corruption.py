"""The newest checkpoint damaged on disk (a data file truncated, a byte flipped, a file or directory
deleted): ``resume=auto`` falls back to the one before, says so, and the finished run leaves only
checkpoints that verify, its weights those of a run never interrupted."""

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.soak.common import Finished, assert_bitwise_equal, params, records, run, steps, verify

pytestmark = pytest.mark.soak

EVERY = 4
FIRST_STEPS, LAST_STEPS = 12, 20
# 400 kB of weights in one array: the largest data file of a checkpoint is mostly weights.
COMMON = (
    f"checkpoint.every_n_steps={EVERY}",
    "checkpoint.keep_last=3",
    "ballast=100000",
    "log.every_n_steps=1",
    "log.every_n_seconds=null",
    "valid_every_n_steps=null",
)


def largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no data file under {step_dir / 'state'}"
    return max(files, key=lambda p: (p.stat().st_size, p.name))


def truncate(step_dir: Path) -> None:
    path = largest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(step_dir: Path) -> None:
    path = largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def delete_file(step_dir: Path) -> None:
    largest_data_file(step_dir).unlink()


def delete_dir(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "state")


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncate": truncate,
    "flip_byte": flip_byte,
    "delete_file": delete_file,
    "delete_dir": delete_dir,
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    done = run(run_dir, f"max_steps={LAST_STEPS}", *COMMON)
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.timeout(300)
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path: Path, straight: Path, damage: str) -> None:
    first = run(tmp_path, f"max_steps={FIRST_STEPS}", *COMMON)
    assert first.returncode == 0, first.stderr
    assert steps(tmp_path) == [4, 8, 12]
    newest = tmp_path / "checkpoints" / str(FIRST_STEPS)
    DAMAGES[damage](newest)

    second = run(tmp_path, f"max_steps={LAST_STEPS}", "resume=auto", *COMMON)
    assert second.returncode == 0, second.stderr
    assert str(newest) in second.stderr and re.search(r"\bf[ae]ll(s|ing)? back", second.stderr), second.stderr
    # It went on from step 8: the log's records after the first run's start there.
    train = [r["step"] for r in records(tmp_path, "train")]
    assert train[FIRST_STEPS] == FIRST_STEPS - EVERY + 1, train

    # Every checkpoint left verifies: the damaged one was written again (or removed).
    left = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert left[-1] == LAST_STEPS
    for step in left:
        checked: Finished = verify(tmp_path / "checkpoints" / str(step))
        assert checked.returncode == 0, f"checkpoint {step}: {checked.stderr[-2000:]}"
    assert_bitwise_equal(params(straight, LAST_STEPS), params(tmp_path, LAST_STEPS))
