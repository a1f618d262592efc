"""The task's checkpoints: when to save, what a training checkpoint holds, and resuming, over
``xax.checkpoint`` (asynchronous, atomic, checksummed, restorable under any mesh, never pickled)."""

import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from etils import epath
from jax.sharding import Mesh
from jaxtyping import PyTree
from typing_extensions import override

from xax.checkpoint import (
    CheckpointManager,
    CheckpointOptions,
    Rename,
    check_options,
    checkpoint_metadata,
    config_drift,
    legacy_renames,
    resolve_checkpoint,
    restore_checkpoint,
    restore_latest,
    warm_start_weights,
)
from xax.checkpoint.restore import RestoredCheckpoint
from xax.core.config import field
from xax.core.config_io import config_to_dict
from xax.core.state import State
from xax.data.cursor import Cursor
from xax.task.base import BaseConfig, BaseTask
from xax.task.mixins.artifacts import GitState
from xax.utils.storage import check_location

logger = logging.getLogger(__name__)


@dataclass
class CheckpointingConfig(BaseConfig):
    checkpoint: CheckpointOptions = field(CheckpointOptions(), help="Checkpoint options")
    resume: str | None = field(
        None, help="'auto': continue the newest complete checkpoint of the run directory; or a checkpoint path"
    )
    warm_start: str | None = field(
        None, help="Initialize the model weights from this checkpoint (weights only: new optimizer, counters, data)"
    )


Config = TypeVar("Config", bound=CheckpointingConfig)


@dataclass(frozen=True)
class Restored:
    """What a training checkpoint gives back besides the arrays."""

    step: int
    path: epath.Path
    state: State
    cursor: Cursor
    metadata: dict[str, Any]


