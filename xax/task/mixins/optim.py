"""The ``optim`` config group and the default ``get_optimizer`` built from it."""

import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import optax
from typing_extensions import override

from xax.core.config import field
from xax.optim import OptimOptions, check_options, make_optimizer
from xax.optim.options import check_length
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.train import TrainConfig


@dataclass
class OptimConfig(BaseConfig):
    optim: OptimOptions = field(
        OptimOptions(),
        help="Optimizer, learning-rate schedule and weight decay (unused by a task with its own get_optimizer)",
    )


Config = TypeVar("Config", bound=OptimConfig)


class OptimMixin(BaseTask[Config], Generic[Config]):
    """Gives the task an optimizer from the ``optim`` group; a task overriding ``get_optimizer`` ignores it."""

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)

        def expected_total_steps(self) -> int | None: ...

    def schedule_steps(self) -> int | None:
        """The schedule's last step: ``optim.total_steps``, else the run's length where it is known."""
        options = self.config.optim
        return options.total_steps if options.total_steps is not None else self.expected_total_steps()

    def get_optimizer(self) -> optax.GradientTransformation:
        """The optimizer the ``optim`` group names (AdamW at 1e-3 by default); override for any other."""
        steps = self.schedule_steps()
        check_length(self.config.optim, steps)
        return make_optimizer(self.config.optim, steps)

    @override
    def validate_config(self) -> None:
        super().validate_config()
        steps = self.schedule_steps()
        check_options(self.config.optim, steps)
        if steps is None and typing.cast(TrainConfig, self.config).max_epochs is None:
            check_length(self.config.optim, None)  # no length will ever be known (only max_seconds)
