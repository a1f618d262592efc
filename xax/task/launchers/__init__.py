"""Launchers, chosen by name from ``launcher.kind``."""

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from xax.core.config import check_range
from xax.core.errors import ConfigError
from xax.task.launchers.base import Launcher as Launcher
from xax.task.launchers.multi_cpu import MultiCpuLauncher as MultiCpuLauncher
from xax.task.launchers.multi_device import MultiDeviceLauncher as MultiDeviceLauncher
from xax.task.launchers.multi_host import MultiHostLauncher as MultiHostLauncher
from xax.task.launchers.multi_host import wants_multi_host
from xax.task.launchers.single_device import SingleDeviceLauncher as SingleDeviceLauncher
from xax.task.launchers.slurm import SlurmLauncher as SlurmLauncher

if TYPE_CHECKING:
    from xax.task.mixins.runnable import LauncherOptions


def _auto(options: "LauncherOptions") -> Launcher:
    # Decided before any device is touched: jax.distributed must start before JAX's backends.
    if wants_multi_host(options.distributed):
        return MultiHostLauncher(options.distributed)
    if options.num_devices is not None or len(jax.local_devices()) > 1:
        return MultiDeviceLauncher(options.num_devices)
    return SingleDeviceLauncher()


LAUNCHERS: dict[str, Callable[["LauncherOptions"], Launcher]] = {
    "auto": _auto,
    "single_device": lambda options: SingleDeviceLauncher(),
    "multi_device": lambda options: MultiDeviceLauncher(options.num_devices),
    "multi_cpu": lambda options: MultiCpuLauncher(options.num_cpu_devices),
    "multi_host": lambda options: MultiHostLauncher(options.distributed),
    "slurm": lambda options: SlurmLauncher(options.slurm),
}


def get_launcher(options: "LauncherOptions") -> Launcher:
    """The launcher registered under ``options.kind``, built from ``options`` (``config.launcher``)."""
    if options.kind not in LAUNCHERS:
        raise ConfigError(f"launcher.kind={options.kind!r} is not one of {sorted(LAUNCHERS)}")
    check_range("launcher.num_cpu_devices", options.num_cpu_devices, minimum=1)
    check_range("launcher.num_devices", options.num_devices, minimum=1, unset="all local devices")
    return LAUNCHERS[options.kind](options)
