"""Writing checkpoints: orbax's manager with retention (the newest K, and the best K by a metric),
asynchronous atomic saves with their checksums, and one line when a write fails."""

import concurrent.futures
import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import jax
import orbax.checkpoint as ocp
from etils import epath
from jaxtyping import Array, PyTree
from orbax.checkpoint import checkpoint_managers

from xax.checkpoint.checksums import ChecksumHandler, ChecksumSave, array_checksums, compile_checksums
from xax.checkpoint.quiet import OrbaxWriteErrors, drop_abandoned_io_reports, one_line, quiet_orbax
from xax.checkpoint.remote import is_committed, prepare_orbax, temporary_path_class
from xax.core.config import field
from xax.core.errors import CheckpointWriteError, ConfigError
from xax.utils.storage import filesystem, forget_listings, is_remote, storage_path
from xax.utils.text import human_bytes

BEST_MODES = ("min", "max")
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


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
    pinned_host: bool | None = field(
        None,
        help="Copy the arrays off the accelerator through pinned (page-locked) host memory; None: orbax's choice "
        "(pinned on GPUs)",
    )


def check_options(options: CheckpointOptions, key: str = "checkpoint") -> None:
    """Raises ``ConfigError`` naming ``key``'s field when the retention options are not usable."""
    if options.best_mode not in BEST_MODES:
        raise ConfigError(f"{key}.best_mode={options.best_mode!r} is not one of {BEST_MODES}")
    if options.keep_last < 1:
        raise ConfigError(f"{key}.keep_last={options.keep_last} must be at least 1")
    if options.pinned_host not in (None, True, False):
        raise ConfigError(f"{key}.pinned_host={options.pinned_host!r} must be true, false or null (orbax's choice)")


class StateHandler(ocp.handlers.StandardCheckpointHandler):
    """orbax's handler of a pytree of arrays, with its device-to-host copy through pinned host memory
    or not (``pinned_host``; None keeps orbax's choice)."""

    def __init__(self, pinned_host: bool | None = None) -> None:
        super().__init__()
        if pinned_host is not None:
            # The handler the standard one delegates to, built as its constructor does, with the copy set.
            self._impl = ocp.handlers.PyTreeCheckpointHandler(
                save_concurrent_gb=96, restore_concurrent_gb=96, use_ocdbt=True, enable_pinned_host_transfer=pinned_host
            )


def open_orbax_manager(
    directory: epath.PathLike, options: CheckpointOptions, *, read_only: bool = False
) -> ocp.CheckpointManager:
    """An orbax manager of ``directory`` (a local folder or a ``gs://``/``s3://`` URL) with xax's
    items (``state``, ``meta``, ``checksums``) and ``options``' retention."""
    # Orbax refuses relative paths ("Checkpoint path should be absolute").
    directory = storage_path(directory)
    prepare_orbax(directory)
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
        temporary_path_class=temporary_path_class(directory),
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, meta, checksums = (
        StateHandler(options.pinned_host),
        ocp.handlers.JsonCheckpointHandler(),
        ChecksumHandler(),
    )
    for item, args_type, handler in (
        ("state", ocp.args.StandardSave, state),
        ("state", ocp.args.StandardRestore, state),
        ("meta", ocp.args.JsonSave, meta),
        ("meta", ocp.args.JsonRestore, meta),
        ("checksums", ChecksumSave, checksums),
        ("checksums", ocp.args.JsonRestore, checksums),
    ):
        registry.add(item, args_type, handler)
    with quiet_orbax():
        return ocp.CheckpointManager(directory, options=manager_options, handler_registry=registry)


