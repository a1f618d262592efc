"""Background workers: started with the run, shut down on every way out of it."""

import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from typing_extensions import override

from xax.core.config import field
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


class ProcessMixin(BaseTask[Config], Generic[Config]):
    """Owns the run's background workers and closes them, newest first, when the run ends.

    ``on_run_end`` is called after a normal exit, an exception and Ctrl-C alike, so a worker
    registered with ``add_worker`` can never keep the process alive.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._workers: list[Closeable] = []
        self._previous_handlers: dict[int, Any] = {}
        self.stop_signal: int | None = None
        self.save_requested = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            self.save_requested = True
        elif signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        else:
            self.stop_signal = signum

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT ask training to finish its step, save and exit; a second SIGINT exits
        at once; SIGUSR1 asks for a checkpoint. Only the main thread can install handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    @override
    def on_run_start(self) -> None:
        super().on_run_start()
        self.install_signal_handlers()

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
