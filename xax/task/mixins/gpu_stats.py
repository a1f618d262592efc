"""Utilization, memory, temperature and power of the host's NVIDIA GPUs, sampled in the background."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import pynvml
from typing_extensions import override

from xax.core.config import field
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.cpu_stats import PeriodicSampler, validate_interval

logger = logging.getLogger(__name__)

_BYTES_PER_GB = 1e9
_MILLIWATTS_PER_WATT = 1000.0


@dataclass
class GPUStatsOptions:
    """How GPU use is sampled."""

    enabled: bool = field(True, help="Sample GPU use in the background and log it; off where there is no NVIDIA GPU")
    interval_s: float = field(1.0, help="Seconds between two samples")


@dataclass
class GPUStatsConfig(BaseConfig):
    gpu_stats: GPUStatsOptions = field(GPUStatsOptions(), help="Background sampling of GPU use")


Config = TypeVar("Config", bound=GPUStatsConfig)


def _device_readings(handle: object) -> dict[str, Callable[[], float]]:
    """The NVML readings taken per device, each a call that may fail on its own."""
    return {
        "utilization_percent": lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        "memory_used_gb": lambda: float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / _BYTES_PER_GB,
        "memory_total_gb": lambda: float(pynvml.nvmlDeviceGetMemoryInfo(handle).total) / _BYTES_PER_GB,
        "temperature_c": lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
        "power_w": lambda: float(pynvml.nvmlDeviceGetPowerUsage(handle)) / _MILLIWATTS_PER_WATT,
    }


class _GPUSampler:
    """Reads each GPU's counters through NVML, skipping the ones a device does not report."""

    def __init__(self, handles: list[object]) -> None:
        self._readings = [(index, _device_readings(handle)) for index, handle in enumerate(handles)]

    def __call__(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for index, readings in self._readings:
            for name, read in readings.items():
                try:
                    metrics[f"gpu/{index}/{name}"] = read()
                except pynvml.NVMLError:
                    # Some devices do not report some counters (power on many consumer boards).
                    continue
        return metrics


def _open_nvml() -> list[object] | None:
    """Initializes NVML and returns one handle per GPU, or None where there are no GPUs to sample."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        logger.debug("GPU stats off: NVML is not available (%s)", error)
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
    except pynvml.NVMLError as error:
        logger.debug("GPU stats off: NVML could not list the devices (%s)", error)
        pynvml.nvmlShutdown()
        return None
    if not handles:
        logger.debug("GPU stats off: NVML reports no GPU")
        pynvml.nvmlShutdown()
        return None
    return handles


class GPUStatsMixin(BaseTask[Config], Generic[Config]):
    """Samples each NVIDIA GPU of the host on a background thread while the task runs.

    Where NVML is missing or reports no device, sampling is off without a thread, an error, or
    more than one debug log line. Devices are numbered as NVML numbers them. Memory is in
    gigabytes (1e9 bytes), power in watts.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._gpu_stats_sampler: PeriodicSampler | None = None

    @override
    def validate_config(self) -> None:
        super().validate_config()
        validate_interval(self.config.gpu_stats.interval_s, "gpu_stats.interval_s")

    @override
    def on_run_start(self) -> None:
        super().on_run_start()
        options = self.config.gpu_stats
        if not options.enabled or self._gpu_stats_sampler is not None:
            return
        handles = _open_nvml()
        if handles is None:
            return
        self._gpu_stats_sampler = PeriodicSampler(_GPUSampler(handles), options.interval_s, name="xax-gpu-stats")
        self._gpu_stats_sampler.start()

    @override
    def on_run_end(self) -> None:
        try:
            if self._gpu_stats_sampler is not None:
                self._gpu_stats_sampler.stop()
                self._gpu_stats_sampler = None
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError:
                    logger.debug("NVML shutdown failed", exc_info=True)
        finally:
            super().on_run_end()

    @override
    def host_metrics(self) -> dict[str, float]:
        return {**super().host_metrics(), **self.gpu_stats_metrics()}

    def gpu_stats_metrics(self) -> dict[str, float]:
        """The latest GPU sample, or an empty dict before the first one or when off.

        Returns:
            Metrics keyed ``gpu/<index>/utilization_percent``, ``memory_used_gb``,
            ``memory_total_gb``, ``temperature_c`` and ``power_w``, for the counters each device
            reports.
        """
        if self._gpu_stats_sampler is None:
            return {}
        return self._gpu_stats_sampler.latest()
