"""What a run shows its user: the screen of a real example under a terminal, piped lines, the
log handler and run.log, and the JAX settings a run leaves as it found them."""

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import pyte
import pytest

from tests.task.toy import Regression, RegressionConfig
from xax.task.loggers.jsonl import read_history

ROOT = Path(__file__).resolve().parents[3]
COLUMNS, ROWS = 120, 60


def run_in_terminal(argv: list[str], env: dict[str, str], timeout_s: float = 300.0) -> tuple[int, list[str]]:
    """Runs ``argv`` with a pseudo-terminal of COLUMNS x ROWS as its stdin, stdout and stderr, and
    returns its exit code and the non-empty lines of the screen it leaves (through a VT100 emulator)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                stream.feed(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
    finally:
        os.close(master)
    return proc.wait(), [line.rstrip() for line in screen.display if line.strip()]


def test_mnist_on_a_terminal(tmp_path: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "my_cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "COLUMNS", "LINES"))}
    env.update(TERM="xterm-256color", JAX_COMPILATION_CACHE_DIR=str(cache))
    argv = [
        sys.executable,
        "-m",
        "examples.mnist",
        "max_steps=6",
        "log.every_n_steps=2",
        "log.tensorboard=false",
        f"artifacts.run_dir={run_dir}",
    ]
    code, screen = run_in_terminal(argv, env)
    text = "\n".join(screen)
    assert code == 0, text
    # The banner, then compilation, then the last validation and checkpoint above the final bar,
    # which stays on screen, then the summary.
    expected = [
        f"run directory: {run_dir}",
        r"devices: 1 x cpu \(1 process\) \| plan dp \| mesh data=1 fsdp=1 tensor=1",
        r"model: 421,642 parameters \(1.6 MiB\)",
        r"compiling the training step \.\.\.",
        r"compiled and ran the first step in \d+\.\d s",
        r"valid at step 6: loss \d\.\d+  accuracy 0\.\d+",
        f"checkpoint of step 6: {run_dir}/checkpoints/6",
        r"step 6/6 \[#{20}\] 100% \| loss \d\.\d+ \| [\d.]+k? samples/s \| elapsed 0:00:\d\d",
        r"done: 6 steps \(768 samples\) in [\d.]+ s \(training [\d.]+ s\)",
        r"best validation loss: \d\.\d+ \(step 6\)",
        f"checkpoints: {run_dir}/checkpoints \\(latest: 6\\)",
    ]
    positions = []
    for pattern in expected:
        found = [i for i, line in enumerate(screen) if re.fullmatch(pattern, line)]
        assert len(found) == 1, (pattern, text)
        positions.append(found[0])
    assert positions == sorted(positions), text
    # Nothing but the final bar remains of the progress (no half-erased bars, no system metrics).
    assert sum("step " in line and "[" in line for line in screen) == 1, text
    assert "cpu_percent" not in text and "warning" not in text and "Traceback" not in text
    # The same messages went to run.log; the user's compilation cache folder was used, not ours.
    run_log = (run_dir / "run.log").read_text()
    assert "INFO xax.task.mixins.console: run directory: " in run_log
    assert "INFO xax.task.mixins.train: checkpoint of step 6" in run_log
    assert any(cache.iterdir())


class Recorded(Regression):
    """Records the JAX and logging settings it runs under."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def run(self) -> Any:
        Recorded.seen.append(
            {
                "debug_nans": jax.config.values["jax_debug_nans"],
                "log_compiles": jax.config.values["jax_log_compiles"],
                "absl_level": logging.getLogger("absl").level,
                "handlers": list(logging.getLogger("xax").handlers),
            }
        )
        return super().run()


def launch(run_dir: Path, *overrides: str) -> None:
    argv = [
        f"artifacts.run_dir={run_dir}",
        "compile.cache=false",
        "log.tensorboard=false",
        "log.every_n_seconds=null",
        "log.every_n_steps=2",
        "valid_every_n_steps=null",
        *(overrides or ["max_steps=6"]),
    ]
    Recorded.launch(RegressionConfig(batch_size=32), argv=argv)


