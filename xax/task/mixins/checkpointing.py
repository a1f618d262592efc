"""Checkpoints on orbax: asynchronous, atomic, checksummed, restorable under any mesh, never pickled."""

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jaxtyping import Array, PyTree, UInt32
from orbax.checkpoint import checkpoint_managers
from typing_extensions import override

from xax.core.config import field
from xax.core.config_io import config_to_dict
from xax.core.errors import CheckpointError, CheckpointWriteError, ConfigError
from xax.core.state import State
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.artifacts import read_git_state
from xax.task.mixins.data_loader import Cursor

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
BEST_MODES = ("min", "max")
# Where a run's unreadable checkpoints go when resuming falls back past them (inside `checkpoints/`).
CORRUPT_DIR = "corrupt"
CHECKSUM_ALGORITHM = "xax-fmix32-sum-v1"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


@dataclass
class CheckpointOptions:
    every_n_steps: int | None = field(1000, help="Save every N steps (None: only by time, at the end and on signals)")
    every_n_seconds: float | None = field(None, help="Save every N seconds")
    keep_last: int = field(3, help="Keep the newest K checkpoints")
    keep_best: int = field(
        0,
        help="Also keep the best K checkpoints by `checkpoint.best_metric`, as measured by the validation of their "
        "own step (a checkpoint saved at a step without validation is kept only by keep_last)",
    )
    best_metric: str = field("loss", help="Validation metric that ranks checkpoints for keep_best")
    best_mode: str = field("min", help="'min' or 'max': which end of best_metric is best")
    async_save: bool = field(True, help="Write in the background while training goes on")
    checksums: bool = field(
        True,
        help="Record a checksum of every array (computed on the device, off the training thread); verified on restore",
    )


@dataclass
class CheckpointingConfig(BaseConfig):
    checkpoint: CheckpointOptions = field(CheckpointOptions(), help="Checkpoint options")
    resume: str | None = field(
        None, help="'auto': continue the newest complete checkpoint of the run directory; or a checkpoint path"
    )
    warm_start: str | None = field(
        None, help="Initialize the model weights from this checkpoint (weights only: new optimizer, counters, data)"
    )


Config = TypeVar("Config", bound=CheckpointingConfig)


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds other arrays than this run's model and optimizer (its config or code
    changed since it was saved); not a corrupt one, so resuming does not fall back past it."""


class CorruptCheckpointError(CheckpointError):
    """An array read back from a checkpoint differs from the checksum recorded when it was saved."""


@dataclass(frozen=True)
class Restored:
    """What a checkpoint gives back besides the arrays."""

    step: int
    path: Path
    state: State
    cursor: Cursor
    metadata: dict[str, Any]


def abstract_like(tree: PyTree) -> PyTree:
    """Shapes, dtypes and shardings of ``tree``: the target a checkpoint is restored into, so it
    lands on the current mesh whatever mesh it was saved under."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def human_bytes(num_bytes: int) -> str:
    """``num_bytes`` in binary units: ``'512 B'``, ``'1.5 KiB'``, ``'3.2 GiB'``."""
    value, unit = float(num_bytes), ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{num_bytes} B" if unit == "B" else f"{value:.1f} {unit}"


def disk_size(path: Path) -> int:
    """Bytes of all files under ``path`` (symbolic links not followed)."""
    return sum(file.lstat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())


# ---------------------------------------------------------------------------------------------
# Quieting orbax: its routine notices and the reports it leaves behind a failed read.


