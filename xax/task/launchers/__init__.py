"""Launchers, chosen by name from ``launcher.kind``."""

from collections.abc import Callable

import jax

from xax.core.errors import ConfigError
from xax.task.launchers.base import Launcher as Launcher
from xax.task.launchers.multi_cpu import MultiCpuLauncher as MultiCpuLauncher
from xax.task.launchers.multi_device import MultiDeviceLauncher as MultiDeviceLauncher
from xax.task.launchers.single_device import SingleDeviceLauncher as SingleDeviceLauncher


def _auto(num_devices: int | None, num_cpu_devices: int) -> Launcher:
    if num_devices is not None or len(jax.local_devices()) > 1:
        return MultiDeviceLauncher(num_devices)
    return SingleDeviceLauncher()


LAUNCHERS: dict[str, Callable[[int | None, int], Launcher]] = {
    "auto": _auto,
    "single_device": lambda num_devices, num_cpu_devices: SingleDeviceLauncher(),
    "multi_device": lambda num_devices, num_cpu_devices: MultiDeviceLauncher(num_devices),
    "multi_cpu": lambda num_devices, num_cpu_devices: MultiCpuLauncher(num_cpu_devices),
}


def get_launcher(kind: str, num_devices: int | None = None, num_cpu_devices: int = 4) -> Launcher:
    """The launcher registered under ``kind``."""
    if kind not in LAUNCHERS:
        raise ConfigError(f"launcher.kind={kind!r} is not one of {sorted(LAUNCHERS)}")
    return LAUNCHERS[kind](num_devices, num_cpu_devices)
