"""Logging: light metrics and heavy media at their own cadences, written off the training thread."""

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import jax
from typing_extensions import override

from xax.core.config import check_range, field
from xax.core.config_io import config_to_dict, config_to_yaml
from xax.core.errors import ConfigError
from xax.core.health import Health
from xax.core.metric import Metric
from xax.core.state import Phase, State
from xax.task.base import BaseConfig, BaseTask
from xax.task.loggers.base import LogEvent, Logger, LogRecord
from xax.task.loggers.console import Console
from xax.task.loggers.jsonl import JsonlLogger
from xax.task.loggers.stdout import StdoutLogger
from xax.task.loggers.tensorboard import TensorBoardLogger
from xax.task.mixins.process import Closeable
from xax.utils.layer_stats import PREFIX as LAYER_PREFIX
from xax.utils.layer_stats import module_histograms

logger = logging.getLogger(__name__)


@dataclass
class LogOptions:
    every_n_steps: int | None = field(100, help="Log training metrics every N steps (None: only by time)")
    every_n_seconds: float | None = field(10.0, help="Log training metrics every N seconds (None: only by steps)")
    heavy_every_n_steps: int | None = field(None, help="Log media (images, samples) every N steps")
    heavy_every_n_seconds: float | None = field(300.0, help="Log media (images, samples) every N seconds")
    stdout: bool = field(True, help="Print progress to standard output")
    jsonl: bool = field(True, help="Append one JSON record per event to log.jsonl in the run directory")
    tensorboard: bool = field(True, help="Write TensorBoard event files under tensorboard/ in the run directory")
    wandb: bool = field(False, help="Log to Weights & Biases (install the `wandb` extra)")
    wandb_project: str | None = field(None, help="W&B project; None uses the task name")
    wandb_entity: str | None = field(None, help="W&B entity (team or user)")
    wandb_mode: str = field("offline", help="W&B mode: offline (default, never contacts a server), online, disabled")
    wandb_name: str | None = field(None, help="W&B run name; None: the run folder, host and start time")
    wandb_tags: list[str] = field([], help="W&B run tags, e.g. [baseline,bf16]")
    wandb_group: str | None = field(None, help="W&B group, e.g. one experiment's seeds or processes")
    wandb_notes: str | None = field(None, help="W&B run notes: a longer description")
    layer_stats: bool = field(
        False,
        help="Log per module (top-level blocks, leaf modules) the gradient and parameter norms, the "
        "update-to-parameter ratio and the non-finite gradient count, computed in the step (layers/<module>/...)",
    )
    level: str = field(
        "info",
        help="Messages shown on the console and copied to run.log in the run directory",
        choices=("debug", "info", "warning", "error"),
    )
    absl_level: str = field(
        "error",
        help="Messages shown of libraries logging through absl (orbax): their routine notices are noise",
        choices=("debug", "info", "warning", "error"),
    )


@dataclass
class LoggerConfig(BaseConfig):
    log: LogOptions = field(LogOptions(), help="Logging options")


Config = TypeVar("Config", bound=LoggerConfig)

WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class LogItem:
    """What the training thread hands over: device values are read on the logging thread.

    Attributes:
        state: Where training stood at the end of the window.
        phase: The phase the values belong to.
        sums: Metric sums over the window (device arrays), with the step count under ``count``.
        health: The window's ``Health`` (training windows), handed to ``on_health`` once read.
        host_scalars: Values already on the host, logged as they are.
        system_scalars: Host measurements of the framework (throughput, timers, CPU and GPU
            statistics), logged as they are and marked as such (``LogRecord.system``).
        media: Media to log (images, text).
    """

    state: State
    phase: Phase
    sums: dict[str, jax.Array] = dataclass_field(default_factory=dict)
    health: Health | None = None
    host_scalars: dict[str, float] = dataclass_field(default_factory=dict)
    system_scalars: dict[str, float] = dataclass_field(default_factory=dict)
    media: dict[str, Metric] = dataclass_field(default_factory=dict)
    # With log.layer_stats: add each statistic's histogram over the leaf modules, from the latest
    # statistics logged (at the media cadence).
    layer_histograms: bool = False


