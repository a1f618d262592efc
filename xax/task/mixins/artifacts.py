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
from etils import epath
from jax.experimental import multihost_utils
from typing_extensions import override

from xax.core.config import field
from xax.core.errors import ConfigError, LaunchError
from xax.task.base import BaseConfig, BaseTask
from xax.utils.storage import Mirror, check_location, filesystem, is_remote, local_mirror, storage_path

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
    "grain",
    "numpy",
    "ml_dtypes",
    "xax",
)


@dataclass
class ArtifactsOptions:
    """Where a run writes its files."""

    runs_root: str = field(
        "runs", help="Folder holding one subfolder per task, each holding its numbered runs (or gs://, s3:// URL)"
    )
    run_dir: str | None = field(
        None, help="Write the run into this folder (or gs://, s3:// URL) instead of the next numbered one"
    )
    upload_every_n_seconds: float = field(
        30.0,
        help="A run stored at a gs:// or s3:// URL writes its logs into a local copy, uploaded every N seconds, "
        "after each checkpoint and at the end",
    )


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


def next_remote_run_dir(parent: epath.Path) -> epath.Path:
    """Claims and returns the next numbered run folder ``parent/run_<NNN>`` in an object store.

    An object store has no folders to make exclusively: the run claims its number by creating
    ``run_<NNN>/.claimed`` only if absent (a conditional write, where the store supports it), so two
    runs starting together never share one.
    """
    fs, key = filesystem(parent)
    try:
        names = [str(name).rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(key, detail=False)]
    except FileNotFoundError:
        names = []
    numbers = [int(match.group(1)) for name in names if (match := _RUN_DIR_RE.fullmatch(name))]
    number = max(numbers, default=-1) + 1
    for _ in range(_MAX_RUN_DIR_ATTEMPTS):
        candidate = parent / f"run_{number:03d}"
        claim = f"{key.rstrip('/')}/run_{number:03d}/.claimed"
        holder = f"process {os.getpid()} on {socket.gethostname()}\n".encode()
        try:
            with fs.open(claim, "xb") as file:
                file.write(holder)
        except FileExistsError:
            number += 1
            continue
        except (ValueError, NotImplementedError):
            # A filesystem without conditional writes: a check, then a write (two runs starting
            # in the same instant may then share a number).
            if fs.exists(claim):
                number += 1
                continue
            fs.pipe_file(claim, holder)
        return candidate
    raise FileExistsError(
        f"Could not claim a new run folder in {parent} after {_MAX_RUN_DIR_ATTEMPTS} attempts; "
        "set artifacts.run_dir to choose one explicitly"
    )


def make_run_location(options: ArtifactsOptions, task_name: str) -> epath.Path:
    """Creates (or claims, in an object store) and returns where a run is stored:
    ``artifacts.run_dir`` when set (made if missing, reused if not), else the next numbered
    ``<artifacts.runs_root>/<task_name>/run_<NNN>``. A local folder, or a ``gs://``/``s3://`` URL.
    """
    if options.run_dir is not None:
        location = storage_path(options.run_dir)
        if not is_remote(location):
            Path(location).mkdir(parents=True, exist_ok=True)
        return location
    parent = storage_path(options.runs_root) / task_name
    if is_remote(parent):
        return next_remote_run_dir(parent)
    return epath.Path(next_run_dir(Path(parent)))


def local_run_dir(location: epath.Path) -> Path:
    """The local folder a run stored at ``location`` writes its files into: the folder itself, or
    for a URL the local copy its files are uploaded from (``xax.utils.storage.local_mirror``)."""
    return local_mirror(location) if is_remote(location) else Path(location)