@contextlib.contextmanager
def quiet_orbax() -> Generator[None]:
    """Raises the ``absl`` logger to ERROR for the duration: orbax reports read-only managers,
    checkpoints without its optional metadata file and similar non-events as absl warnings."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


class ClosedLoopFilter:
    """An unraisable-exception hook that drops the reports of tensorstore reads finishing after a
    failed read closed orbax's event loop (``RuntimeError: Event loop is closed``), and passes every
    other report on."""

    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous(unraisable)


class _AbandonedIoErrors(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" reports of tensorstore reads and
    writes that failed alongside one that was already reported (a read's holds its whole JSON spec)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        ours = any(word in message for word in ("tensorstore", "OCDBT", "orbax"))
        return not (message.startswith("Future exception was never retrieved") and ours)


def drop_abandoned_io_reports() -> None:
    """Installs ``ClosedLoopFilter`` and ``_AbandonedIoErrors`` (once each), before a checkpoint
    is read or written: when one read or write fails, the others still in flight fail or finish
    after orbax's event loop closed (during or after the failure is raised), and would each print a
    traceback. Both drop only those reports."""
    if not isinstance(sys.unraisablehook, ClosedLoopFilter):
        sys.unraisablehook = ClosedLoopFilter(sys.unraisablehook)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(existing, _AbandonedIoErrors) for existing in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedIoErrors())


class _OrbaxWriteErrors(logging.Filter):
    """Drops orbax's error reports (with tracebacks) about a failed background write: xax reports
    each failed write itself, once, as a ``CheckpointWriteError``."""

    def filter(self, record: logging.LogRecord) -> bool:
        in_orbax = f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in record.pathname
        return not (in_orbax and record.levelno >= logging.ERROR)


def root_cause(error: BaseException) -> BaseException:
    """The innermost error of ``error``'s chain (orbax wraps tensorstore's, which names the file)."""
    seen = [error]
    while (inner := seen[-1].__cause__ or seen[-1].__context__) is not None and inner not in seen:
        seen.append(inner)
    return next((inner for inner in reversed(seen) if str(inner).strip()), error)


def one_line(error: BaseException) -> str:
    """An error's message on one line, without the JSON spec tensorstore appends to read errors
    (the file and the reason come before it)."""
    text = " ".join(str(error).split())
    head, spec, _ = text.partition(" [tensorstore_spec")
    return head + ")" if spec and text.endswith(")") else head


# ---------------------------------------------------------------------------------------------
# Checksums: one per array, of its global value, so that it verifies under any mesh.

_MIX_1, _MIX_2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3's 32-bit finalizer
_SEED, _GOLDEN = 0x243F6A88, 0x9E3779B1


def _fmix32(h: Array) -> Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_MIX_1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_MIX_2)
    return h ^ (h >> 16)


def _words(x: Array) -> Array:
    """The bits of ``x`` as uint32 words (narrower types widened, wider ones split)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_checksum(x: Array) -> Array:
    # Each element is mixed with its position in the global array (a bijection of its bits for a
    # given position) and the mixes are summed modulo 2**32: the sum does not depend on how the
    # array is split over devices or processes, and any single changed element changes it. The
    # second word weights each mix by an odd factor of its position (a swap changes it).
    words = _words(x)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    mixed = _fmix32((words ^ jnp.uint32(_SEED)) + position * jnp.uint32(_GOLDEN))
    weight = position * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32), jnp.sum(mixed * weight, dtype=jnp.uint32)])


@jax.jit
def _checksums_fn(leaves: list[Array]) -> UInt32[Array, "n 2"]:
    return jnp.stack([_array_checksum(leaf) for leaf in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def array_checksums(tree: PyTree) -> tuple[list[str], Array]:
    """The arrays' dotted names and their checksums, as a (names, 2) uint32 device array.

    Returns as soon as the computation is dispatched: the device computes the checksums while the
    caller goes on (reading the result waits for them). Every process of a multi-process job must
    call it together (it is one computation over the global arrays).
    """
    leaves = named_leaves(tree)
    names = [name for name, leaf in leaves.items() if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]
    return names, _checksums_fn([jnp.asarray(leaves[name]) for name in names])


def _host_checksums(names: list[str], checksums: Array) -> dict[str, str]:
    """``{name: 16 hex digits}`` from the device result (any process holds all of it: replicated)."""
    value = checksums if checksums.is_fully_addressable else checksums.addressable_data(0)
    rows = np.asarray(jax.device_get(value), dtype=np.uint32)
    return {name: f"{int(row[0]):08x}{int(row[1]):08x}" for name, row in zip(names, rows, strict=True)}


def verify_checksums(tree: PyTree, recorded: dict[str, Any], step_dir: Path) -> None:
    """Raises ``CorruptCheckpointError`` naming the first array of ``tree`` whose checksum differs from
    the one recorded when the checkpoint was saved (arrays without a recorded checksum pass)."""
    if recorded.get("algorithm") != CHECKSUM_ALGORITHM:
        return
    saved = recorded.get("arrays", {})
    subset = {name: leaf for name, leaf in named_leaves(tree).items() if name in saved}
    names, checksums = array_checksums(subset)
    for name, value in _host_checksums(names, checksums).items():
        if value != saved[name]:
            raise CorruptCheckpointError(
                f"checkpoint {step_dir} is corrupt: array {name} does not match its checksum "
                f"(its data under {step_dir / 'state'} changed after it was written)"
            )


def read_checksums(step_dir: Path) -> dict[str, Any] | None:
    """The checksums recorded with a checkpoint, or None for a checkpoint saved without them."""
    path = step_dir / "checksums" / "metadata"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({type(error).__name__}: {error})") from error


@dataclass
class _ChecksumSave(ocp.args.CheckpointArgs):
    """The checksums of a checkpoint's arrays: ``(names, device array)``, set once dispatched (which
    may be after orbax copied the arrays off the devices, so the two do not compete)."""

    checksums: concurrent.futures.Future[tuple[list[str], Array]]


class _ChecksumHandler(ocp.handlers.JsonCheckpointHandler):
    """Writes ``checksums/metadata`` (JSON) in the background, once the device has computed them,
    before orbax finalizes the checkpoint; reads back as any JSON item."""

    async def _write(self, directory: epath.Path, args: _ChecksumSave) -> None:
        names, checksums = await asyncio.wrap_future(args.checksums)
        arrays = await asyncio.to_thread(_host_checksums, names, checksums)
        if ocp.utils.is_primary_host(self._primary_host):
            text = json.dumps({"algorithm": CHECKSUM_ALGORITHM, "arrays": arrays})
            await asyncio.to_thread((directory / "metadata").write_text, text)

    @override
    async def async_save(self, directory: epath.Path, item: Any = None, args: Any = None) -> list[Any] | None:
        if not isinstance(args, _ChecksumSave):
            return await super().async_save(directory, item, args)
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(directory, args), name="xax_checksums")]

    @override
    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        async def run() -> None:
            for commit in await self.async_save(directory, item, args) or []:
                commit.result()

        asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# Reading and writing.


