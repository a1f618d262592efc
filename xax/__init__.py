"""xax: fast machine-learning experiments in JAX.

Importing xax changes nothing global: no JAX config updates, no files written, no environment edits.
"""

__version__ = "0.1.0"

from xax.core.config import MISSING as MISSING
from xax.core.config import field as field
from xax.core.config import load_config as load_config
from xax.core.config import register_config as register_config
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
from xax.parallel import ParallelOptions as ParallelOptions
from xax.parallel import Plan as Plan
from xax.task.base import BaseConfig as BaseConfig
from xax.task.base import BaseTask as BaseTask
from xax.task.launchers.multi_host import MultiHostLauncher as MultiHostLauncher
from xax.task.launchers.slurm import SlurmLauncher as SlurmLauncher
from xax.task.loggers.jsonl import read_history as read_history
from xax.task.mixins.train import InitParams as InitParams
from xax.task.mixins.train_step import TrainState as TrainState
from xax.task.task import Config as Config
from xax.task.task import SupervisedConfig as SupervisedConfig
from xax.task.task import SupervisedTask as SupervisedTask
from xax.task.task import Task as Task