def _to_record(item: LogItem) -> tuple[LogRecord, Health | None]:
    """Reads device values (this is where the logging thread waits on the device) and averages;
    also returns the window's health, read on the host."""
    sums, health = jax.device_get((item.sums, item.health))
    count = float(sums.pop("count", 1.0))
    scalars = {name: float(value) / max(count, 1.0) for name, value in sums.items()}
    scalars.update(item.host_scalars)
    # The per-module statistics (log.layer_stats) are the framework's measurements, not the task's
    # metrics: marked as such, the console line leaves them out.
    layers = {name: scalars.pop(name) for name in [n for n in scalars if n.startswith(LAYER_PREFIX)]}
    state = item.state
    record = LogRecord.from_metrics(
        item.media,
        step=state.num_steps,
        num_samples=state.num_samples,
        elapsed_time_s=state.elapsed_time_s,
        phase=item.phase,
        scalars=scalars,
        system={**layers, **item.system_scalars},
    )
    return record, None if health is None else health.on_host()


class LogWorker:
    """A thread that turns LogItems into records and writes them to every logger, in order."""

    def __init__(self, loggers: list[Logger], on_health: Callable[[State, Health], None]) -> None:
        self._loggers = loggers
        self._on_health = on_health
        self._queue: queue.Queue[LogItem | LogEvent | None] = queue.Queue()
        self._error: BaseException | None = None
        self._last_layers: dict[str, float] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True, name="xax-log")
        self._thread.start()

    def submit(self, item: LogItem | LogEvent) -> None:
        self._raise_if_failed()
        self._queue.put(item)

    def flush(self) -> None:
        """Waits until every submitted item is written."""
        self._queue.join()
        for sink in self._loggers:
            sink.flush()
        self._raise_if_failed()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for sink in self._loggers:
            sink.close()
        self._loggers = []

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"Logging failed: {self._error}") from self._error

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is not None:
                    continue
                if isinstance(item, LogEvent):
                    for sink in self._loggers:
                        sink.write_event(item)
                else:
                    record, health = _to_record(item)
                    layers = {name: record.scalars[name] for name in record.system if name.startswith(LAYER_PREFIX)}
                    self._last_layers = layers or self._last_layers
                    if item.layer_histograms:
                        record.histograms.update(module_histograms(self._last_layers))
                    if health is not None:
                        self._on_health(item.state, health)
                    for sink in self._loggers:
                        sink.write(record)
            except BaseException as error:  # surfaced on the training thread at the next submit
                self._error = error
            finally:
                self._queue.task_done()


class Cadence:
    """Decides when something is due, by steps or by seconds, whichever comes first."""

    def __init__(self, every_n_steps: int | None, every_n_seconds: float | None) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.last_step = 0
        self.last_time = time.monotonic()

    def is_due(self, step: int) -> bool:
        if self.every_n_steps is not None and step - self.last_step >= self.every_n_steps:
            return True
        return self.every_n_seconds is not None and time.monotonic() - self.last_time >= self.every_n_seconds

    def mark(self, step: int) -> None:
        self.last_step = step
        self.last_time = time.monotonic()

    def restart_clock(self) -> None:
        """Counts the seconds from now, leaving the step count alone."""
        self.last_time = time.monotonic()


class RateWindow:
    """Host-side rates over one logging window (no device reads)."""

    def __init__(self, start: float, wait_time_s: float) -> None:
        self.start = start
        self.wait_time_s = wait_time_s
        self.steps = 0
        self.first_step_s: float | None = None

    def close(self, wait_time_s: float, batch_size: int, tokens_per_sample: int | None = None) -> dict[str, float]:
        """The window's step, sample (and token) rates and the fraction of it spent waiting for data.

        Args:
            wait_time_s: The feed's total wait for data so far (the window's start value is kept).
            batch_size: Samples per step.
            tokens_per_sample: Tokens in one sample, for ``tokens_per_second``; None leaves it out.
        """
        seconds = max(time.perf_counter() - self.start, 1e-9)
        scalars = {
            "steps_per_second": self.steps / seconds,
            "samples_per_second": self.steps * batch_size / seconds,
            "data_wait_fraction": (wait_time_s - self.wait_time_s) / seconds,
        }
        if tokens_per_sample is not None:
            scalars["tokens_per_second"] = scalars["samples_per_second"] * tokens_per_sample
        if self.first_step_s is not None:
            scalars["time_to_first_step_s"] = self.first_step_s
        return scalars


