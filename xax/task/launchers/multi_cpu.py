"""N simulated CPU devices on one host, for testing data parallelism without accelerators."""

import jax
from jax._src import xla_bridge
from typing_extensions import override

from xax.core.errors import LaunchError
from xax.task.launchers.base import Placement
from xax.task.launchers.multi_device import MultiDeviceLauncher


class MultiCpuLauncher(MultiDeviceLauncher):
    """Splits the host CPU into ``num_cpu_devices`` devices; must run before JAX starts its backends."""

    def __init__(self, num_cpu_devices: int) -> None:
        super().__init__(num_devices=num_cpu_devices)
        self.num_cpu_devices = num_cpu_devices

    @override
    def place(self) -> Placement:
        if xla_bridge.backends_are_initialized():
            available = len(jax.devices("cpu"))
            if available < self.num_cpu_devices:
                raise LaunchError(
                    f"launcher.num_cpu_devices={self.num_cpu_devices} but JAX already started with {available} CPU "
                    "devices; launch before any JAX computation runs"
                )
        else:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", self.num_cpu_devices)
        return Placement(tuple(jax.devices("cpu")[: self.num_cpu_devices]))
