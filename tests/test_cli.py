"""The ``xax ckpt`` command on checkpoints written by a real (tiny) training run."""

import re
import shutil
import subprocess
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from etils import epath

import xax
from tests.task.toy import Regression, RegressionConfig, final_params
from xax.checkpoint import named_leaves
from xax.cli import (
    Checkpoint,
    Leaf,
    _ClosedLoopFilter,
    diff_lines,
    human_bytes,
    leaf_difference,
    main,
    open_checkpoint,
    read_arrays,
)
from xax.data import Cursor
from xax.task.mixins.artifacts import ArtifactsConfig, ArtifactsMixin
from xax.task.mixins.checkpointing import CheckpointingConfig, CheckpointingMixin

REPO_ROOT = Path(xax.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Regression]:
    """A run directory with checkpoints at steps 2 and 4, and the task that wrote them."""
    run_dir = tmp_path_factory.mktemp("run")
    tasks: list[Regression] = []

    class Recorded(Regression):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    Recorded.launch(
        RegressionConfig(batch_size=32, max_steps=4),
        argv=[
            f"artifacts.run_dir={run_dir}",
            "log.stdout=false",
            "log.tensorboard=false",
            "checkpoint.every_n_steps=2",
        ],
    )
    return run_dir, tasks[0]


def inspect_output(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["ckpt", "inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def row(text: str, *cells: str) -> bool:
    """Whether ``text`` has a line holding exactly these cells, separated by spaces."""
    return re.search(r"^\s*" + r"\s+".join(re.escape(cell) for cell in cells) + r"\s*$", text, re.MULTILINE) is not None


def test_inspect_prints_step_counters_arrays_and_size(run: tuple[Path, Regression], capsys) -> None:
    run_dir, _ = run
    step_dir = run_dir / "checkpoints" / "4"
    out = inspect_output(run_dir, capsys)
    assert out.splitlines()[0] == f"Checkpoint {step_dir}"
    assert row(out, "step", "4")
    assert row(out, "xax version", xax.__version__)
    assert row(out, "mesh", "data=4 x fsdp=1 x tensor=1")  # conftest's four simulated devices, plan dp
    assert row(out, "num_steps", "4")
    assert row(out, "num_samples", "128")
    assert row(out, "index", "4")  # data cursor: four batches of the first epoch consumed
    assert row(out, "params: 2 arrays, 5 parameters, 20 B")
    assert row(out, "params.weight", "(1, 4)", "float32")
    assert row(out, "params.bias", "(1,)", "float32")
    assert row(out, "key: 1 array, 2 parameters, 8 B")
    assert row(out, "key", "(2,)", "uint32")
    assert row(out, "frozen: empty")
    on_disk = sum(path.stat().st_size for path in step_dir.rglob("*") if path.is_file())
    assert row(out, "size on disk", f"{human_bytes(on_disk)} ({on_disk:,} bytes)")
    config = yaml.safe_load("\n".join(line[2:] for line in out.split("\nConfig\n", 1)[1].splitlines()))
    assert config["max_steps"] == 4
    assert config["batch_size"] == 32
    assert config["checkpoint"]["every_n_steps"] == 2


@pytest.mark.parametrize(("relative", "step"), [("checkpoints", 4), ("checkpoints/2", 2)])
def test_inspect_accepts_checkpoints_and_step_directories(
    run: tuple[Path, Regression], capsys, relative: str, step: int
) -> None:
    out = inspect_output(run[0] / relative, capsys)
    assert row(out, "step", str(step))
    assert row(out, "num_samples", str(32 * step))


def test_read_arrays_matches_the_state_the_run_ended_with(run: tuple[Path, Regression]) -> None:
    run_dir, task = run
    arrays = read_arrays(open_checkpoint(run_dir))
    ended = named_leaves(final_params(task))
    assert sorted(arrays) == sorted(ended)
    assert {"params.weight", "params.bias", "key"} <= set(arrays)
    for name, value in ended.items():
        np.testing.assert_array_equal(arrays[name], np.asarray(value), err_msg=name)


def test_diff_with_itself_reports_nothing(run: tuple[Path, Regression], capsys) -> None:
    run_dir, _ = run
    assert main(["ckpt", "diff", str(run_dir), str(run_dir / "checkpoints" / "4")]) == 0
    assert capsys.readouterr().out == ""


def test_diff_between_steps_names_changed_leaves(run: tuple[Path, Regression], capsys) -> None:
    checkpoints = run[0] / "checkpoints"
    assert main(["ckpt", "diff", str(checkpoints / "2"), str(checkpoints / "4")]) == 1
    out = capsys.readouterr().out
    before, after = read_arrays(open_checkpoint(checkpoints / "2")), read_arrays(open_checkpoint(checkpoints / "4"))
    for name in ("params.weight", "params.bias"):
        match = re.search(rf"^\s+{re.escape(name)}\s+(\S+)\s+(\S+)$", out, re.MULTILINE)
        assert match is not None, out
        delta = after[name].astype(np.float64) - before[name].astype(np.float64)
        max_abs, relative = float(match.group(1)), float(match.group(2))
        assert max_abs > 0
        # Printed to 6 significant digits.
        np.testing.assert_allclose(max_abs, np.max(np.abs(delta)), rtol=1e-5)
        np.testing.assert_allclose(relative, np.linalg.norm(delta) / np.linalg.norm(before[name]), rtol=1e-5)
    assert row(out, "num_steps", "2 -> 4")
    assert row(out, "index", "2 -> 4")
    assert "Config" not in out  # same run: same config
    assert main(["ckpt", "diff", "--arrays-only", str(checkpoints / "2"), str(checkpoints / "4")]) == 1
    assert "num_steps" not in capsys.readouterr().out


def test_diff_reports_missing_and_reshaped_leaves_and_config(tmp_path: Path) -> None:
    f32 = np.dtype(np.float32)
    a = Checkpoint(
        epath.Path(tmp_path),
        1,
        None,
        {"params.w": Leaf((2,), f32), "params.old": Leaf((3,), f32)},
        {"state": {"num_steps": 1}, "config": {"optimizer": {"lr": 0.1}}},
    )
    b = Checkpoint(
        epath.Path(tmp_path),
        2,
        None,
        {"params.w": Leaf((4,), f32), "params.new": Leaf((), np.dtype(np.int32))},
        {"state": {"num_steps": 1}, "config": {"optimizer": {"lr": 0.2}}},
    )
    text = "\n".join(diff_lines(a, b))
    assert row(text, "params.old", "(3,) float32")
    assert row(text, "params.new", "() int32")
    assert row(text, "params.w", "(2,) float32 -> (4,) float32")
    assert row(text, "optimizer.lr", "0.1 -> 0.2")
    assert "Only in A\n" in text
    assert "Only in B\n" in text
    assert "State" not in text


def test_leaf_difference_against_closed_forms() -> None:
    # |b - a| = (0, 1), ||a|| = 5.
    assert leaf_difference(np.array([3.0, 4.0], np.float32), np.array([3.0, 5.0], np.float32)) == (1.0, 0.2)
    assert leaf_difference(np.zeros(2, np.float32), np.zeros(2, np.float32)) == (0.0, 0.0)
    assert leaf_difference(np.zeros(2, np.float32), np.ones(2, np.float32)) == (1.0, float("inf"))
    assert leaf_difference(np.array([7], np.uint32), np.array([2], np.uint32)) == (5.0, 5 / 7)


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * 1024**3)] == ["0 B", "1023 B", "1.5 KiB", "3.0 GiB"]