def _manager(directory: Path, options: CheckpointOptions, *, read_only: bool = False) -> ocp.CheckpointManager:
    policies: list[Any] = [checkpoint_managers.LatestN(n=options.keep_last)]
    best_fn = None
    if options.keep_best > 0:
        metric, descending = options.best_metric, options.best_mode == "min"

        def best_fn(metrics: dict[str, float]) -> float:
            return metrics[metric]

        policies.append(
            checkpoint_managers.BestN(
                get_metric_fn=best_fn,
                reverse=descending,  # BestN keeps the last n after sorting: the smallest when descending
                n=options.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    manager_options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # With a best_fn, orbax also writes each step's metrics next to it and reads them back when
        # a manager opens the directory: the rankings survive a resume.
        best_fn=best_fn,
        best_mode=options.best_mode,
        enable_async_checkpointing=options.async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, meta, checksums = (
        ocp.handlers.StandardCheckpointHandler(),
        ocp.handlers.JsonCheckpointHandler(),
        _ChecksumHandler(),
    )
    for item, args_type, handler in (
        ("state", ocp.args.StandardSave, state),
        ("state", ocp.args.StandardRestore, state),
        ("meta", ocp.args.JsonSave, meta),
        ("meta", ocp.args.JsonRestore, meta),
        ("checksums", _ChecksumSave, checksums),
        ("checksums", ocp.args.JsonRestore, checksums),
    ):
        registry.add(item, args_type, handler)
    with quiet_orbax():
        return ocp.CheckpointManager(directory, options=manager_options, handler_registry=registry)


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, in numeric order (never by string)."""
    if not directory.is_dir():
        return []
    return sorted(
        int(path.name) for path in directory.iterdir() if path.is_dir() and path.name.isdigit() and _complete(path)
    )


def _complete(step_dir: Path) -> bool:
    # orbax renames a finished checkpoint from a temporary name into place; both items exist then.
    return (step_dir / "state").is_dir() and (step_dir / "meta").is_dir()


def resolve_checkpoint(path: Path) -> tuple[Path, list[int]]:
    """Splits a user-given path into (checkpoints directory, candidate steps, newest first).

    Accepts a step directory, a checkpoints directory, or a run directory holding ``checkpoints``.
    """
    path = path.expanduser().resolve()
    if path.name.isdigit() and path.is_dir():
        return path.parent, [int(path.name)]
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory}; pass a run directory or a checkpoint path")
    return directory, steps[::-1]


def _structure_mismatch(error: BaseException) -> list[str] | None:
    """The tree paths orbax lists when the restore target and the saved tree differ in structure,
    or None when ``error`` is not that."""
    text = str(error)
    if "tree structures do not match" not in text:
        return None
    body = text.split("do not match", 1)[1].split("If this mismatch is intentional", 1)[0]
    return [line.strip().rstrip(":") for line in body.splitlines() if line.strip().endswith(":")]


def load_checkpoint(directory: Path, step: int, target: PyTree | None) -> tuple[PyTree, dict[str, Any]]:
    """Reads one checkpoint: the arrays (into ``target``'s shapes and shardings) and the metadata,
    and verifies the arrays against the checksums recorded with them.

    Raises:
        CheckpointError: Naming the file when the checkpoint is missing, truncated or corrupt
            (``CorruptCheckpointError`` when an array does not match its checksum), or
            ``CheckpointMismatchError`` when ``target``'s tree differs from the saved one.
    """
    step_dir = directory / str(step)
    recorded = read_checksums(step_dir)
    drop_abandoned_io_reports()
    with quiet_orbax():
        manager = _manager(directory, CheckpointOptions(), read_only=True)
        try:
            state_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
            restored = manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as error:
            paths = _structure_mismatch(error)
            if paths is not None:
                raise CheckpointMismatchError(
                    f"checkpoint {step_dir} holds another tree of arrays than this run's at {', '.join(paths[:3])}"
                ) from error
            cause = root_cause(error)
            raise CheckpointError(
                f"checkpoint {step_dir} is unreadable ({type(cause).__name__}: {one_line(cause)})"
            ) from error
        finally:
            manager.close()
    if recorded is not None:
        verify_checksums(restored["state"], recorded, step_dir)
    return restored["state"], dict(restored["meta"])


def _key_name(key: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """Leaves by dotted path. A checkpoint read without a target comes back as nested dicts, the
    model as modules and named tuples; their paths agree once spelled as names."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {".".join(_key_name(key) for key in path): leaf for path, leaf in flat if leaf is not None}


def saved_array_metadata(directory: Path, step: int) -> PyTree:
    """The saved arrays' shapes and dtypes (no data read), as nested dicts."""
    try:
        with quiet_orbax():
            return ocp.StandardCheckpointer().metadata(directory / str(step) / "state").item_metadata
    except Exception as error:
        raise CheckpointError(f"checkpoint {directory / str(step) / 'state'} is unreadable ({error})") from error


def load_arrays_anywhere(directory: Path, step: int, sharding: jax.sharding.Sharding) -> PyTree:
    """Every saved array, placed with ``sharding`` (e.g. one device), whatever mesh saved them:
    for reading a checkpoint without the model that wrote it. Verified against its checksums."""
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding),
        saved_array_metadata(directory, step),
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )
    tree, _ = load_checkpoint(directory, step, target)
    return tree


def restore_weights(template: PyTree, directory: Path, step: int, *, prefer_ema: bool = True) -> PyTree:
    """``template`` with its floating-point arrays replaced by those saved in a training checkpoint.

    For using a trained model outside training (sampling, evaluation), on this process's first
    device (each process of a multi-process job reads its own copy), whatever mesh saved it.

    Args:
        template: A model of the same configuration as the saved one (its weights are not used).
        directory: The checkpoints folder (see ``resolve_checkpoint``).
        step: The step to read.
        prefer_ema: Take the moving average of the weights when the checkpoint kept one.

    Raises:
        CheckpointError: If a parameter of ``template`` is missing from the checkpoint or has another shape.
    """
    tree = load_arrays_anywhere(directory, step, jax.sharding.make_single_device_sharding(jax.local_devices()[0]))
    weights = tree["ema"] if prefer_ema and tree.get("ema") is not None else tree["params"]
    arrays, static = eqx.partition(template, eqx.is_inexact_array)
    check_shapes(arrays, weights, directory / str(step))
    found, wanted = named_leaves(weights), named_leaves(arrays)
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        raise CheckpointError(f"{directory / str(step)} has no {missing[0]}; it holds a different model")
    leaves = [jnp.asarray(found[name], dtype=leaf.dtype) for name, leaf in wanted.items()]
    return eqx.combine(jax.tree.unflatten(jax.tree.structure(arrays), leaves), static)


def read_metadata(directory: Path, step: int) -> dict[str, Any]:
    """A checkpoint's JSON metadata alone (counters, cursor, config, versions, mesh)."""
    with quiet_orbax():
        manager = _manager(directory, CheckpointOptions(), read_only=True)
        try:
            return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception as error:
            raise CheckpointError(f"checkpoint {directory / str(step)} is unreadable ({error})") from error
        finally:
            manager.close()


def check_shapes(target: PyTree, saved: PyTree, source: Path) -> None:
    """Raises if a saved array's shape differs from the model's, naming the parameter path."""
    saved_leaves = named_leaves(saved)
    for name, leaf in named_leaves(target).items():
        if name in saved_leaves and tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"parameter {name} has shape {tuple(leaf.shape)} in the model but "
                f"{tuple(saved_leaves[name].shape)} in {source}; change the config back or restore partially"
            )


