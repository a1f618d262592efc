"""xax: fast machine-learning experiments in JAX.

Importing xax changes nothing global: no JAX config updates, no files written, no environment edits.
Names are loaded on first use, so ``import xax.nn`` or ``import xax.arch`` does not load the trainer
(tasks, data sources, checkpointing, loggers).
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.5.0"

# Each public name and the module it comes from, imported on first access.
_EXPORTS: dict[str, str] = {
    "MISSING": "xax.core.config",
    "field": "xax.core.config",
    "load_config": "xax.core.config_io",
    "register_config": "xax.core.config",
    "ConfigError": "xax.core.errors",
    "DataError": "xax.core.errors",
    "LaunchError": "xax.core.errors",
    "XaxError": "xax.core.errors",
    "Audio": "xax.core.metric",
    "Histogram": "xax.core.metric",
    "Image": "xax.core.metric",
    "Images": "xax.core.metric",
    "Metric": "xax.core.metric",
    "Scalar": "xax.core.metric",
    "Text": "xax.core.metric",
    "Tokens": "xax.core.metric",
    "Video": "xax.core.metric",
    "Phase": "xax.core.state",
    "State": "xax.core.state",
    "ParallelOptions": "xax.parallel",
    "Plan": "xax.parallel",
    "BaseConfig": "xax.task.base",
    "BaseTask": "xax.task.base",
    "MultiHostLauncher": "xax.task.launchers.multi_host",
    "SlurmLauncher": "xax.task.launchers.slurm",
    "read_history": "xax.task.loggers.jsonl",
    "InitParams": "xax.task.mixins.train",
    "TrainState": "xax.task.mixins.train_step",
    "Config": "xax.task.task",
    "SupervisedConfig": "xax.task.task",
    "SupervisedTask": "xax.task.task",
    "Task": "xax.task.task",
    "ArtifactsConfig": "xax.task.mixins.artifacts",
    "ArtifactsMixin": "xax.task.mixins.artifacts",
    "CheckpointingConfig": "xax.task.mixins.checkpointing",
    "CheckpointingMixin": "xax.task.mixins.checkpointing",
    "DataOptions": "xax.task.mixins.data_loader",
    "EMAOptions": "xax.task.mixins.train",
    "LogOptions": "xax.task.mixins.logger",
    "PrecisionOptions": "xax.task.mixins.train",
    "OptimOptions": "xax.optim",
    "make_optimizer": "xax.optim",
    "make_schedule": "xax.optim",
    "peak_memory_bytes": "xax.task.mixins.perf",
    "restore_weights": "xax.checkpoint",
    "human_bytes": "xax.utils.text",
    "read_idx": "xax.utils.idx",
    "step_flops": "xax.utils.flops",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from xax.checkpoint import restore_weights as restore_weights
    from xax.core.config import MISSING as MISSING
    from xax.core.config import field as field
    from xax.core.config import register_config as register_config
    from xax.core.config_io import load_config as load_config
    from xax.core.errors import ConfigError as ConfigError
    from xax.core.errors import DataError as DataError
    from xax.core.errors import LaunchError as LaunchError
    from xax.core.errors import XaxError as XaxError
    from xax.core.metric import Audio as Audio
    from xax.core.metric import Histogram as Histogram
    from xax.core.metric import Image as Image
    from xax.core.metric import Images as Images
    from xax.core.metric import Metric as Metric
    from xax.core.metric import Scalar as Scalar
    from xax.core.metric import Text as Text
    from xax.core.metric import Tokens as Tokens
    from xax.core.metric import Video as Video
    from xax.core.state import Phase as Phase
    from xax.core.state import State as State
    from xax.optim import OptimOptions as OptimOptions
    from xax.optim import make_optimizer as make_optimizer
    from xax.optim import make_schedule as make_schedule
    from xax.parallel import ParallelOptions as ParallelOptions
    from xax.parallel import Plan as Plan
    from xax.task.base import BaseConfig as BaseConfig
    from xax.task.base import BaseTask as BaseTask
    from xax.task.launchers.multi_host import MultiHostLauncher as MultiHostLauncher
    from xax.task.launchers.slurm import SlurmLauncher as SlurmLauncher
    from xax.task.loggers.jsonl import read_history as read_history
    from xax.task.mixins.artifacts import ArtifactsConfig as ArtifactsConfig
    from xax.task.mixins.artifacts import ArtifactsMixin as ArtifactsMixin
    from xax.task.mixins.checkpointing import CheckpointingConfig as CheckpointingConfig
    from xax.task.mixins.checkpointing import CheckpointingMixin as CheckpointingMixin
    from xax.task.mixins.data_loader import DataOptions as DataOptions
    from xax.task.mixins.logger import LogOptions as LogOptions
    from xax.task.mixins.perf import peak_memory_bytes as peak_memory_bytes
    from xax.task.mixins.train import EMAOptions as EMAOptions
    from xax.task.mixins.train import InitParams as InitParams
    from xax.task.mixins.train import PrecisionOptions as PrecisionOptions
    from xax.task.mixins.train_step import TrainState as TrainState
    from xax.task.task import Config as Config
    from xax.task.task import SupervisedConfig as SupervisedConfig
    from xax.task.task import SupervisedTask as SupervisedTask
    from xax.task.task import Task as Task
    from xax.utils.flops import step_flops as step_flops
    from xax.utils.idx import read_idx as read_idx
    from xax.utils.text import human_bytes as human_bytes


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
