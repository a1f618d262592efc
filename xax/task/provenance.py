"""A run's provenance: what decides its result, recorded in ``<run_dir>/provenance.json``.

The file holds one entry per start of the run (a resume adds one, so an environment that changed
across a resume shows). Each entry records, in the order ``xax runs diff`` ranks them by how
likely they are to change the numbers:

1. ``step``: a sha256 of the training step's lowered program (StableHLO text, without source
   locations), as jit lowered it for its first call;
2. ``data``: each phase's dataset fingerprint (``xax.data.fingerprint``);
3. ``versions`` (packages, GPU/TPU plugins and NVIDIA libraries), ``python``, ``jax`` (backend,
   device kind and count, processes, options that change numerics), ``env`` (an allow-list of
   variables, ``xax.utils.env.recorded_environment``: never credentials) and ``xax`` (the folder
   the package was imported from, whether it is a source tree, a hash of each imported module);
4. ``config``: the resolved config, as ``config.yaml`` holds it;
5. ``git``: commit, branch, whether the tree was dirty and a hash of its diff (``git.diff`` holds it).
"""

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any

import jax
from etils import epath

from xax.core.errors import ProvenanceError
from xax.task.mixins.artifacts import GitState, package_versions
from xax.utils.env import recorded_environment
from xax.utils.storage import storage_path

PROVENANCE_NAME = "provenance.json"
FORMAT = 1

# Distributions whose presence and version change what the devices compute, found by name.
PLUGIN_PREFIXES = (
    "jax-cuda",
    "jax-rocm",
    "jax-metal",
    "jax-tpu",
    "libtpu",
    "nvidia-cu",
    "nvidia-nccl",
    "nvidia-nvjitlink",
)

# JAX options that change what a program computes (recorded as set when the run starts).
NUMERIC_JAX_OPTIONS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_debug_nans",
    "jax_disable_jit",
)

# The sections of an entry, in the order of their rank.
SECTIONS = (
    ("step", "compiled step"),
    ("data", "data"),
    ("environment", "versions, backend, devices, flags, environment"),
    ("config", "config"),
    ("git", "git"),
)
ENVIRONMENT_KEYS = ("versions", "python", "jax", "env", "xax")


@functools.cache
def plugin_versions() -> dict[str, str]:
    """Versions of the installed JAX plugins, TPU runtime and NVIDIA libraries (``PLUGIN_PREFIXES``),
    read once per process (a scan of every installed distribution takes tens of milliseconds)."""
    found = {}
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(PLUGIN_PREFIXES):
            found[name] = distribution.version
    return dict(sorted(found.items()))


def python_facts() -> dict[str, str]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
    }


def jax_facts() -> dict[str, Any]:
    """The backend, devices and processes, and the JAX options that change numerics."""
    devices = jax.devices()
    try:
        platform_version = devices[0].client.platform_version
    except AttributeError:
        platform_version = "unknown"
    return {
        "backend": jax.default_backend(),
        "device_kind": ", ".join(sorted({device.device_kind for device in devices})),
        "platform_version": platform_version,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "options": {name: jax.config.values[name] for name in NUMERIC_JAX_OPTIONS if name in jax.config.values},
    }


@functools.cache
def _module_file(file: str, root: Path) -> tuple[bool, str]:
    """Whether a module's file lies under ``root``, and then a short sha256 of it, else its resolved
    path. Read the first time this process records the module, close to when it was imported: an
    edit to the file after that did not change the running code."""
    path = Path(file).resolve()
    if not path.is_relative_to(root):
        return False, str(path)
    try:
        return True, hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return True, "unreadable"


@functools.cache
def _package_root(init_file: str) -> Path:
    return Path(init_file).resolve().parent


@functools.cache
def _from_source_tree(root: Path) -> bool:
    """Whether the package at ``root`` was imported from a source tree (an editable install, or a
    checkout on ``sys.path``) rather than from an installed copy in site-packages."""
    paths = sysconfig.get_paths()
    installed = {Path(paths[key]).resolve() for key in ("purelib", "platlib") if key in paths}
    return not any(root.is_relative_to(folder) for folder in installed)


