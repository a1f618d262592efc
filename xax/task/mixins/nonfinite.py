"""Non-finite steps: halt, skip, or rewind to the newest checkpoint before the step (``nan.policy``).

The step never applies a non-finite update; it records the step in a ``Health`` that the logging
thread reads with the metrics. The training thread then acts on it here: the host learns of a bad
step at the next log, so checkpoints may exist past it, and a rewind restores the newest one
before it, deletes the later ones and skips the step's batch by its data position.
"""

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from etils import epath
from jaxtyping import PyTree
from typing_extensions import override

from xax.core.config import check_range, field
from xax.core.errors import ConfigError, TrainingStopped
from xax.core.health import Health
from xax.core.state import State
from xax.data.cursor import Cursor
from xax.data.feeds import Feed
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.process import Closeable
from xax.task.mixins.runnable import EXIT_FAILURE
from xax.task.mixins.train_step import TrainState

if TYPE_CHECKING:
    from xax.task.mixins.checkpointing import Restored

logger = logging.getLogger(__name__)

NAN_POLICIES = ("halt", "skip", "rewind")


@dataclass
class NanOptions:
    policy: str = field(
        "halt",
        help="On a non-finite loss or gradient (whose update is never applied): halt, skip the step, or "
        "rewind to the newest checkpoint before the step and skip the batch. Seen when the metrics are next logged.",
    )
    max_consecutive: int = field(10, help="skip: halt after this many non-finite steps in a row")
    max_rewinds: int = field(
        5,
        help="rewind: halt after this many rewinds in one run (each skips a different batch; more than a few "
        "means the cause is not the data but e.g. the learning rate)",
    )


@dataclass
class NonfiniteConfig(BaseConfig):
    nan: NanOptions = field(NanOptions(), help="What to do about non-finite losses and gradients")


Config = TypeVar("Config", bound=NonfiniteConfig)


@dataclass(frozen=True)
class Rewind:
    """The decision to go back to the newest checkpoint before ``step`` and skip that step's batch.

    Attributes:
        step: The first non-finite step.
        what: What went wrong, in words (for the log and the final error).
        position: The data position of the step's batch (the cursor before it), or None where it
            is no longer known.
    """

    step: int
    what: str
    position: Cursor | None


