"""Loggers: where log records go. The W&B logger is imported from its module (wandb is optional)."""

from .base import Logger as Logger
from .base import LogRecord as LogRecord
from .jsonl import JsonlLogger as JsonlLogger
from .stdout import StdoutLogger as StdoutLogger
from .tensorboard import TensorBoardLogger as TensorBoardLogger
from .wandb import WandbLogger as WandbLogger
