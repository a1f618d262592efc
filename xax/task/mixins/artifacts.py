"""The run directory and the metadata that makes a run reproducible."""

import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from typing_extensions import override

from xax.core.config import field
from xax.core.errors import ConfigError, LaunchError
from xax.task.base import BaseConfig, BaseTask

logger = logging.getLogger(__name__)

_RUN_DIR_RE = re.compile(r"run_(\d+)")

# Another process may take the number we chose between our scan and our mkdir; we then try the
# next one. This many collisions in a row means something else is wrong.
_MAX_RUN_DIR_ATTEMPTS = 1000

_GIT_TIMEOUT_S = 10.0

# Packages whose versions decide a run's numerics; the ones not installed are skipped.
VERSIONED_PACKAGES: tuple[str, ...] = (
    "jax",
    "jaxlib",
    "equinox",
    "optax",
    "orbax-checkpoint",
    "datasets",
    "numpy",
    "xax",
)


@dataclass
class ArtifactsOptions:
    """Where a run writes its files."""

    runs_root: str = field("runs", help="Folder holding one subfolder per task, each holding its numbered runs")
    run_dir: str | None = field(None, help="Write the run into this folder instead of the next numbered one")


@dataclass
class ArtifactsConfig(BaseConfig):
    artifacts: ArtifactsOptions = field(ArtifactsOptions(), help="Run directory and run metadata")


Config = TypeVar("Config", bound=ArtifactsConfig)


@dataclass(frozen=True)
class GitState:
    """The state of the git repository a run was launched from.

    Attributes:
        commit: The full hash of HEAD.
        branch: The checked-out branch, or "HEAD" when detached.
        dirty: Whether tracked files differ from HEAD.
        diff: The output of ``git diff HEAD`` (empty when clean).
    """

    commit: str
    branch: str
    dirty: bool
    diff: str


def _git(args: list[str], cwd: Path) -> str | None:
    """Runs one git command; returns its stdout, or None if git is missing, fails or hangs."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.decode("utf-8", errors="replace")


def read_git_state(directory: Path | None = None) -> GitState | None:
    """Reads the commit, branch and local changes of the repository holding ``directory``.

    Args:
        directory: Any folder inside the repository; the current working directory by default.

    Returns:
        The repository's state, or None where git is not installed, the folder is in no
        repository, or the repository has no commit yet.
    """
    cwd = Path.cwd() if directory is None else directory
    commit = _git(["rev-parse", "HEAD"], cwd)
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], cwd)
    diff = _git(["diff", "HEAD"], cwd)
    if commit is None or branch is None or diff is None:
        return None
    return GitState(commit=commit.strip(), branch=branch.strip(), dirty=bool(diff.strip()), diff=diff)


def package_versions() -> dict[str, str]:
    """The Python version, the platform and the versions of the packages that decide a run's numerics."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def next_run_dir(parent: Path) -> Path:
    """Creates and returns the next numbered run folder ``parent/run_<NNN>``.

    Numbers are compared as integers (``run_1000`` follows ``run_999``) and the folder is made
    with an exclusive mkdir, so two processes starting together never share one.

    Args:
        parent: The task's folder; created if missing.

    Returns:
        The new, empty run folder.
    """
    parent.mkdir(parents=True, exist_ok=True)
    numbers = [int(match.group(1)) for entry in parent.iterdir() if (match := _RUN_DIR_RE.fullmatch(entry.name))]
    number = max(numbers, default=-1) + 1
    for _ in range(_MAX_RUN_DIR_ATTEMPTS):
        candidate = parent / f"run_{number:03d}"
        try:
            candidate.mkdir(exist_ok=False)
        except FileExistsError:
            number += 1
            continue
        return candidate
    raise FileExistsError(
        f"Could not create a new run folder in {parent} after {_MAX_RUN_DIR_ATTEMPTS} attempts; "
        "set artifacts.run_dir to choose one explicitly"
    )


def make_run_dir(options: ArtifactsOptions, task_name: str) -> Path:
    """Creates and returns a run's folder: ``artifacts.run_dir`` when set (made if missing, reused if
    not), else the next numbered ``<artifacts.runs_root>/<task_name>/run_<NNN>``.

    Args:
        options: ``artifacts``.
        task_name: The task's name (``task_name()``), the folder holding its numbered runs.

    Returns:
        The absolute path of the folder.
    """
    if options.run_dir is not None:
        run_dir = Path(options.run_dir).expanduser().absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    return next_run_dir(Path(options.runs_root).expanduser().absolute() / task_name)


