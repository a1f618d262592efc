"""Tests for the run directory and the run metadata."""

import json
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import jax
import pytest

from xax.core.errors import ConfigError
from xax.task.mixins.artifacts import (
    ArtifactsConfig,
    ArtifactsMixin,
    ArtifactsOptions,
    next_run_dir,
    read_git_state,
)


@dataclass
class Cfg(ArtifactsConfig):
    pass


class ArtifactsTestTask(ArtifactsMixin[Cfg]):
    pass


requires_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _task(root: Path, run_dir: Path | None = None) -> ArtifactsTestTask:
    options = ArtifactsOptions(runs_root=str(root), run_dir=None if run_dir is None else str(run_dir))
    return ArtifactsTestTask(Cfg(artifacts=options))


def _git(cwd: Path, *args: str) -> str:
    base = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    return subprocess.run([*base, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def git_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("lr = 1e-3\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "first")
    monkeypatch.chdir(repo)
    return repo


def test_first_run_is_run_000(tmp_path: Path) -> None:
    task = _task(tmp_path / "runs")
    assert task.run_dir == tmp_path / "runs" / "artifacts_test_task" / "run_000"
    assert task.run_dir.is_dir()


def test_next_number_follows_the_highest(tmp_path: Path) -> None:
    parent = tmp_path / "runs" / "artifacts_test_task"
    for name in ("run_009", "run_010", "run_2", "run_abc", "run_12x", "notes"):
        (parent / name).mkdir(parents=True)
    task = _task(tmp_path / "runs")
    assert task.run_dir.name == "run_011"
    assert task.run_dir.is_dir()


def test_numbers_compare_as_integers(tmp_path: Path) -> None:
    (tmp_path / "run_999").mkdir()
    (tmp_path / "run_100").mkdir()
    assert next_run_dir(tmp_path).name == "run_1000"
    assert next_run_dir(tmp_path).name == "run_1001"


def test_run_dir_is_cached_and_new_tasks_get_new_dirs(tmp_path: Path) -> None:
    first = _task(tmp_path)
    assert first.run_dir == first.run_dir
    second = _task(tmp_path)
    assert second.run_dir.name == "run_001"
    assert first.run_dir.name == "run_000"


def test_run_dir_is_made_lazily(tmp_path: Path) -> None:
    task = _task(tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    task.on_run_start()
    assert (tmp_path / "runs" / "artifacts_test_task" / "run_000").is_dir()
    task.on_run_end()


def test_concurrent_creation_never_shares_a_dir(tmp_path: Path) -> None:
    results: list[Path] = []
    lock = threading.Lock()

    def make() -> None:
        run_dir = next_run_dir(tmp_path)
        with lock:
            results.append(run_dir)

    threads = [threading.Thread(target=make) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 16
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"run_{i:03d}" for i in range(16)]


def test_explicit_run_dir(tmp_path: Path) -> None:
    explicit = tmp_path / "my" / "run"
    task = _task(tmp_path / "runs", run_dir=explicit)
    assert task.run_dir == explicit
    assert explicit.is_dir()
    assert not (tmp_path / "runs").exists()


def test_relative_paths_are_made_absolute(outside_git: Path) -> None:
    task = ArtifactsTestTask(Cfg(artifacts=ArtifactsOptions(runs_root="out")))
    assert task.run_dir.is_absolute()
    assert task.run_dir == outside_git / "out" / "artifacts_test_task" / "run_000"
    assert Cfg().artifacts.runs_root == "runs"
    assert Cfg().artifacts.run_dir is None


def test_empty_runs_root_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"artifacts\.runs_root"):
        ArtifactsTestTask(Cfg(artifacts=ArtifactsOptions(runs_root=""))).validate_config()


def test_other_processes_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    explicit = tmp_path / "explicit"
    task = _task(tmp_path, run_dir=explicit)
    assert task.run_dir == explicit
    task.write_run_metadata("a: 1\n")
    assert not explicit.exists()
    auto = _task(tmp_path / "runs")
    assert auto.run_dir.name == "run_000"
    assert not (tmp_path / "runs").exists()


@requires_git
def test_metadata_in_a_dirty_repo(tmp_path: Path, git_repo: Path) -> None:
    commit = _git(git_repo, "rev-parse", "HEAD").strip()
    (git_repo / "train.py").write_text("lr = 3e-4\n")
    task = _task(tmp_path / "runs")
    task.write_run_metadata("model:\n  hidden: 512\n")
    run_dir = task.run_dir

    assert (run_dir / "config.yaml").read_text() == "model:\n  hidden: 512\n"
    assert json.loads((run_dir / "git.json").read_text()) == {"commit": commit, "branch": "main", "dirty": True}
    diff = (run_dir / "git.diff").read_text()
    assert "-lr = 1e-3" in diff
    assert "+lr = 3e-4" in diff

    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["jax"] == jax.__version__
    assert {"platform", "numpy", "jaxlib"} <= set(versions)
    assert all(isinstance(value, str) for value in versions.values())

    command = (run_dir / "command.txt").read_text()
    assert shlex.split(command) == [sys.executable, *sys.argv]
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "command.txt",
        "config.yaml",
        "git.diff",
        "git.json",
        "versions.json",
    ]


@requires_git
def test_metadata_in_a_clean_repo(tmp_path: Path, git_repo: Path) -> None:
    run_dir = tmp_path / "explicit"
    task = _task(tmp_path / "runs", run_dir=run_dir)
    run_dir.mkdir()
    (run_dir / "git.diff").write_text("left by an older run")
    task.write_run_metadata("a: 1\n")
    assert json.loads((run_dir / "git.json").read_text())["dirty"] is False
    assert not (run_dir / "git.diff").exists()


def test_metadata_outside_a_repo(tmp_path: Path, outside_git: Path) -> None:
    assert read_git_state() is None
    task = _task(tmp_path / "runs")
    task.write_run_metadata("a: 1\n")
    names = sorted(path.name for path in task.run_dir.iterdir())
    assert names == ["command.txt", "config.yaml", "versions.json"]


def test_missing_git_fails_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert read_git_state(tmp_path) is None


@requires_git
def test_environment_variables_are_never_written(
    tmp_path: Path, git_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-fake-1f0c9e27b6d84a3a"
    monkeypatch.setenv("XAX_TEST_API_KEY", secret)
    (git_repo / "train.py").write_text("lr = 3e-4\n")
    task = _task(tmp_path / "runs")
    task.write_run_metadata("a: 1\n")
    files = [path for path in task.run_dir.rglob("*") if path.is_file()]
    assert len(files) == 5
    for path in files:
        text = path.read_text()
        assert secret not in text, path.name
        assert "XAX_TEST_API_KEY" not in text, path.name
