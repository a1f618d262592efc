"""Running the soak task the way a user does (a subprocess per run) and reading what it leaves behind."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from xax.checkpoint import checkpoint_steps, load_arrays_anywhere

ROOT = Path(__file__).resolve().parents[2]
# The console command a user runs (installed next to the interpreter).
XAX = Path(sys.executable).parent / "xax"


def _env() -> dict[str, str]:
    # The test process's JAX settings (4 simulated CPU devices) are not the user's.
    return {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}


def start(run_dir: Path, *overrides: str, **popen: Any) -> subprocess.Popen[str]:
    """Starts ``python -m tests.soak.tasks`` writing into ``run_dir`` (no TensorBoard, no stdout log);
    its output goes to pipes unless ``popen`` says otherwise."""
    argv = [f"artifacts.run_dir={run_dir}", "compile.cache=false", "log.tensorboard=false", "log.stdout=false"]
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.soak.tasks", *argv, *overrides], cwd=ROOT, env=_env(), text=True, **options
    )


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run(run_dir: Path, *overrides: str, timeout: float = 180, **popen: Any) -> Finished:
    """Runs the task to its end; a run still going after ``timeout`` seconds is killed and reported."""
    proc = start(run_dir, *overrides, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout} s; stderr:\n{err[-4000:]}") from None
    return Finished(proc.returncode, out, err)


def lines(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``log.jsonl`` in the order written: records, and the markers (``event``) a
    resumed or rewound run writes before its own records."""
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def records(run_dir: Path, phase: str | None = None) -> list[dict[str, Any]]:
    """Every record written (of ``phase``), abandoned steps' included, without the markers."""
    return [r for r in lines(run_dir) if "event" not in r and (phase is None or r["phase"] == phase)]


def steps(run_dir: Path) -> list[int]:
    return checkpoint_steps(run_dir / "checkpoints")


def saved(run_dir: Path, step: int) -> dict[str, Any]:
    """Every array of one checkpoint, read onto this process's first device, as numpy."""
    tree = load_arrays_anywhere(
        run_dir / "checkpoints", step, jax.sharding.make_single_device_sharding(jax.devices()[0])
    )
    return jax.tree.map(np.asarray, tree)


def params(run_dir: Path, step: int) -> list[np.ndarray]:
    return jax.tree.leaves(saved(run_dir, step)["params"])


def all_finite(arrays: list[np.ndarray]) -> bool:
    return all(bool(np.all(np.isfinite(a))) for a in arrays)


def assert_bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"max |difference| {np.max(np.abs(x - y))}"


def verify(path: Path) -> Finished:
    """``xax ckpt inspect --verify PATH``: reads every array of the checkpoint."""
    done = subprocess.run(
        [str(XAX), "ckpt", "inspect", "--verify", str(path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Finished(done.returncode, done.stdout, done.stderr)
