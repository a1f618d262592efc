"""Ending a run that hangs: when no progress is made in time, every thread's stack, the device
memory and where training stood go to ``run.log`` and stderr, and the process exits with code 124.

Progress is what the host loop completes: a training step (the host dispatched it; it runs at most
``max_inflight_steps`` ahead of the devices, and blocks on them beyond that), a validation batch, a
checkpoint save, a media pass, a rewind. A loop blocked in the data iterator, in a collective that
never returns or in a device sync makes none, and the watchdog fires. In a run of several
processes each runs its own: a hang in one blocks the others in their next collective, so every
process exits with 124, each writing its own stacks.
"""

import contextlib
import faulthandler
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import jax
from typing_extensions import override

from xax.core.config import check_range, field
from xax.core.state import State
from xax.data.cursor import Cursor
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.console import RUN_LOG
from xax.task.mixins.runnable import EXIT_HUNG
from xax.utils.text import human_bytes
from xax.utils.watchdog import Stall, Watchdog

logger = logging.getLogger(__name__)

# How long the report waits on things that may themselves hang (the devices, the logging thread,
# a full pipe) before going on without them.
_BOUNDED_S = 5.0
# The longest the report waits for the run's files to reach their bucket (a run stored at a URL).
_UPLOAD_S = 60.0
_STDERR = 2


@dataclass
class WatchdogOptions:
    """When a run that makes no progress is ended."""

    enabled: bool = field(
        True,
        help="End a run that stops making progress with exit code 124, after writing every thread's stack, "
        "the device memory and the last step to run.log and stderr",
    )
    startup_s: float = field(
        3600.0,
        help="Seconds allowed until the first training step completes (building the model, restoring, "
        "opening the data, compiling), and for a first validation or media pass (they compile too)",
    )
    step_s: float = field(
        1800.0,
        help="Seconds allowed between two points of progress after that: training steps, validation "
        "batches, checkpoint saves, media passes",
    )


@dataclass
class WatchdogConfig(BaseConfig):
    watchdog: WatchdogOptions = field(WatchdogOptions(), help="Ending a run that hangs")


Config = TypeVar("Config", bound=WatchdogConfig)
T = TypeVar("T")


