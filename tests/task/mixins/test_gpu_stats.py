"""Tests for the GPU stats mixin, with NVML missing and with a fake NVML."""

import logging
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pynvml
import pytest

from xax.core.errors import ConfigError
from xax.task.mixins.gpu_stats import GPUStatsConfig, GPUStatsMixin, GPUStatsOptions


@dataclass
class Cfg(GPUStatsConfig):
    pass


class GPUTask(GPUStatsMixin[Cfg]):
    pass


def _gpu_thread_alive() -> bool:
    return any(thread.name == "xax-gpu-stats" and thread.is_alive() for thread in threading.enumerate())


def _raise_library_not_found() -> None:
    raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


def _assert_off_quietly(caplog: pytest.LogCaptureFixture) -> None:
    task = GPUTask(Cfg(gpu_stats=GPUStatsOptions(interval_s=0.01)))
    with caplog.at_level(logging.DEBUG, logger="xax"):
        task.on_run_start()
        time.sleep(0.05)
        assert not _gpu_thread_alive()
        assert task.gpu_stats_metrics() == {}
        task.on_run_end()
    records = [record for record in caplog.records if record.name.startswith("xax")]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert "GPU stats off" in records[0].getMessage()


def test_off_quietly_without_nvml(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pynvml, "nvmlInit", _raise_library_not_found)
    _assert_off_quietly(caplog)


def test_off_quietly_on_this_machine(caplog: pytest.LogCaptureFixture) -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        if count > 0:
            pytest.skip("this machine has a GPU")
    _assert_off_quietly(caplog)


def test_off_quietly_with_zero_devices(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    shutdowns: list[bool] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: shutdowns.append(True))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    _assert_off_quietly(caplog)
    assert shutdowns == [True]


def _install_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two fake GPUs: device 1 does not report power, and its temperature fails once."""
    events: list[str] = []
    temperature_calls = {1: 0}

    def temperature(handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        if handle == 1:
            temperature_calls[1] += 1
            if temperature_calls[1] == 1:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
        return 60 + handle

    def power(handle: int) -> int:
        if handle == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 250_500  # milliwatts

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: events.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: events.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=40 + h, memory=5))
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetMemoryInfo", lambda h: SimpleNamespace(used=2_000_000_000 * (h + 1), total=80e9)
    )
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", temperature)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", power)
    return events


def test_samples_each_device(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _install_fake_nvml(monkeypatch)
    task = GPUTask(Cfg(gpu_stats=GPUStatsOptions(interval_s=0.01)))
    assert task.gpu_stats_metrics() == {}
    task.on_run_start()
    try:
        deadline = time.monotonic() + 1.0
        while "gpu/1/temperature_c" not in task.gpu_stats_metrics() and time.monotonic() < deadline:
            time.sleep(0.01)
        metrics = task.gpu_stats_metrics()
        assert _gpu_thread_alive()
    finally:
        start = time.monotonic()
        task.on_run_end()
        elapsed = time.monotonic() - start
    assert elapsed < 1.0
    assert not _gpu_thread_alive()
    assert metrics == {
        "gpu/0/utilization_percent": 40.0,
        "gpu/0/memory_used_gb": 2.0,
        "gpu/0/memory_total_gb": 80.0,
        "gpu/0/temperature_c": 60.0,
        "gpu/0/power_w": 250.5,
        "gpu/1/utilization_percent": 41.0,
        "gpu/1/memory_used_gb": 4.0,
        "gpu/1/memory_total_gb": 80.0,
        "gpu/1/temperature_c": 61.0,
    }
    assert events == ["init", "shutdown"]
    assert task.gpu_stats_metrics() == {}


def test_disabled_does_not_touch_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _install_fake_nvml(monkeypatch)
    task = GPUTask(Cfg(gpu_stats=GPUStatsOptions(enabled=False)))
    task.on_run_start()
    task.on_run_end()
    assert events == []
    assert task.gpu_stats_metrics() == {}


def test_non_positive_interval_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gpu_stats\.interval_s"):
        GPUTask(Cfg(gpu_stats=GPUStatsOptions(interval_s=0.0))).validate_config()
