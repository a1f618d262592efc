"""Data parallelism over the local devices of one host."""

import jax
from typing_extensions import override

from xax.core.errors import LaunchError
from xax.task.launchers.base import Launcher, Placement


class MultiDeviceLauncher(Launcher):
    """Runs the task over the local devices of this host.

    Args:
        num_devices: How many local devices to use; None uses all of them.
    """

    def __init__(self, num_devices: int | None = None) -> None:
        self.num_devices = num_devices

    @override
    def place(self) -> Placement:
        devices = jax.local_devices()
        if self.num_devices is not None:
            if not 1 <= self.num_devices <= len(devices):
                raise LaunchError(
                    f"launcher.num_devices={self.num_devices} but this host has {len(devices)} "
                    f"{devices[0].platform} devices; use a number from 1 to {len(devices)}"
                )
            devices = devices[: self.num_devices]
        return Placement(tuple(devices))
