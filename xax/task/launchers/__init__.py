"""Launchers, chosen by name from ``launcher.kind``, and their options (``LauncherOptions``)."""

from collections.abc import Callable
from dataclasses import dataclass

import jax

from xax.core.config import check_range, field
from xax.core.errors import ConfigError
from xax.task.launchers.base import LaunchedTask as LaunchedTask
from xax.task.launchers.base import Launcher as Launcher
from xax.task.launchers.base import Placement as Placement
from xax.task.launchers.base import TaskClass as TaskClass
from xax.task.launchers.multi_cpu import MultiCpuLauncher as MultiCpuLauncher
from xax.task.launchers.multi_device import MultiDeviceLauncher as MultiDeviceLauncher
from xax.task.launchers.multi_host import DistributedOptions as DistributedOptions
from xax.task.launchers.multi_host import MultiHostLauncher as MultiHostLauncher
from xax.task.launchers.multi_host import wants_multi_host
from xax.task.launchers.single_device import SingleDeviceLauncher as SingleDeviceLauncher
from xax.task.launchers.slurm import SlurmLauncher as SlurmLauncher
from xax.task.launchers.slurm import SlurmOptions as SlurmOptions


@dataclass
class LauncherOptions:
    kind: str = field(
        "auto",
        help="single_device, multi_device, multi_cpu, multi_host (jax.distributed), slurm (submit an sbatch job), "
        "or auto (multi_host under srun with several tasks or with distributed.num_processes > 1, else "
        "multi_device when several devices exist)",
    )
    num_devices: int | None = field(None, help="multi_device: how many local devices to use (None: all)")
    num_cpu_devices: int = field(4, help="multi_cpu: how many CPU devices to simulate")
    distributed: DistributedOptions = field(
        DistributedOptions(), help="multi_host: how the processes find each other (unset values: from SLURM)"
    )
    slurm: SlurmOptions = field(SlurmOptions(), help="slurm: the job to submit")


def _auto(options: LauncherOptions) -> Launcher:
    # Decided before any device is touched: jax.distributed must start before JAX's backends.
    if wants_multi_host(options.distributed):
        return MultiHostLauncher(options.distributed)
    if options.num_devices is not None or len(jax.local_devices()) > 1:
        return MultiDeviceLauncher(options.num_devices)
    return SingleDeviceLauncher()


LAUNCHERS: dict[str, Callable[[LauncherOptions], Launcher]] = {
    "auto": _auto,
    "single_device": lambda options: SingleDeviceLauncher(),
    "multi_device": lambda options: MultiDeviceLauncher(options.num_devices),
    "multi_cpu": lambda options: MultiCpuLauncher(options.num_cpu_devices),
    "multi_host": lambda options: MultiHostLauncher(options.distributed),
    "slurm": lambda options: SlurmLauncher(options.slurm),
}


def check_launcher_options(options: LauncherOptions) -> None:
    """Raises ``ConfigError`` naming the first ``launcher`` option that is out of range or unknown."""
    if options.kind not in LAUNCHERS:
        raise ConfigError(f"launcher.kind={options.kind!r} is not one of {sorted(LAUNCHERS)}")
    check_range("launcher.num_cpu_devices", options.num_cpu_devices, minimum=1)
    check_range("launcher.num_devices", options.num_devices, minimum=1, unset="all local devices")


def get_launcher(options: LauncherOptions) -> Launcher:
    """The launcher registered under ``options.kind``, built from ``options`` (``config.launcher``),
    after checking ``options``; it touches no device until its ``place`` runs."""
    check_launcher_options(options)
    return LAUNCHERS[options.kind](options)
