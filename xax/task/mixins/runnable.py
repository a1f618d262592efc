"""Launching a task from Python or the command line, with exit codes a scheduler can trust."""

import logging
import sys
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from xax.core.config import field
from xax.core.config_io import parse_cli
from xax.core.errors import CheckpointWriteError, TrainingStopped, XaxError
from xax.core.state import State
from xax.task.base import BaseConfig, BaseTask
from xax.task.launchers import LauncherOptions, get_launcher
from xax.task.mixins.process import SignalRequests

logger = logging.getLogger(__name__)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SAVE_FAILED = 3
EXIT_HUNG = 124  # as timeout(1): the watchdog ended a run that made no progress in time
EXIT_INTERRUPTED = 130


@dataclass
class RunnableConfig(BaseConfig):
    launcher: LauncherOptions = field(LauncherOptions(), help="How to place the task on devices")


Config = TypeVar("Config", bound=RunnableConfig)


class RunnableMixin(BaseTask[Config], Generic[Config]):
    """Adds ``launch`` (parse the command line, pick a launcher, run) and the run lifecycle."""

    @abstractmethod
    def run(self) -> State:
        """Does the work of the task."""

    def execute(self) -> State:
        """Runs the task between ``on_run_start`` and ``on_run_end`` (the latter in every case)."""
        # Every option is checked before anything is created (run directory, logs, threads).
        self.validate_config()
        try:
            self.on_run_start()
            return self.run()
        finally:
            self.on_run_end()

    @classmethod
    def launch(cls, config: Config | None = None, *, argv: Sequence[str] | None = None) -> State:
        """Resolves the config (defaults < ``config`` < ``--config`` YAML files < ``key=value``) and runs.

        A mistake in the config or launch settings ends the program with exit code 2 and one line
        naming the key; Ctrl-C ends it with 130 after the background workers have stopped; a run
        that makes no progress in time is ended by the watchdog with 124 (``watchdog.*``).
        """
        # Before anything slow: a SIGUSR1 or SIGTERM while JAX starts or the step compiles would
        # otherwise kill the process; the task takes these requests over when its run starts.
        early_signals = SignalRequests()
        early_signals.install()
        try:
            config_class = cls.get_config_class()
            resolved = parse_cli(config_class, config, sys.argv[1:] if argv is None else list(argv))
            launcher = get_launcher(resolved.launcher)
            return launcher.launch(cls, resolved)
        except TrainingStopped as stopped:
            print(str(stopped), file=sys.stderr)
            raise SystemExit(stopped.exit_code) from None
        except CheckpointWriteError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(EXIT_SAVE_FAILED) from None
        except XaxError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            early_signals.restore()