@functools.cache
def _xax_version() -> str:
    try:
        return importlib.metadata.version("xax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def xax_origin() -> dict[str, Any]:
    """Where xax was imported from: the package folder, whether it is a source tree (an editable
    install or a checkout on ``sys.path``, whose code may differ from the released version), a short
    sha256 of each imported ``xax.*`` module's file, and the files of any module imported from
    elsewhere (a copy shadowing the package)."""
    import xax

    root = _package_root(xax.__file__)
    modules: dict[str, str] = {}
    outside: dict[str, str] = {}
    for name, module in sorted(list(sys.modules.items())):
        file = getattr(module, "__file__", None)
        if not (name == "xax" or name.startswith("xax.")) or not file:
            continue
        inside, value = _module_file(file, root)
        (modules if inside else outside)[name] = value
    return {
        "version": _xax_version(),
        "root": str(root),
        "source_tree": _from_source_tree(root),
        "module_sha256": modules,
        "modules_outside_root": outside,
    }


def git_facts(state: GitState | None) -> dict[str, Any] | None:
    """The commit, branch and dirty flag, and a hash of the diff (the diff itself is ``git.diff``)."""
    if state is None:
        return None
    diff_sha256 = hashlib.sha256(state.diff.encode()).hexdigest()[:16] if state.dirty else None
    return {"commit": state.commit, "branch": state.branch, "dirty": state.dirty, "diff_sha256": diff_sha256}


def start_entry(config: dict[str, Any], git: GitState | None) -> dict[str, Any]:
    """The entry of one start of a run, before its step is compiled (``step`` and ``start_step`` are None)."""
    versions = {name: version for name, version in package_versions().items() if name not in ("python", "platform")}
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "start_step": None,
        "step": None,
        "data": {},
        "versions": {**versions, **plugin_versions()},  # a copy: plugin_versions is cached
        "python": python_facts(),
        "jax": jax_facts(),
        "env": recorded_environment(),
        "xax": xax_origin(),
        "config": config,
        "git": git_facts(git),
    }


def step_fingerprint(lowered: Any) -> dict[str, Any]:
    """A sha256 of a lowered jitted function's StableHLO text (``jax.stages.Lowered``)."""
    text = lowered.as_text()
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "dialect": "stablehlo", "chars": len(text)}


def read_provenance(run_dir: epath.PathLike) -> list[dict[str, Any]]:
    """The entries of a run's ``provenance.json``, one per start, oldest first.

    Args:
        run_dir: The run directory: a local folder, or a ``gs://``/``s3://`` URL.

    Raises:
        ProvenanceError: Naming the folder or file that is missing or unreadable, and the fix.
    """
    run_dir = storage_path(run_dir)
    path = run_dir / PROVENANCE_NAME
    if not run_dir.is_dir():
        raise ProvenanceError(f"{run_dir} is not a folder; pass a run directory (the folder holding {PROVENANCE_NAME})")
    if not path.is_file():
        raise ProvenanceError(
            f"{path} is missing; pass a run directory of a run started with this version of xax "
            "(it writes provenance.json before its first step), or rerun the task"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        starts = document["starts"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ProvenanceError(f"{path} is unreadable ({type(error).__name__}: {error}); rerun the task") from None
    if not isinstance(starts, list) or not starts or not all(isinstance(entry, dict) for entry in starts):
        raise ProvenanceError(f"{path} holds no entries; rerun the task")
    return starts


def write_provenance(run_dir: Path, starts: list[dict[str, Any]]) -> None:
    """Writes ``provenance.json`` atomically (a crash never leaves half of it)."""
    path = run_dir / PROVENANCE_NAME
    tmp_path = path.with_name(f".{path.name}.tmp")
    tmp_path.write_text(json.dumps({"format": FORMAT, "starts": starts}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