class CheckpointingMixin(BaseTask[Config], Generic[Config]):
    """Saves and restores the training state: every array of the model, optimizer state, EMA,
    PRNG key, State, data cursor, the resolved config, library version, git commit and mesh."""

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)
        run_storage: epath.Path

        def upload_run_files(self) -> None: ...

        def git_state(self) -> GitState | None: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._checkpoints: CheckpointManager | None = None
        self._last_save = (0, time.monotonic())
        # Set by the training loop after each validation pass: the averages, and the step they were
        # measured at. A checkpoint is ranked (keep_best) only by the metrics of its own step.
        self.last_valid_metrics: dict[str, float] = {}
        self.last_valid_step: int | None = None

    @override
    def validate_config(self) -> None:
        super().validate_config()
        check_options(self.config.checkpoint, "checkpoint")
        for key in ("resume", "warm_start"):
            location = getattr(self.config, key)
            if location is not None and location != "auto":
                check_location(location, key)

    @property
    def checkpoint_dir(self) -> epath.Path:
        """``<run_storage>/checkpoints``: a local folder, or a folder in an object store."""
        return self.run_storage / "checkpoints"

    def checkpoint_manager(self) -> CheckpointManager:
        """The manager of this run's checkpoints (``run_storage/checkpoints``), made on first use."""
        if self._checkpoints is None:
            self._checkpoints = CheckpointManager(self.checkpoint_dir, self.config.checkpoint)
        return self._checkpoints

    def prewarm_checkpoints(self, tree: PyTree) -> None:
        """Starts, beside the step's compilation, the once-per-process work of a first save of ``tree``
        (``CheckpointManager.prewarm``), so that the first save blocks training no longer than later ones."""
        self.checkpoint_manager().prewarm(tree)

    def checkpoint_is_due(self, state: State) -> bool:
        options = self.config.checkpoint
        last_step, last_time = self._last_save
        if options.every_n_steps is not None and state.num_steps - last_step >= options.every_n_steps:
            return True
        seconds = options.every_n_seconds
        return seconds is not None and time.monotonic() - last_time >= seconds

    def valid_metrics_of(self, step: int) -> dict[str, float]:
        """The validation metrics measured at ``step`` (empty when validation did not run there)."""
        if self.last_valid_step != step:
            return {}
        return {name: float(value) for name, value in self.last_valid_metrics.items()}

    def checkpoint_metadata(self, state: State, cursor: Cursor, mesh: Mesh | None) -> dict[str, Any]:
        git = self.git_state()
        return checkpoint_metadata(
            state,
            cursor.to_dict(),
            config_to_dict(self.config),
            mesh,
            git_commit=git.commit if git is not None else None,
            valid_metrics=self.valid_metrics_of(state.num_steps),
        )

    def save_checkpoint(
        self, tree: PyTree, state: State, cursor: Cursor, mesh: Mesh | None = None, *, wait: bool = False
    ) -> epath.Path:
        """Starts writing a checkpoint of ``tree`` at ``state.num_steps`` (returns once the arrays
        are copied off the devices; ``wait`` also waits for the write). Atomic: a reader never sees
        a partial checkpoint.

        Raises:
            CheckpointWriteError: When this write, or the previous one still running in the
                background, failed (a full disk); the older checkpoints are kept.
        """
        manager = self.checkpoint_manager()
        step = int(state.num_steps)
        metadata = functools.partial(self.checkpoint_metadata, state, cursor, mesh)
        path = manager.save(step, tree, metadata, metrics=self.valid_metrics_of(step))
        self._last_save = (step, time.monotonic())
        self.upload_run_files()  # the logs up to this checkpoint, for a run stored at a URL
        if wait:
            manager.wait()
        self.note_progress(f"the checkpoint of step {step}")
        return path

    def wait_for_checkpoint(self) -> None:
        """Blocks until any checkpoint being written is complete.

        Raises:
            CheckpointWriteError: When the write failed; the older checkpoints are kept.
        """
        if self._checkpoints is not None:
            self._checkpoints.wait()

    def latest_checkpoint(self, before_step: int | None = None) -> epath.Path | None:
        """The newest complete checkpoint (of a step below ``before_step``, if given), or None."""
        return self.checkpoint_manager().latest(before_step)

    def discard_checkpoints_after(self, step: int) -> list[int]:
        """Deletes the checkpoints of steps after ``step`` (those of a trajectory training left, as
        on a rewind, which would otherwise stand in for the new one's); returns their steps."""
        return self.checkpoint_manager().discard_after(step)

    def restore_training(self, target: PyTree) -> tuple[PyTree, Restored] | None:
        """Restores per ``resume``: None to start afresh, 'auto' for the newest readable checkpoint
        of this run (falling back past unreadable ones, and saying so), or a path."""
        resume = self.config.resume
        if resume is None:
            return None
        if resume == "auto":
            restored = self.restore_latest(target)
            if restored is None:
                logger.info("resume=auto: no checkpoint in %s yet; starting afresh", self.checkpoint_dir)
                return None
        else:
            directory, steps = resolve_checkpoint(resume)
            config = config_to_dict(self.config)
            renames = self.legacy_param_names(target)
            restored = self._restored(
                restore_checkpoint(directory, steps, target, fall_back=False, config=config, renames=renames)
            )
        info = restored[1]
        drift = config_drift(info.metadata.get("config", {}), config_to_dict(self.config))
        changed = f"; config changed since: {'; '.join(drift)}" if drift else ""
        logger.info("resumed from step %d of %s%s", info.state.num_steps, info.path.parent, changed)
        return restored

    def restore_latest(self, target: PyTree, before_step: int | None = None) -> tuple[PyTree, Restored] | None:
        """The newest readable checkpoint of this run (of a step below ``before_step``, if given), or
        None when there is none."""
        restored = restore_latest(
            self.checkpoint_dir,
            target,
            before_step=before_step,
            config=config_to_dict(self.config),
            manager=self._checkpoints,
            renames=self.legacy_param_names(target),
        )
        return None if restored is None else self._restored(restored)

    def _restored(self, restored: RestoredCheckpoint) -> tuple[PyTree, Restored]:
        """The training record of a restored checkpoint; the save and validation cadences continue from it."""
        metadata = restored.metadata
        state = State.from_dict(metadata["state"])
        self._last_save = (state.num_steps, time.monotonic())
        self.last_valid_metrics = dict(metadata.get("valid_metrics") or {})
        self.last_valid_step = state.num_steps if self.last_valid_metrics else None
        cursor = Cursor.from_dict(metadata["cursor"])
        return restored.tree, Restored(restored.step, restored.path, state, cursor, metadata)

    def warm_start_params(self, params: PyTree) -> PyTree:
        """Copies the model weights of ``warm_start`` into ``params`` where the paths match (a
        backbone into a model with a new head); a shape mismatch names the parameter."""
        path = self.config.warm_start
        return params if path is None else warm_start_weights(params, path, self.legacy_param_names(params))

    def legacy_param_names(self, tree: PyTree) -> tuple[Rename, ...]:
        """How the arrays of ``tree`` were once named, so that checkpoints written before a rename
        still restore: those its modules declare (``LEGACY_PARAM_NAMES``, as DiT and the SSM model
        do). Override to add a task's own."""
        return legacy_renames(tree)

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            try:
                self.wait_for_checkpoint()
            finally:
                if self._checkpoints is not None:
                    self._checkpoints.close()
