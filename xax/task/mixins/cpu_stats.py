"""CPU and memory use of the training process and its host, sampled in the background."""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import psutil
from typing_extensions import override

from xax.core.config import field
from xax.core.errors import ConfigError
from xax.task.base import BaseConfig, BaseTask

logger = logging.getLogger(__name__)

_BYTES_PER_GB = 1e9

# The longest we wait for a sampler thread to notice its stop event; a sample in flight (one psutil
# or NVML call) takes milliseconds, so this bound is only reached if a driver call hangs.
_JOIN_TIMEOUT_S = 5.0


class PeriodicSampler:
    """Calls a sampling function on a daemon thread at a fixed interval and keeps its latest result.

    The training loop reads the latest sample without waiting on the thread. An exception raised
    by the sampling function is logged once and the thread keeps sampling, so a flaky counter
    never stops the statistics of the others.
    """

    def __init__(
        self,
        sample_fn: Callable[[], dict[str, float]],
        interval_s: float,
        name: str,
        first_sample_delay_s: float = 0.0,
    ) -> None:
        """Prepares the sampler; nothing runs until ``start``.

        Args:
            sample_fn: Returns the current metrics, keyed by metric name.
            interval_s: Seconds between the starts of two samples.
            name: Thread name, also used in log lines.
            first_sample_delay_s: Seconds to wait before the first sample (rate counters such as
                CPU percent need a window to measure over).
        """
        self._sample_fn = sample_fn
        self._interval_s = interval_s
        self._first_sample_delay_s = first_sample_delay_s
        self._name = name
        self._stop_event = threading.Event()
        self._latest: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._logged_failure = False

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts the sampling thread; does nothing if it is already running."""
        if self.is_running:
            return
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = _JOIN_TIMEOUT_S) -> None:
        """Signals the thread to stop and joins it.

        Args:
            timeout_s: The longest to wait for the thread to finish its current sample.
        """
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("%s did not stop within %.1f s; leaving it as a daemon thread", self._name, timeout_s)
            self._thread = None

    def latest(self) -> dict[str, float]:
        """The most recent sample (a copy), or an empty dict before the first one."""
        # The thread replaces the dict instead of mutating it, so this copy is never torn.
        return dict(self._latest)

    def _run(self) -> None:
        # Event.wait returns as soon as stop() sets the event, so stopping never waits an interval.
        if self._stop_event.wait(self._first_sample_delay_s):
            return
        while True:
            try:
                self._latest = self._sample_fn()
            except Exception:
                if not self._logged_failure:
                    logger.warning("%s failed to take a sample; will keep trying", self._name, exc_info=True)
                    self._logged_failure = True
            if self._stop_event.wait(self._interval_s):
                return


@dataclass
class CPUStatsOptions:
    """How CPU and memory use is sampled."""

    enabled: bool = field(True, help="Sample CPU and memory use in the background and log it")
    interval_s: float = field(1.0, help="Seconds between two samples")


def validate_interval(interval_s: float, key: str) -> None:
    """Raises a ConfigError naming ``key`` unless the sampling interval is a positive number.

    Args:
        interval_s: The configured interval.
        key: The dotted config key it came from, for the message.
    """
    if not interval_s > 0:
        raise ConfigError(f"{key} must be a positive number of seconds, got {interval_s!r}; set {key}=1.0")


@dataclass
class CPUStatsConfig(BaseConfig):
    cpu_stats: CPUStatsOptions = field(CPUStatsOptions(), help="Background sampling of CPU and memory use")


Config = TypeVar("Config", bound=CPUStatsConfig)


class _CPUSampler:
    """Reads the CPU and memory counters of this process and of the host."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        # psutil's CPU percentages are measured since the previous call; these calls open the
        # window so the first real sample is meaningful instead of 0.0.
        self._process.cpu_percent(interval=None)
        psutil.cpu_percent(interval=None)

    def __call__(self) -> dict[str, float]:
        with self._process.oneshot():
            process_percent = self._process.cpu_percent(interval=None)
            rss = self._process.memory_info().rss
        return {
            "cpu/process_percent": float(process_percent),
            "cpu/process_rss_gb": rss / _BYTES_PER_GB,
            "cpu/system_percent": float(psutil.cpu_percent(interval=None)),
            "cpu/system_memory_percent": float(psutil.virtual_memory().percent),
        }


class CPUStatsMixin(BaseTask[Config], Generic[Config]):
    """Samples CPU and memory use on a background thread while the task runs.

    ``cpu/process_percent`` can exceed 100 when the process uses several cores; memory is in
    gigabytes (1e9 bytes).
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._cpu_stats_sampler: PeriodicSampler | None = None

    @override
    def validate_config(self) -> None:
        super().validate_config()
        validate_interval(self.config.cpu_stats.interval_s, "cpu_stats.interval_s")

    @override
    def on_run_start(self) -> None:
        super().on_run_start()
        options = self.config.cpu_stats
        if not options.enabled or self._cpu_stats_sampler is not None:
            return
        self._cpu_stats_sampler = PeriodicSampler(
            _CPUSampler(),
            interval_s=options.interval_s,
            name="xax-cpu-stats",
            first_sample_delay_s=min(options.interval_s, 0.1),
        )
        self._cpu_stats_sampler.start()

    @override
    def on_run_end(self) -> None:
        try:
            if self._cpu_stats_sampler is not None:
                self._cpu_stats_sampler.stop()
                self._cpu_stats_sampler = None
        finally:
            super().on_run_end()

    @override
    def host_metrics(self) -> dict[str, float]:
        return {**super().host_metrics(), **self.cpu_stats_metrics()}

    def cpu_stats_metrics(self) -> dict[str, float]:
        """The latest CPU and memory sample, or an empty dict before the first one or when off.

        Returns:
            Metrics keyed ``cpu/process_percent``, ``cpu/process_rss_gb``, ``cpu/system_percent``
            and ``cpu/system_memory_percent``.
        """
        if self._cpu_stats_sampler is None:
            return {}
        return self._cpu_stats_sampler.latest()