def checkpoint_steps(directory: epath.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, in numeric order (never by string)."""
    directory = epath.Path(directory)
    forget_listings(directory)
    if not directory.is_dir():
        return []
    return sorted(
        int(path.name) for path in directory.iterdir() if path.is_dir() and path.name.isdigit() and is_complete(path)
    )


def is_complete(step_dir: epath.PathLike) -> bool:
    """Whether ``step_dir`` holds a finished checkpoint (orbax renames one from a temporary name
    into place, or in an object store writes its commit file last; both items exist then)."""
    step_dir = epath.Path(step_dir)
    if is_remote(step_dir) and not is_committed(step_dir):
        return False
    return (step_dir / "state").is_dir() and (step_dir / "meta").is_dir()


def disk_size(path: epath.PathLike) -> int:
    """Bytes of all files under ``path`` (symbolic links not followed)."""
    if is_remote(path):
        fs, key = filesystem(path)
        return int(fs.du(key, total=True))
    local = Path(path)
    return sum(file.lstat().st_size for file in local.rglob("*") if file.is_file() and not file.is_symlink())


def write_failure_reason(error: BaseException) -> str:
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


class CheckpointManager:
    """Writes checkpoints of a pytree of arrays into ``directory/STEP``, keeping the newest
    ``options.keep_last`` and the best ``options.keep_best`` by a validation metric.

    Each checkpoint holds the arrays (``state``), a JSON dictionary (``meta``) and, with
    ``options.checksums``, a checksum of every array (``checksums``). Writes are atomic: a reader
    never sees a partial checkpoint. Every process of a multi-process job must make the same calls.

    Args:
        directory: The checkpoints directory (created on the first save).
        options: Retention, asynchrony and checksums.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import jax.numpy as jnp
        >>> from xax.checkpoint import CheckpointManager, CheckpointOptions, load_checkpoint
        >>> directory = Path(tempfile.mkdtemp()) / "checkpoints"
        >>> manager = CheckpointManager(directory, CheckpointOptions(keep_last=1, async_save=False))
        >>> for step in (1, 2):
        ...     _ = manager.save(step, {"w": jnp.full(3, float(step))}, {"note": "example"})
        >>> manager.close()
        >>> manager.steps()
        [2]
        >>> tree, meta = load_checkpoint(directory, 2, None)
        >>> tree["w"].tolist(), meta
        ([2.0, 2.0, 2.0], {'note': 'example'})
    """

    def __init__(self, directory: epath.PathLike, options: CheckpointOptions | None = None) -> None:
        self.directory = storage_path(directory)
        self.options = options if options is not None else CheckpointOptions()
        check_options(self.options)
        self._orbax: ocp.CheckpointManager | None = None
        self._write_error_filter: logging.Filter | None = None
        self._writing: int | None = None  # the step whose write may still be running
        self._prewarm: threading.Thread | None = None
        # Seconds the last ``save`` spent in each of its blocking phases (``save_phases``).
        self.save_phases: dict[str, float] = {}

    def orbax_manager(self) -> ocp.CheckpointManager:
        """The orbax manager, opened on first use (and again after a failed write closed it)."""
        if self._orbax is None:
            drop_abandoned_io_reports()
            self._orbax = open_orbax_manager(self.directory, self.options)
            if self._write_error_filter is None:
                self._write_error_filter = OrbaxWriteErrors()
                logging.getLogger("absl").addFilter(self._write_error_filter)
        return self._orbax

    def prewarm(self, tree: PyTree) -> None:
        """Does a first save's once-per-process work now, in a background thread, so that the first
        save of ``tree`` blocks no longer than later ones: compiles the checksums of arrays shaped and
        placed as ``tree``'s (reading none of them), and starts orbax's writer threads and
        tensorstore's context with a tiny save into a temporary directory (single-process runs). A save waits for it; a
        failure here is only logged (the save then does that work itself)."""
        if self._prewarm is not None:
            return
        checksums = self.options.checksums

        def work() -> None:
            try:
                if checksums:
                    compile_checksums(tree)
                if jax.process_count() > 1:
                    return  # orbax's saves synchronize the processes: no save of our own beside the run's
                with tempfile.TemporaryDirectory(prefix="xax-prewarm-") as scratch:
                    options = CheckpointOptions(keep_last=1, keep_best=0, checksums=False)
                    warm = open_orbax_manager(Path(scratch), options)
                    try:
                        with quiet_orbax():
                            tiny = ocp.args.StandardSave({"x": jax.numpy.zeros(1)})
                            warm.save(0, args=ocp.args.Composite(state=tiny))
                        warm.wait_until_finished()
                    finally:
                        warm.close()
            except Exception as error:  # only a head start: the first save does the same work
                logging.getLogger(__name__).debug("checkpoint prewarm failed: %s", one_line(error))

        self._prewarm = threading.Thread(target=work, name="xax-checkpoint-prewarm", daemon=True)
        self._prewarm.start()

    def _join_prewarm(self) -> None:
        if self._prewarm is not None:
            self._prewarm.join()

    def close(self) -> None:
        """Closes the orbax manager (without waiting for a write: see ``wait``); a later save reopens it."""
        manager, self._orbax = self._orbax, None
        try:
            if manager is not None:
                with contextlib.suppress(Exception):
                    manager.close()
        finally:
            if self._write_error_filter is not None:
                logging.getLogger("absl").removeFilter(self._write_error_filter)
                self._write_error_filter = None

    def reload(self) -> None:
        """Rereads the directory, after checkpoints were moved out of it."""
        if self._orbax is not None:
            self._orbax.reload()

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, in numeric order."""
        return checkpoint_steps(self.directory)

    def latest(self, before_step: int | None = None) -> epath.Path | None:
        """The newest complete checkpoint (of a step below ``before_step``, if given), or None."""
        steps = [step for step in self.steps() if before_step is None or step < before_step]
        return self.directory / str(steps[-1]) if steps else None

    def save(
        self,
        step: int,
        tree: PyTree,
        metadata: dict[str, Any] | Callable[[], dict[str, Any]],
        *,
        metrics: dict[str, float] | None = None,
        wait: bool = False,
    ) -> epath.Path:
        """Starts writing a checkpoint of ``tree`` at ``step`` (returns once the arrays are copied
        off the devices; ``wait`` also waits for the write). A step already saved is kept as it is.

        Args:
            step: The step, the checkpoint's directory name.
            tree: The arrays to save (any pytree of arrays).
            metadata: JSON-serializable values saved beside them, or a function making them
                (called only when the step is written).
            metrics: The validation metrics measured at this very step, which rank the checkpoint
                for ``keep_best`` (a checkpoint without ``best_metric`` is kept by ``keep_last`` only).
            wait: Block until the checkpoint is complete.

        Returns:
            The checkpoint's directory.

        Raises:
            CheckpointWriteError: When this write, or the previous one still running in the
                background, failed (a full disk); the older checkpoints are kept.
        """
        clock = time.perf_counter()
        phases: dict[str, float] = {}

        def phase(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - clock
            clock = now

        self._join_prewarm()
        phase("prewarm_wait")
        manager = self.orbax_manager()
        phase("open")
        self.wait()  # surfaces a failed background write (orbax's save waits anyway)
        phase("previous_write_wait")
        best = self.options.best_metric
        metrics = metrics or {}
        rank = metrics if best in metrics and math.isfinite(metrics[best]) else None
        if step not in manager.all_steps():
            items: dict[str, ocp.args.CheckpointArgs] = {
                "state": ocp.args.StandardSave(tree),
                "meta": ocp.args.JsonSave(metadata if isinstance(metadata, dict) else metadata()),
            }
            # The checksums are dispatched once orbax has copied the arrays to the host (before
            # the next step donates them), so that the device computes them while training goes
            # on; a synchronous save waits for them inside ``save``, so they go first there.
            checksums: concurrent.futures.Future[tuple[list[str], Array]] = concurrent.futures.Future()
            if self.options.checksums:
                items["checksums"] = ChecksumSave(checksums)
                if not self.options.async_save:
                    checksums.set_result(array_checksums(tree))
            phase("metadata")
            try:
                with quiet_orbax():  # orbax warns of a save without metrics when ranking by them
                    manager.save(step, args=ocp.args.Composite(**items), metrics=rank, force=True)
                phase("orbax_save")
                if not checksums.done():
                    checksums.set_result(array_checksums(tree))
                phase("checksums_dispatch")
            except BaseException as error:
                if not checksums.done():
                    checksums.set_exception(error)  # lets the background writer end
                if isinstance(error, Exception):
                    self._write_failed(step, error)
                raise
            self._writing = step
        if wait:
            self.wait()
            phase("write_wait")
        self.save_phases = phases
        return self.directory / str(step)

    def wait(self) -> None:
        """Blocks until any checkpoint being written is complete.

        Raises:
            CheckpointWriteError: When the write failed; the older checkpoints are kept.
        """
        if self._orbax is None:
            return
        try:
            self._orbax.wait_until_finished()
            self._orbax.check_for_errors()
        except Exception as error:
            self._write_failed(self._writing, error)
        self._writing = None

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints of steps after ``step`` (those of a trajectory training left, as
        on a rewind, which would otherwise stand in for the new one's); returns their steps."""
        self.wait()
        manager = self.orbax_manager()
        later = sorted(saved for saved in manager.all_steps() if saved > step)
        for saved in later:
            manager.delete(saved)  # every process calls it: orbax waits for all of them
        return later

    def _write_failed(self, step: int | None, error: BaseException) -> NoReturn:
        """Drops the failed write's leftovers and raises one line saying what failed, where and
        how much space is left."""
        self.close()
        self._writing = None
        directory = self.directory
        if jax.process_index() == 0 and step is not None:
            # The space the partial write took (what orbax's writers still running may add is
            # removed when the next run opens the directory).
            for leftover in directory.glob(f"{step}{ORBAX_TMP_SUFFIX}*"):
                if is_remote(leftover):
                    with contextlib.suppress(OSError):
                        leftover.rmtree()
                else:
                    shutil.rmtree(leftover, ignore_errors=True)
        kept = checkpoint_steps(directory)
        try:
            free = (
                "in an object store"
                if is_remote(directory)
                else f"{human_bytes(shutil.disk_usage(directory).free)} free there"
            )
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
            f"writing a checkpoint to {target} failed: {write_failure_reason(error)} ({free}); {intact}"
        ) from error