def check_writable_dir(path: Path, key: str) -> None:
    """Raises ``ConfigError`` naming ``key`` unless ``path`` is a folder this process can write, or
    can be created as one."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise ConfigError(f"{key}={path} {what}; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {existing} is not writable by this user; choose another folder")


LOCK_NAME = ".lock"


class RunDirLock:
    """An exclusive lock on a run directory, held for the whole run (process 0 only).

    Two runs writing one folder interleave ``log.jsonl`` and fight over the checkpoints. The lock
    is an advisory ``flock`` on ``<run_dir>/.lock``, so the system releases it when its process
    dies, however it dies: a crashed run never blocks its own resume.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._file = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise LaunchError(
                f"run directory {run_dir} is in use by {holder}; wait for that run to end or stop it, "
                "or choose another artifacts.run_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # releases the lock


def _write_text(path: Path, text: str) -> None:
    """Writes a file atomically, so a crash never leaves half of it."""
    tmp_path = path.with_name(f".{path.name}.tmp")
    tmp_path.write_text(text, encoding="utf-8")
    os.replace(tmp_path, path)


class ArtifactsMixin(BaseTask[Config], Generic[Config]):
    """Gives the run a directory and writes the metadata that lets it be reproduced.

    Only process 0 creates folders and writes files. In a run of several processes, the first
    access to ``run_dir`` is a collective (process 0 broadcasts the run number), so it is resolved
    in ``on_run_start``, which every process enters together.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._run_dir: Path | None = None
        self._run_dir_lock: RunDirLock | None = None
        # (state,) once read: git runs three subprocesses, too slow to repeat at each checkpoint.
        self._git_state: tuple[GitState | None] | None = None

    @override
    def validate_config(self) -> None:
        super().validate_config()
        options = self.config.artifacts
        if options.run_dir is None and not options.runs_root:
            raise ConfigError(
                "artifacts.runs_root is empty; set artifacts.runs_root=runs or artifacts.run_dir=<folder>"
            )
        if options.run_dir is not None:
            check_writable_dir(Path(options.run_dir).expanduser().absolute(), "artifacts.run_dir")
        else:
            check_writable_dir(Path(options.runs_root).expanduser().absolute(), "artifacts.runs_root")

    @override
    def on_run_start(self) -> None:
        self._git_state = None  # read afresh for each run; its checkpoints reuse it
        super().on_run_start()
        if jax.process_index() == 0:
            self._run_dir_lock = RunDirLock(self.run_dir)
        else:
            _ = self.run_dir

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            if self._run_dir_lock is not None:
                self._run_dir_lock.close()
                self._run_dir_lock = None

    @property
    def run_dir(self) -> Path:
        """The run's folder, made on first access and the same afterwards.

        It is ``artifacts.run_dir`` when set, otherwise the next numbered
        ``<artifacts.runs_root>/<task_name>/run_<NNN>``. Relative paths are taken from the current
        working directory at first access.
        """
        if self._run_dir is None:
            self._run_dir = self._resolve_run_dir()
        return self._run_dir

    def _resolve_run_dir(self) -> Path:
        options = self.config.artifacts
        is_writer = jax.process_index() == 0
        if options.run_dir is not None:
            run_dir = Path(options.run_dir).expanduser().absolute()
            return make_run_dir(options, type(self).task_name()) if is_writer else run_dir
        parent = Path(options.runs_root).expanduser().absolute() / type(self).task_name()
        number = int(make_run_dir(options, type(self).task_name()).name.removeprefix("run_")) if is_writer else 0
        if jax.process_count() > 1:
            # Every process must name the folder process 0 made, e.g. for a shared checkpoint.
            number = int(multihost_utils.broadcast_one_to_all(np.int32(number)))
        return parent / f"run_{number:03d}"

    def git_state(self) -> GitState | None:
        """The state of the git repository the run was launched from (``read_git_state``), read
        once per run, when first asked for (at run start), and the same for every checkpoint."""
        if self._git_state is None:
            self._git_state = (read_git_state(),)
        return self._git_state[0]

    def write_run_metadata(self, config_yaml: str) -> None:
        """Writes what is needed to reproduce the run into ``run_dir`` (process 0 only).

        Writes ``config.yaml`` (the resolved config), ``git.json`` (commit, branch, dirty flag;
        skipped outside a git repository), ``git.diff`` (only when dirty), ``versions.json`` and
        ``command.txt``. Environment variables are never written, as they often hold secrets.

        Args:
            config_yaml: The resolved config, as YAML.
        """
        if jax.process_index() != 0:
            return
        run_dir = self.run_dir
        _write_text(run_dir / "config.yaml", config_yaml)
        # An explicit run_dir may be reused; files a previous run left must not describe this one.
        for stale in ("git.json", "git.diff"):
            (run_dir / stale).unlink(missing_ok=True)
        git_state = self.git_state()
        if git_state is None:
            logger.debug("Not in a git repository (or git is missing); git.json is not written")
        else:
            git_json = {"commit": git_state.commit, "branch": git_state.branch, "dirty": git_state.dirty}
            _write_text(run_dir / "git.json", json.dumps(git_json, indent=2) + "\n")
            if git_state.dirty:
                _write_text(run_dir / "git.diff", git_state.diff)
        _write_text(run_dir / "versions.json", json.dumps(package_versions(), indent=2) + "\n")
        _write_text(run_dir / "command.txt", shlex.join([sys.executable, *sys.argv]) + "\n")
