"""Background workers: started with the run, shut down on every way out of it."""

import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from typing_extensions import override

from xax.core.config import check_range, field
from xax.task.base import BaseConfig, BaseTask

logger = logging.getLogger(__name__)


@runtime_checkable
class Closeable(Protocol):
    def close(self) -> None: ...


def _close_quietly(worker: Closeable) -> None:
    try:
        worker.close()
    except Exception:
        logger.exception("Error while closing %s", type(worker).__name__)


@dataclass
class ProcessOptions:
    shutdown_timeout_s: float = field(30.0, help="Seconds to wait for each background worker to stop at the end")


@dataclass
class ProcessConfig(BaseConfig):
    process: ProcessOptions = field(ProcessOptions(), help="Background worker options")


Config = TypeVar("Config", bound=ProcessConfig)


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class SignalRequests:
    """Stop and save requests carried by signals.

    SIGTERM and SIGINT ask training to finish its step, save and exit; a second SIGINT exits at
    once; SIGUSR1 asks for a checkpoint. ``launch`` installs one of these before anything slow, so
    a signal during start-up (importing, compiling) is kept for the run instead of killing the
    process; the task's own then takes over its requests and the handlers it replaced.
    """

    def __init__(self) -> None:
        self.stop_signal: int | None = None
        self.save_requested = False
        self._previous: dict[int, Any] = {}

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            self.save_requested = True
        elif signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        else:
            self.stop_signal = signum

    def install(self) -> None:
        """Handles the signals from now on (only the main thread can install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED_SIGNALS:
            previous = signal.signal(signum, self.on_signal)
            earlier = getattr(previous, "__self__", None)
            if isinstance(earlier, SignalRequests) and earlier is not self:
                # Take over what arrived during start-up, and restore what was there before it.
                self.stop_signal = self.stop_signal or earlier.stop_signal
                self.save_requested = self.save_requested or earlier.save_requested
                previous = earlier._previous.get(signum, signal.SIG_DFL)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class ProcessMixin(BaseTask[Config], Generic[Config]):
    """Owns the run's background workers and closes them, newest first, when the run ends.

    ``on_run_end`` is called after a normal exit, an exception and Ctrl-C alike, so a worker
    registered with ``add_worker`` can never keep the process alive.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._workers: list[Closeable] = []
        self.signals = SignalRequests()

    @override
    def validate_config(self) -> None:
        super().validate_config()
        check_range("process.shutdown_timeout_s", self.config.process.shutdown_timeout_s, minimum=0.0, inclusive=False)

    @property
    def stop_signal(self) -> int | None:
        return self.signals.stop_signal

    @property
    def save_requested(self) -> bool:
        return self.signals.save_requested

    @save_requested.setter
    def save_requested(self, value: bool) -> None:
        self.signals.save_requested = value

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.on_signal(signum, frame)

    def install_signal_handlers(self) -> None:
        """Handles SIGTERM, SIGINT and SIGUSR1 (see ``SignalRequests``)."""
        self.signals.install()

    def restore_signal_handlers(self) -> None:
        self.signals.restore()

    @override
    def on_run_start(self) -> None:
        self.install_signal_handlers()
        super().on_run_start()

    def add_worker(self, worker: Closeable) -> None:
        """Registers a worker to close when the run ends."""
        self._workers.append(worker)

    def close_workers_of(self, worker: Closeable | None) -> None:
        """Closes one registered worker now (e.g. a data feed being replaced)."""
        if worker is not None and worker in self._workers:
            self._workers.remove(worker)
            _close_quietly(worker)

    def close_workers(self) -> None:
        """Closes every registered worker, newest first; one failing does not stop the others."""
        timeout = self.config.process.shutdown_timeout_s
        while self._workers:
            worker = self._workers.pop()
            closer = threading.Thread(target=_close_quietly, args=(worker,), daemon=True, name="xax-close")
            closer.start()
            closer.join(timeout)
            if closer.is_alive():
                logger.warning("%s did not stop within %.0f s; leaving it behind", type(worker).__name__, timeout)

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            self.close_workers()
            self.restore_signal_handlers()