def _bounded(fn: Callable[[], T], timeout_s: float = _BOUNDED_S) -> tuple[bool, T | None]:
    """Runs ``fn`` on a daemon thread for at most ``timeout_s``: (finished, its result)."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True, name="xax-watchdog-call")
    thread.start()
    thread.join(timeout_s)
    return (True, result[0]) if result else (False, None)


def device_memory_lines() -> list[str]:
    """One line per local device with its memory in use, peak and limit; one line for devices
    that do not report memory (CPU devices)."""
    lines, silent = [], []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if not stats or "bytes_in_use" not in stats:
            silent.append(device)
            continue
        parts = [f"{human_bytes(stats['bytes_in_use'])} in use"]
        if "peak_bytes_in_use" in stats:
            parts.append(f"peak {human_bytes(stats['peak_bytes_in_use'])}")
        if "bytes_limit" in stats:
            parts.append(f"limit {human_bytes(stats['bytes_limit'])}")
        lines.append(f"{device}: {', '.join(parts)}")
    if silent:
        platforms = ", ".join(sorted({device.platform for device in silent}))
        lines.append(f"{len(silent)} {platforms} device(s): memory not reported by the platform")
    return lines


def _write(fds: list[int], text: str) -> None:
    data = text.encode("utf-8", "replace")
    for fd in fds:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            continue  # a closed stderr or a full disk: the other sink still gets it


class WatchdogMixin(BaseTask[Config], Generic[Config]):
    """Watches the run from a daemon thread (``watchdog.*``): see the module's docstring."""

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)
        run_dir: Path

        def training_position(self) -> tuple[State, Cursor] | None: ...
        def flush_logs(self) -> None: ...
        def upload_run_files_now(self) -> str | None: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._watchdog: Watchdog | None = None
        self._watchdog_log: Path | None = None
        # (index, count), read at run start: the report asks JAX nothing it may block on.
        self._watchdog_process = (0, 1)

    @override
    def validate_config(self) -> None:
        super().validate_config()
        options = self.config.watchdog
        check_range("watchdog.startup_s", options.startup_s, minimum=0.0, inclusive=False)
        check_range("watchdog.step_s", options.step_s, minimum=0.0, inclusive=False)

    @override
    def on_run_start(self) -> None:
        options = self.config.watchdog
        if options.enabled and self._watchdog is None:
            rank = jax.process_index()
            self._watchdog_process = (rank, jax.process_count())
            self._watchdog_log = self.run_dir / (RUN_LOG if rank == 0 else f"run.{rank}.log")
            self._watchdog = Watchdog(
                options.startup_s,
                options.step_s,
                self._on_stall,
                startup_key="watchdog.startup_s",
                step_key="watchdog.step_s",
            )
            self._watchdog.start()
        super().on_run_start()

    @override
    def on_run_end(self) -> None:
        try:
            self.note_progress("the end of the run")
            super().on_run_end()
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None

    @override
    def note_progress(self, what: str, *, compiles: bool = False) -> None:
        """Tells the watchdog the run made progress (a no-op when it is off).

        Args:
            what: What was just done, named in the report of a hang ("training step 12").
            compiles: Whether the work up to the next progress compiles a new program, which is
                allowed ``watchdog.startup_s`` instead of ``watchdog.step_s``.
        """
        if self._watchdog is not None:
            self._watchdog.progress(what, compiles=compiles)

    def _on_stall(self, stall: Stall) -> None:
        """Writes the report to stderr and the run's log, then ends the process with 124 (the main
        thread is blocked and cannot be unwound)."""
        try:
            self._report(stall)
        finally:
            os._exit(EXIT_HUNG)

    def _report(self, stall: Stall) -> None:
        fds = [_STDERR]
        if self._watchdog_log is not None:
            with contextlib.suppress(OSError):  # the run folder is not there (yet): stderr only
                fds.append(os.open(self._watchdog_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        _write(fds, "\n" + "\n".join(f"watchdog: {line}" for line in self._stall_lines(stall)) + "\n")
        _write(fds, "watchdog: the stack of every thread (most recent call first):\n")
        for fd in fds:
            faulthandler.dump_traceback(fd, all_threads=True)
        names = ", ".join(f"0x{thread.ident:016x} {thread.name}" for thread in threading.enumerate() if thread.ident)
        _write(fds, f"watchdog: the threads by name: {names}\n")
        finished, lines = _bounded(device_memory_lines)
        if not finished:
            lines = [f"not read: the devices did not answer within {_BOUNDED_S:.0f} s"]
        _write(fds, "".join(f"watchdog: device memory: {line}\n" for line in lines or ["no local device"]))
        # What the loggers were already handed (log.jsonl, TensorBoard), unless they are stuck too.
        _bounded(self._flush_quietly)
        _write(
            fds,
            f"watchdog: exiting with code {EXIT_HUNG}; if the run is only slow, raise {stall.limit_key} "
            "(watchdog.enabled=false turns the watchdog off)\n",
        )
        for fd in fds[1:]:
            os.close(fd)
        # A run stored at a URL: this report (run.log) and the logs reach the bucket before the exit.
        finished, outcome = _bounded(self._upload_quietly, _UPLOAD_S)
        if not finished:
            _write([_STDERR], f"watchdog: the run's files were not uploaded within {_UPLOAD_S:.0f} s\n")
        elif outcome is not None:
            _write([_STDERR], f"watchdog: {outcome}\n")

    def _upload_quietly(self) -> str | None:
        try:
            where = self.upload_run_files_now()
        except Exception as error:  # the report is on stderr already
            return f"the run's files were not uploaded: {type(error).__name__}: {error}"
        return None if where is None else f"uploaded the run's files (this report in run.log) to {where}"

    def _stall_lines(self, stall: Stall) -> list[str]:
        if stall.last_progress is None:
            lines = [
                f"the first training step did not complete within {stall.limit_key}={stall.limit_s:g} s "
                "(phase: start-up: building the model, restoring, opening the data, compiling the step)"
            ]
        else:
            phase = "compiling" if stall.limit_key.endswith("startup_s") else "training"
            lines = [
                f"no progress for {stall.waited_s:.1f} s ({stall.limit_key}={stall.limit_s:g}; phase: {phase}); "
                f"last progress: {stall.last_progress}"
            ]
        rank, count = self._watchdog_process
        lines.append(f"process {rank} of {count}, pid {os.getpid()}")
        position = self.training_position()
        if position is None:
            lines.append("last completed step: none in this run yet")
        else:
            state, cursor = position
            lines.append(
                f"last completed step: {state.num_steps} ({state.num_samples:,} samples, epoch {state.epoch}); "
                f"data position: epoch {cursor.epoch}, batch {cursor.index} (the next batch to read)"
            )
        return lines

    def _flush_quietly(self) -> None:
        try:
            self.flush_logs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        except Exception:  # a logger that failed already said so; the report matters more here
            logger.debug("flushing the logs before exiting failed", exc_info=True)
