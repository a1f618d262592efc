"""The ``optim`` config group and the default ``get_optimizer`` built from it."""

import logging
import math
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import jax.numpy as jnp
import optax
from typing_extensions import override

from xax.core.config import field
from xax.optim import OptimOptions, check_options, make_optimizer
from xax.optim.optimizers import schedule_of
from xax.optim.options import check_length
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.train import TrainConfig
from xax.task.mixins.train_step import find_learning_rate

logger = logging.getLogger(__name__)


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
    def check_resumed_optimizer(self, opt_state: Any, step: int) -> None:
        """Warns when this config's schedule gives the resumed step another learning rate than the
        run used (a decaying schedule's length follows the run's: resuming with a larger
        ``max_steps`` stretches it, and the rate jumps back up)."""
        super().check_resumed_optimizer(opt_state, step)
        if type(self).get_optimizer is not OptimMixin.get_optimizer or step < 1:
            return  # the task's own optimizer: its schedule is unknown here
        used = find_learning_rate(opt_state)
        if used is None:
            return
        options, steps = self.config.optim, self.schedule_steps()
        schedule = schedule_of(options, steps)
        # The state holds the rate of the last update: the schedule at count step - 1.
        was, now = float(used), float(jnp.asarray(schedule(step - 1)))
        if not math.isclose(was, now, rel_tol=1e-4, abs_tol=1e-12):
            logger.warning(
                "optim: step %d trained at learning rate %.4g; this config's %s schedule (over %s steps) gives %.4g "
                "there, so the rate jumps; set optim.total_steps to the length the run started with to continue "
                "its schedule",
                step,
                was,
                options.schedule,
                steps,
                now,
            )

    @override
    def validate_config(self) -> None:
        super().validate_config()
        steps = self.schedule_steps()
        check_options(self.config.optim, steps)
        if steps is None and typing.cast(TrainConfig, self.config).max_epochs is None:
            check_length(self.config.optim, None)  # no length will ever be known (only max_seconds)