def test_piped_run_prints_short_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One epoch of 8 batches: the total is known once the data is open.
    launch(tmp_path, "max_epochs=1", "num_train=256", "log.every_n_steps=3")
    out, err = capsys.readouterr()
    assert err == ""  # standard error holds only what went wrong
    lines = [line for line in out.splitlines() if line.startswith(("step ", "valid at "))]
    number = r"-?\d[\d.e+-]*"
    assert [line.split("  ")[0] for line in lines[:3]] == ["step 3/8 (38%)", "step 6/8 (75%)", "step 8/8 (100%)"]
    assert re.fullmatch(rf"valid at step 8: loss {number}  abs_error {number}", lines[3]), lines[3]
    assert len(lines) == 4
    assert re.fullmatch(
        rf"step 6/8 \(75%\)  ETA 0:00:\d\d  loss {number}  abs_error {number}  grad_norm {number}  "
        rf"{number}k? samples/s",
        lines[1],
    ), lines[1]
    # System measurements (CPU, memory, data waits, FLOPs) are left to log.jsonl.
    assert not re.search(r"cpu|mem|wait|flops|epoch", "\n".join(lines))
    # The banner before the progress, the summary after it.
    assert out.startswith(f"run directory: {tmp_path}\n")
    assert re.search(r"\ndone: 8 steps \(256 samples\) in [\d.]+ s \(training [\d.]+ s\)\n", out.split(lines[-1])[1])


def test_handlers_levels_and_jax_settings_are_put_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xax_logger, absl_logger = logging.getLogger("xax"), logging.getLogger("absl")
    before = (list(xax_logger.handlers), xax_logger.level, xax_logger.propagate, absl_logger.level)
    Recorded.seen.clear()
    jax.config.update("jax_debug_nans", True)  # the user's own setting
    try:
        launch(tmp_path / "first", "max_steps=6")
        after_first = (list(xax_logger.handlers), xax_logger.level, xax_logger.propagate, absl_logger.level)
        capsys.readouterr()
        launch(
            tmp_path / "second",
            "max_steps=6",
            "log.level=warning",
            "log.absl_level=warning",
            "compile.log_compiles=true",
        )
        assert jax.config.values["jax_debug_nans"] is True
        assert jax.config.values["jax_log_compiles"] is False  # put back after the run turned it on
    finally:
        jax.config.update("jax_debug_nans", False)
    assert after_first == before
    assert (list(xax_logger.handlers), xax_logger.level, xax_logger.propagate, absl_logger.level) == before
    first, second = Recorded.seen
    # The console and run.log handlers during each run, none left from the first in the second;
    # compile.debug_nans unset leaves the user's True, compile.log_compiles=true applies for the run.
    assert len(first["handlers"]) == len(second["handlers"]) == len(before[0]) + 2
    assert [(seen["debug_nans"], seen["log_compiles"]) for seen in Recorded.seen] == [(True, False), (True, True)]
    assert (first["absl_level"], second["absl_level"]) == (logging.ERROR, logging.WARNING)
    # log.level=warning: no information on the console or in run.log.
    assert "run directory" not in capsys.readouterr().out
    assert not (tmp_path / "second" / "run.log").exists()  # made at the first message
    assert (tmp_path / "first" / "run.log").read_text().count("run directory: ") == 1


def test_the_summary_after_a_resume_names_the_best_validation_of_the_whole_run(tmp_path: Path) -> None:
    """Ranked by the largest loss, the best validation is the first (step 2), before the resume at
    step 4: the resumed run's summary names it, from the run's history."""
    argv = [
        f"artifacts.run_dir={tmp_path}",
        "log.stdout=false",
        "valid_every_n_steps=2",
        "valid_every_n_seconds=null",
        "checkpoint.best_mode=max",
    ]
    Regression.launch(RegressionConfig(batch_size=32, max_steps=4), argv=argv)
    Regression.launch(RegressionConfig(batch_size=32, max_steps=8), argv=[*argv, "resume=auto"])
    valid = {record["step"]: record["scalars"]["loss"] for record in read_history(tmp_path, phase="valid")}
    assert sorted(valid) == [2, 4, 6, 8] and max(valid, key=valid.__getitem__) == 2
    summaries = re.findall(r"best validation loss: (\S+) \(step (\d+)\)", (tmp_path / "run.log").read_text())
    assert len(summaries) == 2  # one per launch
    value, step = summaries[-1]
    assert int(step) == 2 and float(value) == pytest.approx(valid[2], rel=1e-3)
