"""The hook protocol every mixin joins: BaseConfig and BaseTask[Config]."""

import re
import typing
from dataclasses import dataclass, is_dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from xax.core.config import check_choices
from xax.core.health import Health
from xax.core.state import State

if TYPE_CHECKING:
    from xax.task.launchers.base import Placement


@dataclass
class BaseConfig:
    """Root of every config dataclass. Mixins add their fields by subclassing it."""


Config = TypeVar("Config", bound=BaseConfig)


def _config_type_of(cls: type) -> type[BaseConfig] | None:
    """Returns the config class a task class was parameterized with, if it was."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            for arg in typing.get_args(base):
                if isinstance(arg, type) and issubclass(arg, BaseConfig) and is_dataclass(arg):
                    return arg
    return None


class BaseTask(Generic[Config]):
    """A task holds a config and joins the lifecycle hooks below.

    Each mixin overrides the hooks it needs (with ``@override``) and calls ``super()`` so every
    mixin in the composition runs. ``on_run_start`` runs in method-resolution order before any work;
    ``on_run_end`` runs in every case, also after an exception or Ctrl-C.
    """

    config: Config
    # Set by the launcher before ``execute``: the devices of the run and whether processes run in lockstep.
    placement: "Placement | None" = None

    def __init__(self, config: Config) -> None:
        super().__init__()
        config_class = type(self).get_config_class()
        if not isinstance(config, config_class):
            raise TypeError(
                f"{type(self).__name__} expects a {config_class.__name__}, got {type(config).__name__}; "
                f"pass {config_class.__name__}(...)"
            )
        self.config = config

    @classmethod
    def get_config_class(cls) -> type[Config]:
        """The config dataclass the task was parameterized with.

        Raises:
            TypeError: If the class was subclassed without its config type parameter.
        """
        config_class = _config_type_of(cls)
        if config_class is None:
            raise TypeError(
                f"{cls.__name__} does not name its config type; write "
                f"`class {cls.__name__}(xax.SupervisedTask[Config])` with `Config` a dataclass "
                "subclassing xax.SupervisedConfig"
            )
        return typing.cast(type[Config], config_class)

    @classmethod
    def task_name(cls) -> str:
        """The class name in snake case, used for the run directory."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def validate_config(self) -> None:
        """Checks the values the type system cannot (ranges, choices, paths) before anything is
        created; each mixin checks its own options and calls ``super()``. Raises ``ConfigError``
        naming the key and the fix. Here: every option declared with ``choices`` holds one of them."""
        check_choices(self.config)

    def on_run_start(self) -> None:
        """Called once before training starts, after the launcher has set up the devices."""

    def on_run_end(self) -> None:
        """Called once when the run ends, also after an exception or an interrupt."""

    def host_metrics(self) -> dict[str, float]:
        """Metrics sampled on the host (CPU, GPU, timers) to log with each training record."""
        return {}

    def expected_total_steps(self) -> int | None:
        """Total training steps if known in advance (for the progress bar's ETA)."""
        return None

    def expected_total_seconds(self) -> float | None:
        """The training time limit if there is one (for the ETA of a run limited by time)."""
        return None

    def resume_cadences(self, step: int) -> None:
        """After a restore (a resume or a rewind): count every step cadence from ``step``."""

    def restart_cadence_clocks(self) -> None:
        """After the first step: time-based cadences count from the end of start-up and compilation,
        so a slow start does not make them fire at step 1."""

    def check_resumed_optimizer(self, opt_state: Any, step: int) -> None:
        """Called after a resume with the restored optimizer state and the step it was saved at."""

    def note_progress(self, what: str, *, compiles: bool = False) -> None:
        """Reports progress to the hang watchdog (``WatchdogMixin``); nothing without one, so a task
        composed of a few mixins (a checkpointer alone) runs their code as it is."""

    def on_dataset(self, phase: str, dataset: object) -> None:
        """Called with each dataset ``get_dataset`` returned, as a phase's batch source is made from it."""

    def on_health(self, state: State, health: Health) -> None:
        """Called on the logging thread with each training window's ``Health``, read on the host;
        ``state`` is where training stood at the end of the window."""
