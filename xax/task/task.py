"""The composition: Task and SupervisedTask, with their configs.

Every mixin and every config group is listed here and nowhere else: no mixin inherits another.
A mixin that calls another's methods declares them (under ``TYPE_CHECKING``), and the hooks of
``BaseTask`` (``validate_config``, ``on_run_start``, ``on_run_end``, ``host_metrics``, ...) chain
through ``super()`` in the order of the bases below.
"""

from dataclasses import dataclass
from typing import Generic, TypeVar

from xax.task.mixins.artifacts import ArtifactsConfig, ArtifactsMixin
from xax.task.mixins.checkpointing import CheckpointingConfig, CheckpointingMixin
from xax.task.mixins.compile import CompileConfig, CompileMixin
from xax.task.mixins.console import ConsoleMixin
from xax.task.mixins.cpu_stats import CPUStatsConfig, CPUStatsMixin
from xax.task.mixins.data_loader import DataLoaderConfig, DataLoaderMixin
from xax.task.mixins.gpu_stats import GPUStatsConfig, GPUStatsMixin
from xax.task.mixins.logger import LoggerConfig, LoggerMixin
from xax.task.mixins.nonfinite import NonfiniteConfig, NonfiniteMixin
from xax.task.mixins.optim import OptimConfig, OptimMixin
from xax.task.mixins.perf import PerfConfig, PerfMixin
from xax.task.mixins.process import ProcessConfig, ProcessMixin
from xax.task.mixins.provenance import ProvenanceMixin
from xax.task.mixins.runnable import RunnableConfig, RunnableMixin
from xax.task.mixins.sharding import ShardingConfig, ShardingMixin
from xax.task.mixins.step_context import StepContextConfig, StepContextMixin
from xax.task.mixins.supervised import SupervisedConfig as SupervisedMixinConfig
from xax.task.mixins.supervised import SupervisedMixin
from xax.task.mixins.train import TrainConfig, TrainMixin
from xax.task.mixins.train_setup import TrainSetupMixin
from xax.task.mixins.validation import ValidationMixin
from xax.task.mixins.watchdog import WatchdogConfig, WatchdogMixin


# Fields are ordered by the bases from last to first (``--help`` and the saved config.yaml show them so).
@dataclass
class Config(
    NonfiniteConfig,
    OptimConfig,
    TrainConfig,
    LoggerConfig,
    CheckpointingConfig,
    DataLoaderConfig,
    CompileConfig,
    StepContextConfig,
    PerfConfig,
    ArtifactsConfig,
    WatchdogConfig,
    ProcessConfig,
    ShardingConfig,
    CPUStatsConfig,
    GPUStatsConfig,
    RunnableConfig,
):
    """Every option of a Task; subclass it to add your own fields."""


@dataclass
class SupervisedConfig(SupervisedMixinConfig, Config):
    """Every option of a SupervisedTask; subclass it to add your own fields."""


ConfigT = TypeVar("ConfigT", bound=Config)
SupervisedConfigT = TypeVar("SupervisedConfigT", bound=SupervisedConfig)


class Task(
    ConsoleMixin[ConfigT],  # outermost: its log handler is the first thing a run sets up and the last it takes off
    WatchdogMixin[ConfigT],  # next: it watches every other mixin's start and end as well as the loop
    OptimMixin[ConfigT],  # before TrainMixin: its get_optimizer is the default of TrainMixin's abstract one
    TrainMixin[ConfigT],
    TrainSetupMixin[ConfigT],
    ValidationMixin[ConfigT],
    NonfiniteMixin[ConfigT],
    DataLoaderMixin[ConfigT],
    ProvenanceMixin[ConfigT],  # outside LoggerMixin: starts once the run's directory and config.yaml are written
    LoggerMixin[ConfigT],
    CheckpointingMixin[ConfigT],
    CompileMixin[ConfigT],
    StepContextMixin[ConfigT],
    PerfMixin[ConfigT],
    ArtifactsMixin[ConfigT],
    ProcessMixin[ConfigT],
    ShardingMixin[ConfigT],
    CPUStatsMixin[ConfigT],
    GPUStatsMixin[ConfigT],
    RunnableMixin[ConfigT],
    Generic[ConfigT],
):
    """A training task with a custom loss: implement get_model, get_optimizer,
    compute_loss_and_metrics and get_dataset."""


class SupervisedTask(SupervisedMixin[SupervisedConfigT], Task[SupervisedConfigT], Generic[SupervisedConfigT]):
    """A supervised task: implement get_model, get_optimizer, get_output, compute_loss and get_dataset."""
