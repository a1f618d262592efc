"""What every launcher does: set up the devices, hand them to the task, and run it."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import jax

from xax.core.errors import LaunchError
from xax.core.state import State


@dataclass(frozen=True)
class Placement:
    """What a launcher hands the task: the devices it runs on and the facts about its processes.

    The task builds its one ``(data, fsdp, tensor)`` mesh over ``devices`` (``ShardingMixin``).

    Attributes:
        devices: Every device of the run, in mesh order (grouped by process, so each process's rows
            of a batch are one block).
        lockstep: Whether several processes run the same program, so that every decision bearing a
            collective (stop, save, validate) must fall at the same step in each of them.
    """

    devices: tuple[jax.Device, ...]
    lockstep: bool = False


def refuse_timed(key: str, value: float | None, instead: str) -> None:
    """In a lockstep run: raises unless the limit or cadence ``key`` by time is unset, since each process
    would reach it at a different step, and one that validates, saves or stops while the others step
    waits in a collective forever.

    Raises:
        LaunchError: Naming ``key`` and its step-based twin ``instead``.
    """
    if value is not None:
        raise LaunchError(
            f"{key}={value} is timed, and the processes of a multi_host run would each reach it at a different "
            f"step; set {key}=null and use {instead}"
        )


@runtime_checkable
class LaunchedTask(Protocol):
    """What a launcher needs of the task it builds."""

    placement: Placement | None

    def execute(self) -> State: ...


@runtime_checkable
class TaskClass(Protocol):
    """A task class as launchers use it: built from its config, and named (for a job or its run folder)."""

    def __call__(self, config: Any) -> LaunchedTask: ...

    def task_name(self) -> str: ...


class Launcher(ABC):
    """Prepares the devices, builds the task, hands it its placement, and runs it."""

    @abstractmethod
    def place(self) -> Placement:
        """Sets up the devices (simulated CPU devices, ``jax.distributed``) and returns them."""

    def launch(self, task_class: TaskClass, config: object) -> State:
        placement = self.place()
        task = task_class(config)
        task.placement = placement
        return task.execute()
