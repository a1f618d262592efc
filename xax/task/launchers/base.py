"""What every launcher does: set up devices and a mesh, then run the task on them."""

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh

from xax.core.state import State

if TYPE_CHECKING:
    from xax.task.mixins.runnable import RunnableMixin


DATA_AXIS = "data"


class Launcher(ABC):
    """Prepares the devices, builds the task with its mesh, and runs it."""

    @abstractmethod
    def make_mesh(self) -> Mesh:
        """The device mesh the task trains on (after any device set-up)."""

    def launch(self, task_class: "type[RunnableMixin]", config: object) -> State:
        mesh = self.make_mesh()
        task = task_class(config)
        task.mesh = mesh
        return task.execute()


def data_mesh(devices: list[jax.Device]) -> Mesh:
    """A one-axis mesh over ``devices`` for data parallelism."""
    return Mesh(np.array(devices), (DATA_AXIS,))
