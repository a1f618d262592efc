"""Tests for the CPU stats mixin and the shared background sampler."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from xax.core.errors import ConfigError
from xax.task.mixins.cpu_stats import CPUStatsConfig, CPUStatsMixin, CPUStatsOptions, PeriodicSampler


@dataclass
class Cfg(CPUStatsConfig):
    pass


class CPUTask(CPUStatsMixin[Cfg]):
    pass


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _thread_alive(name: str) -> bool:
    return any(thread.name == name and thread.is_alive() for thread in threading.enumerate())


def test_samples_within_a_second_and_stops_promptly() -> None:
    # A long interval: the stop must not wait for it to pass.
    task = CPUTask(Cfg(cpu_stats=CPUStatsOptions(interval_s=10.0)))
    assert task.cpu_stats_metrics() == {}
    task.on_run_start()
    try:
        assert _wait_for(lambda: bool(task.cpu_stats_metrics()), timeout_s=1.0)
        metrics = task.cpu_stats_metrics()
        assert set(metrics) == {
            "cpu/process_percent",
            "cpu/process_rss_gb",
            "cpu/system_percent",
            "cpu/system_memory_percent",
        }
        assert all(isinstance(value, float) for value in metrics.values())
        assert 0.0 < metrics["cpu/process_rss_gb"] < 1e4
        assert 0.0 < metrics["cpu/system_memory_percent"] <= 100.0
        assert metrics["cpu/process_percent"] >= 0.0
        assert _thread_alive("xax-cpu-stats")
    finally:
        start = time.monotonic()
        task.on_run_end()
        elapsed = time.monotonic() - start
    assert elapsed < 1.0
    assert not _thread_alive("xax-cpu-stats")
    assert task.cpu_stats_metrics() == {}


def test_keeps_sampling_at_the_interval() -> None:
    calls: list[float] = []

    def sample() -> dict[str, float]:
        calls.append(time.monotonic())
        return {"n": float(len(calls))}

    sampler = PeriodicSampler(sample, interval_s=0.02, name="test-sampler")
    sampler.start()
    try:
        assert _wait_for(lambda: len(calls) >= 5, timeout_s=1.0)
        assert sampler.latest()["n"] >= 5.0
    finally:
        sampler.stop()
    count = len(calls)
    time.sleep(0.1)
    assert len(calls) == count, "the sampler kept running after stop()"


def test_failing_sample_does_not_kill_the_thread(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def flaky() -> dict[str, float]:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError("counter unavailable")
        return {"value": 1.0}

    sampler = PeriodicSampler(flaky, interval_s=0.01, name="flaky-sampler")
    with caplog.at_level("WARNING"):
        sampler.start()
        try:
            assert _wait_for(lambda: sampler.latest() == {"value": 1.0}, timeout_s=1.0)
        finally:
            sampler.stop()
    # Three failures, one warning.
    assert len([r for r in caplog.records if "flaky-sampler" in r.getMessage()]) == 1


def test_latest_returns_a_copy() -> None:
    sampler = PeriodicSampler(lambda: {"a": 1.0}, interval_s=10.0, name="copy-sampler")
    sampler.start()
    try:
        assert _wait_for(lambda: bool(sampler.latest()), timeout_s=1.0)
        sampler.latest()["a"] = 2.0
        assert sampler.latest() == {"a": 1.0}
    finally:
        sampler.stop()


def test_disabled_starts_no_thread() -> None:
    task = CPUTask(Cfg(cpu_stats=CPUStatsOptions(enabled=False)))
    task.on_run_start()
    try:
        assert not _thread_alive("xax-cpu-stats")
        time.sleep(0.15)
        assert task.cpu_stats_metrics() == {}
    finally:
        task.on_run_end()


def test_default_options() -> None:
    options = Cfg().cpu_stats
    assert options.enabled is True
    assert options.interval_s == 1.0
    # Each config gets its own options object.
    assert Cfg().cpu_stats is not options


@pytest.mark.parametrize("interval_s", [0.0, -1.0])
def test_non_positive_interval_names_the_key(interval_s: float) -> None:
    with pytest.raises(ConfigError, match=r"cpu_stats\.interval_s"):
        CPUTask(Cfg(cpu_stats=CPUStatsOptions(interval_s=interval_s))).validate_config()