class LoggerMixin(BaseTask[Config], Generic[Config]):
    """Sends metrics to stdout, JSONL, TensorBoard and W&B without stalling the training loop.

    The training thread only hands over device arrays; the logging thread reads them (waiting on
    the device there, not in the loop), averages them over the window and writes the record.
    """

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)
        run_dir: Path
        console: Console

        def write_run_metadata(self, config_yaml: str) -> None: ...
        def add_worker(self, worker: Closeable) -> None: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._log_worker: LogWorker | None = None
        self._light_cadence = Cadence(config.log.every_n_steps, config.log.every_n_seconds)
        self._heavy_cadence = Cadence(config.log.heavy_every_n_steps, config.log.heavy_every_n_seconds)

    @override
    def validate_config(self) -> None:
        super().validate_config()
        options = self.config.log
        if options.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"log.wandb_mode={options.wandb_mode!r} is not one of {list(WANDB_MODES)}")
        if options.wandb:
            from xax.task.loggers.wandb import check_wandb

            check_wandb(options.wandb_mode)
        check_range("log.every_n_steps", options.every_n_steps, minimum=1, unset="by time only")
        check_range("log.every_n_seconds", options.every_n_seconds, minimum=0.0, inclusive=False)
        check_range("log.heavy_every_n_steps", options.heavy_every_n_steps, minimum=1)
        check_range("log.heavy_every_n_seconds", options.heavy_every_n_seconds, minimum=0.0, inclusive=False)
        if self.placement is not None and self.placement.lockstep and options.heavy_every_n_seconds is not None:
            # Media by time would fall at a different step in each process; on by default, so off with a warning.
            logger.warning(
                "multi_host: log.heavy_every_n_seconds is off (processes must agree); use log.heavy_every_n_steps"
            )
            self.config = dataclasses.replace(self.config, log=dataclasses.replace(options, heavy_every_n_seconds=None))
            self._heavy_cadence = Cadence(options.heavy_every_n_steps, None)

    def make_loggers(self) -> list[Logger]:
        """The loggers the config asks for; override to add your own."""
        options = self.config.log
        sinks: list[Logger] = []
        if jax.process_index() != 0:
            return sinks
        if options.stdout:
            sinks.append(
                StdoutLogger(
                    total_steps=self.expected_total_steps,
                    max_seconds=self.expected_total_seconds(),
                    console=self.console,
                )
            )
        if options.jsonl:
            sinks.append(JsonlLogger(self.run_dir / "log.jsonl"))
        if options.tensorboard:
            sinks.append(TensorBoardLogger(self.run_dir / "tensorboard", config=config_to_dict(self.config)))
        if options.wandb:
            from xax.task.loggers.wandb import WandbLogger

            sinks.append(
                WandbLogger(
                    run_dir=self.run_dir,
                    project=options.wandb_project or self.task_name(),
                    name=options.wandb_name,
                    entity=options.wandb_entity,
                    mode=options.wandb_mode,
                    config=config_to_dict(self.config),
                    tags=options.wandb_tags,
                    group=options.wandb_group,
                    notes=options.wandb_notes,
                )
            )
        return sinks

    @override
    def on_run_start(self) -> None:
        super().on_run_start()
        if jax.process_index() == 0:
            self.write_run_metadata(config_to_yaml(self.config))
        self._log_worker = LogWorker(self.make_loggers(), self.on_health)
        self.add_worker(self._log_worker)

    @override
    def resume_cadences(self, step: int) -> None:
        super().resume_cadences(step)
        self._light_cadence.mark(step)
        self._heavy_cadence.mark(step)

    @override
    def restart_cadence_clocks(self) -> None:
        super().restart_cadence_clocks()
        self._light_cadence.restart_clock()
        self._heavy_cadence.restart_clock()

    def light_log_is_due(self, state: State) -> bool:
        return self._light_cadence.is_due(state.num_steps)

    def heavy_log_is_due(self, state: State) -> bool:
        return self._heavy_cadence.is_due(state.num_steps)

    def log_item(self, item: LogItem) -> None:
        """Hands an item to the logging thread; marks the light or heavy cadence it satisfies."""
        if self._log_worker is None:
            raise RuntimeError("log_item() called before the run started")
        if item.phase == "train" and item.sums:
            self._light_cadence.mark(item.state.num_steps)
        self._log_worker.submit(item)

    def mark_heavy_logged(self, state: State) -> None:
        """Counts the heavy cadence from this step, whether or not the task had media to log:
        a due cadence left unmarked would make every later step wait for a media pass."""
        self._heavy_cadence.mark(state.num_steps)

    def log_event(self, step: int, kind: str, **detail: str) -> None:
        """Marks a resume or rewind in the logs (see ``read_history``), in order with the records."""
        if self._log_worker is None:
            raise RuntimeError("log_event() called before the run started")
        self._log_worker.submit(LogEvent(step=step, kind=kind, detail=detail))

    def flush_logs(self) -> None:
        if self._log_worker is not None:
            self._log_worker.flush()