def tree_differences(target: PyTree, saved: PyTree) -> list[str]:
    """How the arrays of ``target`` differ from the saved ones: names on one side only, and shapes."""
    wanted, found = named_leaves(target), named_leaves(saved)
    differences = []
    for name, leaf in wanted.items():
        if name not in found:
            differences.append(f"{name} is not in the checkpoint")
        elif tuple(found[name].shape) != tuple(leaf.shape):
            shapes = f"{tuple(leaf.shape)} in the model but {tuple(found[name].shape)} in the checkpoint"
            differences.append(f"parameter {name} has shape {shapes}")
    differences += [f"{name} is only in the checkpoint" for name in found if name not in wanted]
    return differences


def _why_unreadable(error: CheckpointError) -> str:
    """A short clause saying why a checkpoint could not be read."""
    if isinstance(error, CorruptCheckpointError):
        name = re.search(r"array (\S+) does not match", str(error))
        return f"array {name.group(1) if name else '?'} does not match its checksum"
    text = one_line(root_cause(error))
    array = re.search(r'Error reading "([^"]+?)/[^"/]*"', text)
    files = [Path(path) for path in re.findall(r'local file "([^"]+)"', text)]
    data_files = [path.name for path in files if path.parent.name == "d"]
    if "is not valid for value of size" in text or "OUT_OF_RANGE" in text:
        if data_files:
            return f"data file {data_files[-1]} is truncated"
        return f"the data of {array.group(1)} is truncated" if array else "a data file is truncated"
    if "DATA_LOSS" in text or "checksum" in text.lower():
        return f"data file {data_files[-1]} is corrupt" if data_files else "a data file is corrupt"
    lowered = text.lower()
    if "not found" in lowered or "no such file" in lowered or "does not exist" in lowered:
        return "a file is missing"
    if "JSONDecodeError" in text or "Expecting" in text:
        return "its metadata is not valid JSON"
    return text[:120]


