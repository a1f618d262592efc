"""Supervised learning: the model maps a batch to an output, and a loss scores the output."""

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from xax.core.metric import Metric
from xax.core.state import State
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.train import TrainConfig
from xax.utils.pytree import cast_floating


@dataclass
class SupervisedConfig(BaseConfig):
    pass


# The media pass draws its key from ``TrainConfig.seed``.
Config = TypeVar("Config", bound=TrainConfig)


class SupervisedMixin(BaseTask[Config], Generic[Config]):
    """Splits the loss into ``get_output`` and ``compute_loss``, so metrics reuse the output.

    It implements the training loop's ``compute_loss_and_metrics`` (``TrainMixin``) and the media
    hooks (``ValidationMixin``), which it comes before in the composition (xax/task/task.py).
    The output is cast to float32 before the loss, so with a bfloat16 compute dtype the loss and
    its reductions still run in float32.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._jit_output: Callable[..., Any] | None = None

    @abstractmethod
    def get_output(self, model: PyTree, batch: PyTree, state: State, key: PRNGKeyArray) -> PyTree:
        """The model's output for a batch (runs inside the jitted step)."""

    @abstractmethod
    def compute_loss(self, model: PyTree, batch: PyTree, output: PyTree, state: State, key: PRNGKeyArray) -> Array:
        """The scalar loss for a batch, given the model's output."""

    def compute_metrics(
        self, model: PyTree, batch: PyTree, output: PyTree, loss: Array, state: State
    ) -> dict[str, Metric]:
        """Scalar metrics averaged with the loss, computed from the same output (no second forward)."""
        return {}

    def compute_media(self, model: PyTree, batch: PyTree, output: PyTree, state: State) -> dict[str, Metric]:
        """Images, text or histograms for one validation batch, logged at the heavy cadence."""
        return {}

    def compute_loss_and_metrics(
        self, model: PyTree, batch: PyTree, state: State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, Metric]]:
        """The training loop's loss: ``get_output``, then ``compute_loss`` and ``compute_metrics`` on it."""
        output_key, loss_key = jax.random.split(key)
        output = cast_floating(self.get_output(model, batch, state, output_key), jnp.dtype(jnp.float32))
        loss = self.compute_loss(model, batch, output, state, loss_key)
        return loss, self.compute_metrics(model, batch, output, loss, state)

    def has_media(self) -> bool:
        """Whether the task overrides ``compute_media`` or ``log_media``."""
        cls = type(self)
        return cls.compute_media is not SupervisedMixin.compute_media or cls.log_media is not SupervisedMixin.log_media

    def log_media(self, model: PyTree, batch: PyTree, state: State) -> dict[str, Metric]:
        """``compute_media`` on the jitted ``get_output`` of one validation batch."""
        if self._jit_output is None:
            # The counters enter as one array: as Python numbers they would be static, and every
            # media pass would trace and compile get_output anew (and keep the compiled copy).
            def output(model: PyTree, batch: PyTree, packed: Array, key: PRNGKeyArray) -> PyTree:
                return self.get_output(model, batch, State.unpack(packed, "valid"), key)

            self._jit_output = eqx.filter_jit(output)
        key = jax.random.fold_in(jax.random.key(self.config.seed), 2)
        packed = jnp.asarray(state.pack())
        output = cast_floating(self._jit_output(model, batch, packed, key), jnp.dtype(jnp.float32))
        return self.compute_media(model, batch, output, state)
