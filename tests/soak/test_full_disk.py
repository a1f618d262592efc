"""A run whose disk fills up: the checkpoint write that fails ends the run with exit code 3 and one
line naming the directory and the free space, and the checkpoints written before stay loadable."""

import subprocess
from collections.abc import Generator
from pathlib import Path

import pytest

from tests.soak.common import all_finite, params, run, steps, verify

pytestmark = pytest.mark.soak

EXIT_SAVE_FAILED = 3


@pytest.fixture
def small_disk(tmp_path: Path) -> Generator[Path]:
    """A 12 MiB file system (tmpfs), unmounted afterwards; skips where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True, text=True, check=False
        )
    except OSError as error:
        pytest.skip(f"cannot run mount: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


@pytest.mark.timeout(300)
def test_full_disk_exits_3_with_one_line_and_keeps_the_older_checkpoints(small_disk: Path) -> None:
    # 4 MB of weights saved every other step, none deleted: the third save does not fit.
    run_dir = small_disk / "run"
    done = run(
        run_dir,
        "max_steps=40",
        "ballast=1000000",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=20",
        "log.every_n_steps=1",
        "valid_every_n_steps=null",
    )
    assert done.returncode == EXIT_SAVE_FAILED, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    lines = done.error_lines()
    assert len(lines) == 1, "\n".join(lines)
    assert str(run_dir / "checkpoints") in lines[0] and "free" in lines[0], lines[0]

    kept = steps(run_dir)
    assert kept, "no checkpoint was written before the disk filled"
    for step in kept:
        assert all_finite(params(run_dir, step)), step
    checked = verify(run_dir / "checkpoints" / str(kept[-1]))
    assert checked.returncode == 0, checked.stderr[-2000:]