def corrupt_state(step_dir: Path) -> Path:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return step_dir / "state"


def corrupt_meta(step_dir: Path) -> Path:
    (step_dir / "meta" / "metadata").write_text('{"format": 1, "sta')
    return step_dir / "meta"


@pytest.mark.parametrize("corrupt", [corrupt_state, corrupt_meta])
def test_corrupt_checkpoint_is_one_line_naming_the_file(
    run: tuple[Path, Regression], tmp_path: Path, capsys, corrupt
) -> None:
    step_dir = tmp_path / "checkpoints" / "4"
    shutil.copytree(run[0] / "checkpoints" / "4", step_dir)
    named = corrupt(step_dir)
    for argv in (
        ["inspect", str(step_dir)],
        ["inspect", "--verify", str(step_dir)],
        ["diff", str(run[0]), str(step_dir)],
    ):
        assert main(["ckpt", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.splitlines()) == 1
        assert captured.err.startswith(f"xax: error: {named} is unreadable (")


def test_missing_path_and_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["ckpt", "inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"xax: error: {tmp_path / 'nowhere'} does not exist; " + (
        "pass a run directory, a checkpoints directory or a step\n"
    )
    assert main(["ckpt", "inspect", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["ckpt", "diff", str(tmp_path)]) == 2
    assert "required: B" in capsys.readouterr().err
    assert main(["ckpt", "--help"]) == 0
    assert "inspect" in capsys.readouterr().out


def test_console_command_exit_code(run: tuple[Path, Regression]) -> None:
    """Through a fresh process: one CPU device reads checkpoints saved on four."""
    checkpoints = run[0] / "checkpoints"
    command = [sys.executable, "-m", "xax.cli", "ckpt", "diff", str(checkpoints / "2"), str(checkpoints / "4")]
    changed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert changed.returncode == 1, changed.stderr
    assert changed.stderr == ""
    assert row(changed.stdout, "num_steps", "2 -> 4")
    assert re.search(r"^\s+params\.weight\s", changed.stdout, re.MULTILINE)


def test_closed_loop_reports_are_dropped_and_others_passed_on() -> None:
    """Reads still in flight when another read failed report into orbax's closed event loop."""
    passed_on: list[BaseException] = []
    hook = _ClosedLoopFilter(lambda unraisable: passed_on.append(unraisable.exc_value))
    other = ValueError("a real problem")
    for error in (RuntimeError("Event loop is closed"), other):
        hook(SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=None))
    assert passed_on == [other]


def test_failed_reads_of_orbax_coroutines_are_dropped_and_others_passed_on() -> None:
    """Orbax's other reads of a damaged checkpoint fail after the first failure was raised; their
    coroutines report when collected. Only orbax's own coroutines are dropped."""
    passed_on: list[object] = []
    hook = _ClosedLoopFilter(lambda unraisable: passed_on.append(unraisable.object))

    def coroutine_from(filename: str) -> Coroutine[None, None, None]:
        code = compile("async def read():\n    pass\n", filename, "exec")
        namespace: dict[str, object] = {}
        exec(code, namespace)
        read = namespace["read"]
        assert callable(read)
        coroutine = read()
        assert isinstance(coroutine, Coroutine)
        return coroutine

    ours = coroutine_from("/site-packages/orbax/checkpoint/_src/serialization/serialization.py")
    theirs = coroutine_from("/site-packages/somewhere/else.py")
    error = Exception("Encountered error while reading array index")
    for coroutine in (ours, theirs):
        hook(SimpleNamespace(exc_type=Exception, exc_value=error, exc_traceback=None, err_msg=None, object=coroutine))
        coroutine.close()
    assert passed_on == [theirs]


@dataclass
class _SaveOnlyConfig(CheckpointingConfig, ArtifactsConfig):
    pass


class _SaveOnly(CheckpointingMixin[_SaveOnlyConfig], ArtifactsMixin[_SaveOnlyConfig]):
    """The checkpointing mixin alone, as the training loop drives it."""


def test_inspect_prints_the_validation_metrics_of_the_checkpoints_own_step(tmp_path: Path, capsys) -> None:
    config = _SaveOnlyConfig()
    config.artifacts.run_dir = str(tmp_path)
    saver = _SaveOnly(config)
    tree = {"params": {"w": jnp.arange(3.0)}}
    saver.last_valid_metrics, saver.last_valid_step = {"loss": 0.125, "accuracy": 0.75}, 4
    saver.save_checkpoint(tree, xax.State(num_steps=4), Cursor(), wait=True)
    saver.save_checkpoint(tree, xax.State(num_steps=6), Cursor(), wait=True)  # no validation at step 6
    saver.on_run_end()

    validated = inspect_output(tmp_path / "checkpoints" / "4", capsys)
    section = validated.split("\nValidation metrics\n", 1)[1]
    assert row(section.split("\nArrays:", 1)[0], "loss", "0.125")
    assert row(section.split("\nArrays:", 1)[0], "accuracy", "0.75")
    not_validated = inspect_output(tmp_path / "checkpoints" / "6", capsys)
    assert "\nValidation metrics\n  none\n" in not_validated  # not step 4's
    assert row(validated, "checksums", "1 array (xax-fmix32-sum-v1)")


def test_verify_names_the_array_whose_bytes_changed(tmp_path: Path, capsys) -> None:
    config = _SaveOnlyConfig()
    config.artifacts.run_dir = str(tmp_path)
    saver = _SaveOnly(config)
    # Large enough to be stored in a data file of its own (small arrays sit in the checksummed index).
    tree = {"params": {"small": jnp.ones(3), "large": jnp.linspace(0.0, 1.0, 65536)}}
    saver.save_checkpoint(tree, xax.State(num_steps=1), Cursor(), wait=True)
    saver.on_run_end()
    step_dir = tmp_path / "checkpoints" / "1"
    assert main(["ckpt", "inspect", "--verify", str(step_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "Verified: 2 arrays read back, each matching its checksum"
    data = max(
        (path for path in (step_dir / "state").rglob("*") if path.is_file() and path.parent.name == "d"),
        key=lambda path: path.stat().st_size,
    )
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    data.write_bytes(bytes(flipped))
    assert main(["ckpt", "inspect", str(step_dir)]) == 0  # metadata alone: no array is read
    capsys.readouterr()
    assert main(["ckpt", "inspect", "--verify", str(step_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"xax: error: checkpoint {step_dir} is corrupt: array params.large does not match its checksum "
        f"(its data under {step_dir / 'state'} changed after it was written)\n"
    )