def make_run_dir(options: ArtifactsOptions, task_name: str) -> Path:
    """Creates and returns a run's local folder (see ``make_run_location``; for a run stored at a
    URL, the local copy of its files).

    Args:
        options: ``artifacts``.
        task_name: The task's name (``task_name()``), the folder holding its numbered runs.

    Returns:
        The absolute path of the folder.
    """
    run_dir = local_run_dir(make_run_location(options, task_name))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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
        self._run_storage: epath.Path | None = None
        self._run_dir_lock: RunDirLock | None = None
        self._mirror: Mirror | None = None
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
        key, location = (
            ("artifacts.run_dir", options.run_dir)
            if options.run_dir is not None
            else ("artifacts.runs_root", options.runs_root)
        )
        check_location(location, key)
        if options.upload_every_n_seconds <= 0:
            raise ConfigError(
                f"artifacts.upload_every_n_seconds={options.upload_every_n_seconds} must be positive; e.g. 30"
            )
        if not is_remote(location):
            check_writable_dir(Path(storage_path(location)), key)

    @override
    def on_run_start(self) -> None:
        self._git_state = None  # read afresh for each run; its checkpoints reuse it
        super().on_run_start()
        if jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._run_dir_lock = RunDirLock(self.run_dir)
            if is_remote(self.run_storage):
                # Object stores have no lock: the lock above covers this machine's copy only.
                self._mirror = Mirror(
                    self.run_dir,
                    self.run_storage,
                    self.config.artifacts.upload_every_n_seconds,
                    skip=frozenset({LOCK_NAME}),
                )
                pulled = self._mirror.pull()
                if pulled:
                    logger.info("Fetched %s from %s", ", ".join(pulled), self.run_storage)
                self._mirror.start()
        else:
            _ = self.run_dir

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            try:
                self._close_mirror()
            finally:
                if self._run_dir_lock is not None:
                    self._run_dir_lock.close()
                    self._run_dir_lock = None

    def _close_mirror(self) -> None:
        mirror, self._mirror = self._mirror, None
        if mirror is None:
            return
        try:
            mirror.close()
        except Exception as error:
            logger.warning(
                "uploading %s to %s failed (%s); the files stay there", self.run_dir, self.run_storage, error
            )

    def upload_run_files(self) -> None:
        """Asks for the run's files to be uploaded now, for a run stored at a URL (returns at once)."""
        if self._mirror is not None:
            self._mirror.request()

    def upload_run_files_now(self) -> str | None:
        """Uploads the run's changed files now and waits (a run stored at a URL; nothing otherwise):
        the last thing a process about to end abruptly does. Returns where they went, or None.

        Raises:
            OSError: When an upload fails (the files stay in the local copy).
        """
        if self._mirror is None:
            return None
        self._mirror.sync()
        return str(self.run_storage)

    @property
    def run_dir(self) -> Path:
        """The run's local folder, made on first access and the same afterwards: where its files
        (logs, TensorBoard, metadata) are written.

        It is ``artifacts.run_dir`` when set, otherwise the next numbered
        ``<artifacts.runs_root>/<task_name>/run_<NNN>``. Relative paths are taken from the current
        working directory at first access. For a run stored at a ``gs://`` or ``s3://`` URL, it is
        a local copy whose files are uploaded there (see ``run_storage``).
        """
        if self._run_dir is None:
            self._run_storage = self._resolve_run_storage()
            self._run_dir = local_run_dir(self._run_storage)
        return self._run_dir

    @property
    def run_storage(self) -> epath.Path:
        """Where the run is stored: ``run_dir`` itself, or the ``gs://``/``s3://`` URL its files are
        uploaded to and its checkpoints written to."""
        _ = self.run_dir
        assert self._run_storage is not None
        return self._run_storage

    def _resolve_run_storage(self) -> epath.Path:
        options = self.config.artifacts
        is_writer = jax.process_index() == 0
        if options.run_dir is not None:
            location = storage_path(options.run_dir)
            return make_run_location(options, type(self).task_name()) if is_writer else location
        parent = storage_path(options.runs_root) / type(self).task_name()
        number = int(make_run_location(options, type(self).task_name()).name.removeprefix("run_")) if is_writer else 0
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
            if is_remote(self.run_storage):
                (self.run_storage / stale).unlink(missing_ok=True)
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
        self.upload_run_files()
