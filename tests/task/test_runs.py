"""``xax runs diff``: real runs of a small task that differ in one thing each, compared by their
provenance and their logged curves."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jaxtyping import Array, PRNGKeyArray

import xax
from tests.task.toy import regression_dataset
from xax.cli import main
from xax.task.provenance import PROVENANCE_NAME, read_provenance

SECRET = "hunter2-do-not-record"


@dataclass
class WidthConfig(xax.SupervisedConfig):
    hidden: int = xax.field(8, help="Width of the hidden layer")


class WidthRegression(xax.SupervisedTask[WidthConfig]):
    """An MLP on the toy regression, with the optimizer of the ``optim`` group."""

    data_seed = 0  # the training data, outside the config, as a data file that changed would be

    def get_model(self, params: xax.InitParams) -> eqx.nn.MLP:
        return eqx.nn.MLP(4, "scalar", self.config.hidden, depth=1, key=params.key)

    def get_output(self, model: eqx.nn.MLP, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray) -> Array:
        return jax.vmap(model)(batch["x"])

    def compute_loss(
        self, model: eqx.nn.MLP, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return jnp.mean((output - batch["y"]) ** 2)

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        return regression_dataset(256, self.data_seed) if phase == "train" else regression_dataset(64, 100)


def train(run_dir: Path, *overrides: str) -> Path:
    config = WidthConfig(batch_size=32, max_steps=4, valid_every_n_steps=4)
    argv = [f"artifacts.run_dir={run_dir}", "log.every_n_steps=1", "log.stdout=false", *overrides]
    WidthRegression.launch(config, argv=argv)
    return run_dir


def diff(capsys: pytest.CaptureFixture[str], a: Path, b: Path) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["runs", "diff", str(a), str(b)])
    return code, capsys.readouterr().out.splitlines()


def summary(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith(("Differs in:", "Provenance:")))


def curve(lines: list[str], name: str) -> str:
    """The curve comparison row of metric ``name``, its spaces collapsed."""
    return next(" ".join(line.split()) for line in lines if line.split()[:1] == [name])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GIT_CEILING_DIRECTORIES", str(root))
        patch.chdir(root)
        yield train(root / "run")


def test_identical_runs_are_the_same_and_record_every_section(
    base: Path, outside_git: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = diff(capsys, base, train(outside_git / "again"))
    assert code == 0, lines
    assert summary(lines) == "Provenance: no differences"
    assert curve(lines, "train/loss").startswith("train/loss same at all 4 logged steps; final ")
    assert curve(lines, "valid/loss").startswith("valid/loss same at all 1 logged steps; final ")
    (entry,) = read_provenance(base)
    assert entry["start_step"] == 0 and len(entry["step"]["sha256"]) == 64
    assert entry["data"]["train"]["rows"] == 256 and entry["data"]["valid"]["rows"] == 64
    assert entry["jax"]["device_count"] == jax.device_count() and entry["jax"]["backend"] == "cpu"
    assert entry["versions"]["jax"] == jax.__version__ and entry["config"]["hidden"] == 8
    assert entry["xax"]["module_sha256"]["xax.task.runs"] and entry["git"] is None


def test_a_model_width_changes_the_compiled_step(
    base: Path, outside_git: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = diff(capsys, base, train(outside_git / "wide", "hidden=16"))
    assert code == 1
    assert summary(lines) == "Differs in: compiled step (sha256); config (hidden)"
    config = lines.index("4 config")
    assert lines[config + 1] == "    hidden: 8 -> 16"


def test_a_seed_changes_the_config_and_the_curves_not_the_program(
    base: Path, outside_git: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seed reaches the step as data (the PRNG key, the initial weights, the batches' order).
    code, lines = diff(capsys, base, train(outside_git / "seed", "seed=1", "log.every_n_steps=2"))
    assert code == 1
    assert summary(lines) == "Differs in: config (seed)"
    config = lines.index("4 config")
    assert lines[config + 1 : config + 3] == [
        "    seed: 0 -> 1",
        "    log.every_n_steps: 1 -> 2  (cannot change the numbers)",
    ]
    assert curve(lines, "train/loss").startswith("train/loss differs from step 2 (")  # B logs every other step
    assert curve(lines, "train/learning_rate").startswith("train/learning_rate same at the 2 steps logged by both")


def test_other_data_under_the_same_config(
    base: Path, outside_git: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(WidthRegression, "data_seed", 1)
    code, lines = diff(capsys, base, train(outside_git / "data"))
    assert code == 1
    assert summary(lines) == "Differs in: data (train.fingerprint)"
    assert not any(line.startswith(("1 ", "3 ", "4 ", "5 ")) for line in lines)
    assert curve(lines, "train/loss").startswith("train/loss differs from step 1 (")


def test_environment_flags_are_recorded_and_secrets_never(
    base: Path, outside_git: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_fast_math=false".strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    for name in ("JAX_API_TOKEN", "XLA_SECRET", "WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MY_PASSWORD"):
        monkeypatch.setenv(name, SECRET)
    run = train(outside_git / "env")
    code, lines = diff(capsys, base, run)
    assert code == 1
    section = lines.index("3 versions, backend, devices, flags, environment")
    assert lines[section + 1].startswith("    env.XLA_FLAGS: ") and lines[section + 1].endswith(f"-> {flags}")
    assert summary(lines) == "Differs in: versions, backend, devices, flags, environment (env.XLA_FLAGS)"
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_resume_appends_a_start_and_shows_what_changed_at_it(
    base: Path, outside_git: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = outside_git / "resumed"
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    train(run, "max_steps=2", "checkpoint.every_n_steps=1")
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    train(run, "resume=auto")
    first, second = read_provenance(run)
    assert (first["start_step"], second["start_step"]) == (0, 2)
    assert first["step"]["sha256"] == second["step"]["sha256"]
    _, lines = diff(capsys, base, run)
    start = lines.index("B changed at its start 2 (resumed at step 2):")
    assert "    env.NVIDIA_TF32_OVERRIDE: (absent) -> 0" in lines[start + 1 :]
    assert "    max_steps: 2 -> 4" in lines[start + 1 :]


def test_a_missing_run_or_provenance_is_one_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", "diff", str(base), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    nowhere = tmp_path / "nowhere"
    assert err == f"xax: error: {nowhere} is not a folder; pass a run directory (the folder holding provenance.json)"
    (tmp_path / "old").mkdir()
    assert main(["runs", "diff", str(tmp_path / "old"), str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'old' / PROVENANCE_NAME} is missing" in err
    (tmp_path / "old" / PROVENANCE_NAME).write_text("{not json")
    assert main(["runs", "diff", str(tmp_path / "old"), str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is unreadable (JSONDecodeError" in err and "rerun the task" in err
    assert json.loads((base / PROVENANCE_NAME).read_text())["format"] == 1


def test_an_unreadable_provenance_is_kept_aside_when_a_run_starts_in_its_folder(
    outside_git: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = outside_git / "run"
    run.mkdir()
    (run / PROVENANCE_NAME).write_text("{cut short")
    train(run, "max_steps=1")
    assert (run / f"{PROVENANCE_NAME}.unreadable").read_text() == "{cut short"
    assert [entry["start_step"] for entry in read_provenance(run)] == [0]
    assert f"kept it as {run / PROVENANCE_NAME}.unreadable" in caplog.text


@pytest.mark.slow
def test_xla_flags_given_to_a_process_show_with_the_devices_they_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two command-line runs of one config, the second with XLA_FLAGS giving the CPU backend two devices."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(PYTHONPATH=str(root), GIT_CEILING_DIRECTORIES=str(tmp_path))
    flags = "--xla_force_host_platform_device_count=2"
    for name, extra in (("one", {}), ("two", {"XLA_FLAGS": flags})):
        argv = [f"artifacts.run_dir={tmp_path / name}", "max_steps=4", "log.stdout=false"]
        proc = subprocess.run(
            [sys.executable, "-m", "tests.task.toy_main", *argv],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    code, lines = diff(capsys, tmp_path / "one", tmp_path / "two")
    assert code == 1
    section = lines.index("3 versions, backend, devices, flags, environment")
    assert f"    env.XLA_FLAGS: (absent) -> {flags}" in lines[section:]
    assert "    jax.device_count: 1 -> 2" in lines[section:]
    assert not any(line.startswith(("2 ", "4 ", "5 ")) for line in lines)