def _move_aside(step_dir: Path) -> Path | None:
    """Moves an unreadable checkpoint into ``checkpoints/corrupt/`` (the step may then be written
    anew); returns where it went, or None when it could not be moved."""
    corrupt = step_dir.parent / CORRUPT_DIR
    destination = corrupt / step_dir.name
    suffix = 1
    while destination.exists():
        destination, suffix = corrupt / f"{step_dir.name}.{suffix}", suffix + 1
    try:
        corrupt.mkdir(exist_ok=True)
        step_dir.rename(destination)
    except OSError:
        return None
    return destination


def _tell(message: str) -> None:
    """One line for the user on stderr (from process 0 only), whatever the logging setup."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _write_failure_reason(error: BaseException) -> str:
    """The operating system's reason for a failed write (``No space left on device``), when known."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {one_line(error)[:200]}"


class CheckpointingMixin(BaseTask[Config], Generic[Config]):
    """Saves and restores the training state: every array of the model, optimizer state, EMA,
    PRNG key, State, data cursor, the resolved config, library version, git commit and mesh."""

    if TYPE_CHECKING:  # from ArtifactsMixin, composed beside this one (xax/task/task.py)
        run_dir: Path

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        options = config.checkpoint
        if options.best_mode not in BEST_MODES:
            raise ConfigError(f"checkpoint.best_mode={options.best_mode!r} is not one of {BEST_MODES}")
        if options.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={options.keep_last} must be at least 1")
        self._checkpoints: ocp.CheckpointManager | None = None
        self._write_error_filter: logging.Filter | None = None
        self._writing: int | None = None  # the step whose write may still be running
        self._last_save = (0, time.monotonic())
        # Set by the training loop after each validation pass: the averages, and the step they were
        # measured at. A checkpoint is ranked (keep_best) only by the metrics of its own step.
        self.last_valid_metrics: dict[str, float] = {}
        self.last_valid_step: int | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        if self._checkpoints is None:
            drop_abandoned_io_reports()
            self._checkpoints = _manager(self.checkpoint_dir, self.config.checkpoint)
            if self._write_error_filter is None:
                self._write_error_filter = _OrbaxWriteErrors()
                logging.getLogger("absl").addFilter(self._write_error_filter)
        return self._checkpoints

    def _close_manager(self) -> None:
        manager, self._checkpoints = self._checkpoints, None
        try:
            if manager is not None:
                with contextlib.suppress(Exception):
                    manager.close()
        finally:
            if self._write_error_filter is not None:
                logging.getLogger("absl").removeFilter(self._write_error_filter)
                self._write_error_filter = None

    def checkpoint_is_due(self, state: State) -> bool:
        options = self.config.checkpoint
        last_step, last_time = self._last_save
        if options.every_n_steps is not None and state.num_steps - last_step >= options.every_n_steps:
            return True
        seconds = options.every_n_seconds
        return seconds is not None and time.monotonic() - last_time >= seconds

    def valid_metrics_of(self, step: int) -> dict[str, float]:
        """The validation metrics measured at ``step`` (empty when validation did not run there)."""
        if self.last_valid_step != step:
            return {}
        return {name: float(value) for name, value in self.last_valid_metrics.items()}

    def checkpoint_metadata(self, state: State, cursor: Cursor, mesh: Mesh | None) -> dict[str, Any]:
        from xax import __version__

        git = read_git_state()
        return {
            "format": CHECKPOINT_FORMAT,
            "state": state.to_dict(),
            "cursor": cursor.to_dict(),
            "config": config_to_dict(self.config),
            "xax_version": __version__,
            "git_commit": git.commit if git is not None else None,
            "mesh": {"axis_names": list(mesh.axis_names), "shape": list(mesh.devices.shape)} if mesh else None,
            "valid_metrics": self.valid_metrics_of(state.num_steps),
        }

    def save_checkpoint(
        self, tree: PyTree, state: State, cursor: Cursor, mesh: Mesh | None = None, *, wait: bool = False
    ) -> Path:
        """Starts writing a checkpoint of ``tree`` at ``state.num_steps`` (returns once the arrays
        are copied off the devices; ``wait`` also waits for the write). Atomic: a reader never sees
        a partial checkpoint.

        Raises:
            CheckpointWriteError: When this write, or the previous one still running in the
                background, failed (a full disk); the older checkpoints are kept.
        """
        manager = self.checkpoint_manager()
        self.wait_for_checkpoint()  # surfaces a failed background write (orbax's save waits anyway)
        step = int(state.num_steps)
        metrics = self.valid_metrics_of(step)
        best = self.config.checkpoint.best_metric
        rank = metrics if best in metrics and math.isfinite(metrics[best]) else None
        if step not in manager.all_steps():
            items: dict[str, ocp.args.CheckpointArgs] = {
                "state": ocp.args.StandardSave(tree),
                "meta": ocp.args.JsonSave(self.checkpoint_metadata(state, cursor, mesh)),
            }
            # The checksums are dispatched once orbax has copied the arrays to the host (before
            # the next step donates them), so that the device computes them while training goes
            # on; a synchronous save waits for them inside ``save``, so they go first there.
            checksums: concurrent.futures.Future[tuple[list[str], Array]] = concurrent.futures.Future()
            if self.config.checkpoint.checksums:
                items["checksums"] = _ChecksumSave(checksums)
                if not self.config.checkpoint.async_save:
                    checksums.set_result(array_checksums(tree))
            try:
                with quiet_orbax():  # orbax warns of a save without metrics when ranking by them
                    manager.save(step, args=ocp.args.Composite(**items), metrics=rank, force=True)
                if not checksums.done():
                    checksums.set_result(array_checksums(tree))
            except BaseException as error:
                if not checksums.done():
                    checksums.set_exception(error)  # lets the background writer end
                if isinstance(error, Exception):
                    self._write_failed(step, error)
                raise
            self._writing = step
        self._last_save = (step, time.monotonic())
        if wait:
            self.wait_for_checkpoint()
        return self.checkpoint_dir / str(step)

    def wait_for_checkpoint(self) -> None:
        """Blocks until any checkpoint being written is complete.

        Raises:
            CheckpointWriteError: When the write failed; the older checkpoints are kept.
        """
        if self._checkpoints is None:
            return
        try:
            self._checkpoints.wait_until_finished()
            self._checkpoints.check_for_errors()
        except Exception as error:
            self._write_failed(self._writing, error)
        self._writing = None

    def _write_failed(self, step: int | None, error: BaseException) -> NoReturn:
        """Drops the failed write's leftovers and raises one line saying what failed, where and
        how much space is left."""
        self._close_manager()
        self._writing = None
        directory = self.checkpoint_dir
        if jax.process_index() == 0 and step is not None:
            # The space the partial write took (what orbax's writers still running may add is
            # removed when the next run opens the directory).
            for leftover in directory.glob(f"{step}{_ORBAX_TMP_SUFFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        kept = checkpoint_steps(directory)
        try:
            free = f"{human_bytes(shutil.disk_usage(directory).free)} free there"
        except OSError:
            free = "free space unknown"
        if kept:
            free += f", the last checkpoint took {human_bytes(disk_size(directory / str(kept[-1])))}"
        target = directory / str(step) if step is not None else directory
        intact = (
            f"the previous checkpoints are intact (steps {', '.join(map(str, kept))})"
            if kept
            else "no older checkpoint exists"
        )
        raise CheckpointWriteError(
            f"writing a checkpoint to {target} failed: {_write_failure_reason(error)} ({free}); {intact}"
        ) from error

    def latest_checkpoint(self, before_step: int | None = None) -> Path | None:
        """The newest complete checkpoint (of a step below ``before_step``, if given), or None."""
        steps = self._steps_before(before_step)
        return self.checkpoint_dir / str(steps[-1]) if steps else None

    def _steps_before(self, before_step: int | None) -> list[int]:
        steps = checkpoint_steps(self.checkpoint_dir)
        return steps if before_step is None else [step for step in steps if step < before_step]

    def discard_checkpoints_after(self, step: int) -> list[int]:
        """Deletes the checkpoints of steps after ``step`` (those of a trajectory training left, as
        on a rewind, which would otherwise stand in for the new one's); returns their steps."""
        self.wait_for_checkpoint()
        manager = self.checkpoint_manager()
        later = sorted(saved for saved in manager.all_steps() if saved > step)
        for saved in later:
            manager.delete(saved)  # every process calls it: orbax waits for all of them
        return later

    def restore_training(self, target: PyTree) -> tuple[PyTree, Restored] | None:
        """Restores per ``resume``: None to start afresh, 'auto' for the newest readable checkpoint
        of this run (falling back past unreadable ones, and saying so), or a path."""
        resume = self.config.resume
        if resume is None:
            return None
        if resume == "auto":
            restored = self.restore_latest(target)
            if restored is None:
                _tell(f"resume=auto: no checkpoint in {self.checkpoint_dir} yet; starting afresh")
                return None
        else:
            directory, steps = resolve_checkpoint(Path(resume))
            restored = self._restore_first_readable(directory, steps, target, fall_back=False)
        info = restored[1]
        drift = self._config_drift(info.metadata.get("config", {}))
        changed = f"; config changed since: {'; '.join(drift)}" if drift else ""
        _tell(f"resumed from step {info.state.num_steps} of {info.path.parent}{changed}")
        return restored

    def restore_latest(self, target: PyTree, before_step: int | None = None) -> tuple[PyTree, Restored] | None:
        """The newest readable checkpoint of this run (of a step below ``before_step``, if given), or
        None when there is none."""
        # Every step directory, complete or not: one damaged so far as to have lost an item is
        # fallen back past (and set aside) like any unreadable one, so that its step is written anew.
        directory = self.checkpoint_dir
        names = [path.name for path in directory.iterdir() if path.name.isdigit()] if directory.is_dir() else []
        steps = sorted((int(name) for name in names), reverse=True)
        steps = [step for step in steps if before_step is None or step < before_step]
        if not steps:
            return None
        return self._restore_first_readable(directory, steps, target, fall_back=True)

    def _restore_first_readable(
        self, directory: Path, steps: list[int], target: PyTree, *, fall_back: bool
    ) -> tuple[PyTree, Restored]:
        """Reads the first readable checkpoint of ``steps``. With ``fall_back``, an unreadable one is
        passed over (and moved into ``checkpoints/corrupt/`` once an older one was read, so that its
        step is written anew); a checkpoint of another model or optimizer stops the search."""
        unreadable: list[tuple[int, CheckpointError]] = []
        for step in steps:
            try:
                tree, metadata = self._load_matching(directory, step, target)
            except CheckpointMismatchError:
                raise
            except CheckpointError as error:
                if not fall_back or step == steps[-1]:
                    raise
                unreadable.append((step, error))
                continue
            self._set_aside(directory, unreadable)
            state = State.from_dict(metadata["state"])
            self._last_save = (state.num_steps, time.monotonic())
            self.last_valid_metrics = dict(metadata.get("valid_metrics") or {})
            self.last_valid_step = state.num_steps if self.last_valid_metrics else None
            cursor = Cursor.from_dict(metadata["cursor"])
            return tree, Restored(step, directory / str(step), state, cursor, metadata)
        raise AssertionError("unreachable: the last step raises")

    def _set_aside(self, directory: Path, unreadable: list[tuple[int, CheckpointError]]) -> None:
        """Moves the checkpoints a restore fell back past out of the way, saying so (one line each)."""
        if not unreadable:
            return
        for step, error in unreadable:
            step_dir = directory / str(step)
            moved = _move_aside(step_dir) if jax.process_index() == 0 else None
            where = f"; moved it to {moved}" if moved is not None else ""
            _tell(f"fell back past {step_dir} ({_why_unreadable(error)}){where}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("xax_checkpoints_set_aside")
        if self._checkpoints is not None:
            self._checkpoints.reload()

    def _load_matching(self, directory: Path, step: int, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
        # Compare the saved arrays with the model's first (no data read), so that a changed config
        # names the arrays and the keys, not an orbax internal, and is not taken for corruption.
        step_dir = directory / str(step)
        saved = saved_array_metadata(directory, step)
        differences = tree_differences(target, saved) if saved is not None else []
        if differences:
            self._mismatch(step_dir, differences)
        try:
            return load_checkpoint(directory, step, abstract_like(target))
        except CheckpointMismatchError as error:
            self._mismatch(step_dir, [one_line(error).split(" than this run's at ", 1)[-1] + " differ"])

    def _mismatch(self, step_dir: Path, differences: list[str]) -> NoReturn:
        try:
            drift = self._config_drift(read_metadata(step_dir.parent, int(step_dir.name)).get("config", {}))
        except CheckpointError:
            drift = []
        shown = "; ".join(differences[:2]) + (f" (and {len(differences) - 2} more)" if len(differences) > 2 else "")
        cause = (
            f"config changed since it was saved: {'; '.join(drift)} (if none of these explains it, the code did)"
            if drift
            else "the config is the same, so the model or optimizer code changed"
        )
        if any(difference.startswith("parameter ") for difference in differences):
            advice = "to resume it, run with the checkpoint's config values"  # warm_start needs the shapes too
        else:
            advice = (
                f"to take its weights only, start a new run directory with warm_start={step_dir}; to resume it, "
                "run with the checkpoint's config values"
            )
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} does not fit this run's model and optimizer: {shown}; {cause}; {advice}"
        )

    def _config_drift(self, saved_config: dict[str, Any]) -> list[str]:
        """``key: saved -> current`` for every config value that differs from the checkpoint's."""
        current = flatten_dict(config_to_dict(self.config))
        saved = flatten_dict(saved_config)
        return [
            f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(current) | set(saved))
            if current.get(key) != saved.get(key) and key not in ("resume", "warm_start")
        ]

    def warm_start_params(self, params: PyTree) -> PyTree:
        """Copies the model weights of ``warm_start`` into ``params`` where the paths match (a
        backbone into a model with a new head); a shape mismatch names the parameter."""
        path = self.config.warm_start
        if path is None:
            return params
        directory, steps = resolve_checkpoint(Path(path))
        # Read onto one device, then place each array with its own parameter's sharding (a plan's
        # shardings differ from leaf to leaf, in rank too).
        tree = load_arrays_anywhere(
            directory, steps[0], jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        )
        saved = named_leaves(tree["params"])
        check_shapes(params, tree["params"], directory / str(steps[0]))
        loaded = 0

        def take(key_path: Any, leaf: jax.Array) -> jax.Array:
            nonlocal loaded
            name = ".".join(_key_name(key) for key in key_path)
            if name in saved:
                loaded += 1
                return jax.device_put(np.asarray(saved[name], dtype=leaf.dtype), leaf.sharding)
            return leaf

        result = jax.tree_util.tree_map_with_path(take, params)
        logger.info("Warm start: %d of %d arrays from %s", loaded, len(jax.tree.leaves(params)), directory)
        return result

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            try:
                self.wait_for_checkpoint()
            finally:
                self._close_manager()


def flatten_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}`` (an empty dict stays a value, so it can be compared)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
