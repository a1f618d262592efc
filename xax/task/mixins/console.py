"""What a run tells its user: xax's log messages on the console and in ``run.log``, a banner at the
start, the compile time, and a summary at the end."""

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import jax
from etils import epath
from jax.sharding import Mesh
from jaxtyping import PyTree
from typing_extensions import override

from xax.core.state import State
from xax.task.base import BaseTask
from xax.task.loggers.console import Console, ConsoleHandler
from xax.task.loggers.jsonl import read_history
from xax.task.mixins.train import TrainConfig, composed
from xax.utils.text import human_bytes

logger = logging.getLogger(__name__)

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# The logger every module of the package logs under (``logging.getLogger(__name__)``).
ROOT_LOGGER = "xax"
RUN_LOG = "run.log"

Config = TypeVar("Config", bound=TrainConfig)


class LogSetup:
    """The handlers a run puts on the ``xax`` logger, and what it changed, to undo at the end.

    The ``xax`` logger gets its own level and stops passing records to the root logger: libraries
    (orbax, absl) set the root logger's level and handlers, which would hide xax's messages or
    print them twice.

    Args:
        console: Where messages are shown.
        level: The lowest level shown and written (``log.level``); processes other than 0 show
            warnings and errors only.
        absl_level: The level of the ``absl`` logger for the run (``log.absl_level``).
        run_log: The file to append a copy of the messages to (process 0), or None.
    """

    def __init__(self, console: Console, level: int, absl_level: int, run_log: Path | None) -> None:
        self._logger = logging.getLogger(ROOT_LOGGER)
        self._absl = logging.getLogger("absl")
        self._saved = (self._logger.level, self._logger.propagate, self._absl.level)
        self.handlers: list[logging.Handler] = [ConsoleHandler(console, level)]
        if run_log is not None:
            # Opened at the first message: a run refused at start (its folder in use) writes nothing.
            file_handler = logging.FileHandler(run_log, encoding="utf-8", delay=True)
            file_handler.setLevel(level)
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self.handlers.append(file_handler)
        for handler in self.handlers:
            self._logger.addHandler(handler)
        self._logger.setLevel(level)
        self._logger.propagate = False
        self._absl.setLevel(absl_level)

    def remove(self) -> None:
        """Takes the handlers off (closing the file) and restores the levels found."""
        for handler in self.handlers:
            self._logger.removeHandler(handler)
            handler.close()
        self.handlers = []
        level, propagate, absl_level = self._saved
        self._logger.setLevel(level)
        self._logger.propagate = propagate
        self._absl.setLevel(absl_level)


def count_parameters(tree: PyTree) -> tuple[int, int]:
    """The number of array elements in ``tree`` and their bytes."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "size") and hasattr(leaf, "dtype")]
    return sum(int(leaf.size) for leaf in leaves), sum(int(leaf.size) * leaf.dtype.itemsize for leaf in leaves)


def describe_devices(mesh: Mesh, plan: str) -> str:
    """``4 x cpu (1 process) | plan dp | mesh data=4 fsdp=1 tensor=1``."""
    devices = list(mesh.devices.flat)
    kinds = sorted({device.device_kind for device in devices})
    processes = len({device.process_index for device in devices})
    shape = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    noun = "process" if processes == 1 else "processes"
    return f"{len(devices)} x {', '.join(kinds)} ({processes} {noun}) | plan {plan} | mesh {shape}"


class ConsoleMixin(BaseTask[Config], Generic[Config]):
    """Shows the run on the console: log messages (``log.level``, copied to ``run_dir/run.log``),
    the run directory, devices and parameter count at the start, the compile time, a line per
    checkpoint and a summary at the end (process 0), and what the run is busy with between steps.

    Attributes:
        console: The run's terminal, shared by the progress bar and the messages.
    """

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)
        run_dir: Path
        run_storage: epath.Path
        checkpoint_dir: epath.Path

        def get_mesh(self) -> Mesh: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.console = Console()
        self._log_setup: LogSetup | None = None
        self._started = time.monotonic()
        self._best_valid: tuple[float, int] | None = None

    @override
    def on_run_start(self) -> None:
        self._started = time.monotonic()
        self._best_valid = None
        is_main = jax.process_index() == 0
        self.console = Console(progress=is_main)
        options = composed(self.config).log
        level = LOG_LEVELS[options.level]
        run_log = self.run_dir / RUN_LOG if is_main else None
        self._log_setup = LogSetup(
            self.console, level if is_main else max(level, logging.WARNING), LOG_LEVELS[options.absl_level], run_log
        )
        super().on_run_start()

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            self.console.finish()
            if self._log_setup is not None:
                self._log_setup.remove()
                self._log_setup = None

    def announce_start(self, params: PyTree) -> None:
        """The banner: where the run writes, what it runs on, and the size of the model."""
        count, nbytes = count_parameters(params)
        storage = self.run_storage
        if str(storage) == str(self.run_dir):
            logger.info("run directory: %s", self.run_dir)
        else:
            logger.info("run directory: %s (files written to %s first, then uploaded)", storage, self.run_dir)
        logger.info("devices: %s", describe_devices(self.get_mesh(), composed(self.config).parallel.plan))
        logger.info("model: %s parameters (%s)", f"{count:,}", human_bytes(nbytes))

    def note_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Keeps the best value of the metric that ranks checkpoints (``checkpoint.best_metric``)."""
        name, maximize = self._best_metric()
        if name not in metrics:
            return
        value = float(metrics[name])
        best = self._best_valid
        if best is None or (value > best[0] if maximize else value < best[0]):
            self._best_valid = (value, step)

    @override
    def resume_cadences(self, step: int) -> None:
        """On a resume (or a rewind), the best validation so far is the best of the run's history up
        to ``step`` (``log.jsonl``), not only of the validations this process will run."""
        super().resume_cadences(step)
        self._best_valid = None
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        try:
            history = read_history(path, phase="valid")
        except (OSError, ValueError, KeyError):  # unreadable: the summary counts this process's validations
            logger.warning(
                "could not read the validation history in %s; the final summary's best counts only "
                "the validations from step %d on",
                path,
                step,
            )
            return
        for record in history:
            if record["step"] <= step:
                self.note_validation(record["step"], record["scalars"])

    def _best_metric(self) -> tuple[str, bool]:
        options = composed(self.config).checkpoint
        return options.best_metric, options.best_mode == "max"

    def announce_end(self, state: State, last_checkpoint: epath.Path | None) -> None:
        """The summary: steps, time, best validation metric and where the checkpoints are."""
        self.console.finish()
        wall = time.monotonic() - self._started
        logger.info(
            "done: %d steps (%s samples) in %s (training %s)",
            state.num_steps,
            f"{state.num_samples:,}",
            _duration(wall),
            _duration(state.elapsed_time_s),
        )
        if self._best_valid is not None:
            name, _ = self._best_metric()
            value, step = self._best_valid
            logger.info("best validation %s: %.4g (step %d)", name, value, step)
        if last_checkpoint is not None:
            logger.info("checkpoints: %s (latest: %s)", self.checkpoint_dir, last_checkpoint.name)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
