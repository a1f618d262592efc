"""The composition: Task and SupervisedTask, with their configs."""

from dataclasses import dataclass
from typing import Generic, TypeVar

from xax.task.mixins.cpu_stats import CPUStatsConfig, CPUStatsMixin
from xax.task.mixins.gpu_stats import GPUStatsConfig, GPUStatsMixin
from xax.task.mixins.runnable import RunnableConfig, RunnableMixin
from xax.task.mixins.supervised import SupervisedConfig as SupervisedMixinConfig
from xax.task.mixins.supervised import SupervisedMixin
from xax.task.mixins.train import TrainConfig, TrainMixin


@dataclass
class Config(TrainConfig, CPUStatsConfig, GPUStatsConfig, RunnableConfig):
    """Every option of a Task; subclass it to add your own fields."""


@dataclass
class SupervisedConfig(SupervisedMixinConfig, Config):
    """Every option of a SupervisedTask; subclass it to add your own fields."""


ConfigT = TypeVar("ConfigT", bound=Config)
SupervisedConfigT = TypeVar("SupervisedConfigT", bound=SupervisedConfig)


class Task(
    TrainMixin[ConfigT],
    CPUStatsMixin[ConfigT],
    GPUStatsMixin[ConfigT],
    RunnableMixin[ConfigT],
    Generic[ConfigT],
):
    """A training task with a custom loss: implement get_model, get_optimizer,
    compute_loss_and_metrics and get_dataset."""


class SupervisedTask(SupervisedMixin[SupervisedConfigT], Task[SupervisedConfigT], Generic[SupervisedConfigT]):
    """A supervised task: implement get_model, get_optimizer, get_output, compute_loss and get_dataset."""
