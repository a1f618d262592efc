"""A checkpoint committed with the tests (written by ``make_fixture.py``) still restores, three ways:
resuming a task from it, ``restore_weights`` for sampling, and ``xax ckpt inspect --verify``."""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import pytest

from tests.checkpoint.make_fixture import FIXTURES, FixtureTask, TinyMLP, array_sums, fixture_argv, fixture_config
from xax.checkpoint import restore_weights
from xax.cli import main

FIXTURE_NAMES = sorted(path.name for path in FIXTURES.iterdir() if (path / "fixture.json").is_file())


def test_a_fixture_is_committed() -> None:
    assert "v0_1_0_mlp" in FIXTURE_NAMES


@pytest.fixture(params=FIXTURE_NAMES)
def fixture(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of one committed fixture (a restore must not write into the repository) and its record."""
    source = FIXTURES / request.param
    copy = tmp_path / "fixture"
    shutil.copytree(source, copy)
    return copy, json.loads((source / "fixture.json").read_text())


def with_prefix(sums: dict[str, float], prefix: str) -> dict[str, float]:
    return {name.removeprefix(prefix): value for name, value in sums.items() if name.startswith(prefix)}


@pytest.mark.parametrize("launcher", ["launcher.kind=single_device", "launcher.kind=multi_device"])
def test_resume_restores_state_step_and_cursor(
    fixture: tuple[Path, dict[str, Any]], tmp_path: Path, launcher: str
) -> None:
    path, record = fixture
    step_dir = path / "checkpoints" / str(record["step"])
    restored: list[Any] = []
    tasks: list[FixtureTask] = []

    class Resumed(FixtureTask):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

        def restore_training(self, target: Any) -> Any:
            result = super().restore_training(target)
            restored.append(result)
            return result

    # max_steps is the fixture's step: the run restores and trains no further.
    Resumed.launch(fixture_config(), argv=fixture_argv(tmp_path / "run", f"resume={step_dir}", launcher))
    assert len(restored) == 1 and restored[0] is not None
    tree, info = restored[0]
    assert info.step == record["step"]
    assert info.path == step_dir.resolve()
    assert info.state.to_dict() == record["state"]
    assert info.cursor.to_dict() == record["cursor"]
    assert array_sums(tree._asdict()) == record["array_sums"]
    final = tasks[0].final_train_state
    assert final is not None
    assert array_sums(final._asdict()) == record["array_sums"]
    devices = 1 if launcher.endswith("single_device") else len(jax.devices())
    assert final.params.hidden.weight.sharding.mesh.devices.size == devices


@pytest.mark.parametrize("prefer_ema", [True, False])
def test_restore_weights(fixture: tuple[Path, dict[str, Any]], prefer_ema: bool) -> None:
    path, record = fixture
    model = restore_weights(TinyMLP(key=jax.random.key(1)), path / "checkpoints", record["step"], prefer_ema=prefer_ema)
    assert array_sums(model) == with_prefix(record["array_sums"], "ema." if prefer_ema else "params.")


def test_inspect_verify_passes_its_checksums(
    fixture: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, record = fixture
    assert main(["ckpt", "inspect", "--verify", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == f"Checkpoint {(path / 'checkpoints' / str(record['step'])).resolve()}"
    arrays = len(record["array_sums"])
    assert lines[-1] == f"Verified: {arrays} arrays read back, each matching its checksum"
    assert re.search(rf"^\s*checksums\s+{arrays} arrays \(xax-fmix32-sum-v1\)$", captured.out, re.MULTILINE)