class NonfiniteMixin(BaseTask[Config], Generic[Config]):
    """Acts on non-finite steps per ``nan.policy``; the training loop asks ``act_on_nonfinite`` after
    each step whose window it has heard about, and rewinds when it returns a ``Rewind``."""

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)
        train_feed: Feed | None

        def wait_for_checkpoint(self) -> None: ...
        def latest_checkpoint(self, before_step: int | None = None) -> epath.Path | None: ...
        def discard_checkpoints_after(self, step: int) -> list[int]: ...
        def restore_latest(
            self, target: PyTree, before_step: int | None = None
        ) -> "tuple[PyTree, Restored] | None": ...
        def close_workers_of(self, worker: Closeable | None) -> None: ...
        def flush_logs(self) -> None: ...
        def log_event(self, step: int, kind: str, **detail: str) -> None: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.nonfinite_alert: Health | None = None
        self._health_lock = threading.Lock()
        self._health_seen_step = 0
        # The data position of each step's batch, kept until its window is known to be finite.
        self._positions: dict[int, Cursor] = {}
        # The parameters' names in flattening order, which the step's leaf numbers count through.
        self.grad_leaf_names: list[str] = []

    @override
    def validate_config(self) -> None:
        super().validate_config()
        options = self.config.nan
        if options.policy not in NAN_POLICIES:
            raise ConfigError(f"nan.policy={options.policy!r} is not one of {list(NAN_POLICIES)}")
        check_range("nan.max_consecutive", options.max_consecutive, minimum=1)
        check_range("nan.max_rewinds", options.max_rewinds, minimum=0)

    @override
    def on_health(self, state: State, health: Health) -> None:
        # Runs on the logging thread: only records; the training thread acts on it. An alert the
        # training thread has not taken yet is merged with, never replaced by, a later window's.
        super().on_health(state, health)
        with self._health_lock:
            self._health_seen_step = state.num_steps
            if health.ok:
                return
            pending = self.nonfinite_alert
            self.nonfinite_alert = health if pending is None else pending.merged(health)

    def _take_alert(self) -> Health | None:
        with self._health_lock:
            alert, self.nonfinite_alert = self.nonfinite_alert, None
            return alert

    def remember_position(self, step: int, position: Cursor) -> None:
        """Keeps the data position of ``step``'s batch until its window is known to be finite."""
        self._positions[step] = position

    def clear_positions(self) -> None:
        self._positions = {}

    def _forget_positions(self) -> None:
        """Drops the data positions of steps whose windows the logging thread has found finite."""
        seen = self._health_seen_step
        # Steps are added in increasing order, so the first key is the oldest: O(1) on every step.
        if self.nonfinite_alert is None and self._positions and next(iter(self._positions)) <= seen:
            self._positions = {step: cursor for step, cursor in self._positions.items() if step > seen}

    def act_on_nonfinite(self, health: Health) -> Rewind | None:
        """Acts on non-finite steps per ``nan.policy`` (their updates were never applied).

        Returns:
            A ``Rewind`` for the loop to carry out (``nan.policy=rewind``), else None (skip).

        Raises:
            TrainingStopped: On ``halt``, or ``skip`` past ``nan.max_consecutive`` steps in a row,
                or ``rewind`` with no checkpoint before the step.
        """
        step = int(health.first_step)
        what = health.describe(self.grad_leaf_names)
        self.wait_for_checkpoint()
        # A checkpoint saved after the step (before the host learned of it) is finite, since the
        # update was not applied, but its trajectory has already passed the bad batch.
        last_good = self.latest_checkpoint(before_step=step)
        options = self.config.nan
        streak = int(health.max_streak)
        if options.policy == "halt" or (options.policy == "skip" and streak >= options.max_consecutive):
            self.flush_logs()
            limit = f"; {streak} in a row (nan.max_consecutive={options.max_consecutive})"
            limit = limit if options.policy == "skip" else ""
            raise TrainingStopped(f"error: {what}{limit}; last good checkpoint: {last_good or 'none'}", EXIT_FAILURE)
        if options.policy == "rewind":
            if last_good is None:
                raise TrainingStopped(
                    f"error: {what}; nan.policy=rewind but no checkpoint precedes step {step}", EXIT_FAILURE
                )
            return Rewind(step, what, self._positions.get(step))
        logger.warning("%s; continuing (nan.policy=skip)", what)
        return None

    def check_rewind_budget(self, rewind: Rewind, rewinds: int, skipped: set[Cursor]) -> None:
        """Halts once rewinding stops helping: ``nan.max_rewinds`` rewinds, or a batch already
        skipped turning up again (the data position could not be told)."""
        limit = self.config.nan.max_rewinds
        repeated = rewind.position is not None and rewind.position in skipped
        if rewinds <= limit and not repeated and rewind.position is not None:
            return
        last_good = self.latest_checkpoint(before_step=rewind.step)
        if rewind.position is None:
            why = "its batch's data position is unknown, so rewinding could not skip it"
        elif repeated:
            why = "the same batch failed again after being skipped"
        else:
            why = (
                f"still non-finite after {limit} rewinds (nan.max_rewinds={limit}), each past a different batch: "
                "the cause is not the data; lower the learning rate or check the model's numerics"
            )
        self.flush_logs()
        raise TrainingStopped(f"error: {rewind.what}; {why}; last good checkpoint: {last_good or 'none'}", EXIT_FAILURE)

    def rewind_to(self, template: PyTree, rewind: Rewind) -> tuple[TrainState, State, Cursor]:
        """Restores the newest checkpoint before ``rewind.step`` into ``template``'s layout and deletes
        the later ones; returns the train state, State and data cursor to go on from."""
        self.wait_for_checkpoint()
        self.close_workers_of(self.train_feed)
        # Windows of the abandoned trajectory still on their way are written, then forgotten.
        self.flush_logs()
        self._take_alert()
        restored = self.restore_latest(template, before_step=rewind.step)
        if restored is None:
            raise TrainingStopped(
                f"error: {rewind.what}; no readable checkpoint precedes step {rewind.step} to rewind to", EXIT_FAILURE
            )
        ts, info = restored
        logger.warning("%s; rewinding to %s and skipping that batch", rewind.what, info.path)
        discarded = self.discard_checkpoints_after(info.state.num_steps)
        if discarded:
            logger.warning("Deleted the checkpoints of steps %s, which the rewound run replaces", discarded)
        self.resume_cadences(info.state.num_steps)
        self._health_seen_step = info.state.num_steps
        self.log_event(info.state.num_steps, "rewind", checkpoint=str(info.path), reason=rewind.what)
        return ts, info.state, info.cursor
