"""Checkpoints on orbax: asynchronous, atomic, restorable under any mesh, never pickled."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from jaxtyping import PyTree
from orbax.checkpoint import checkpoint_managers
from typing_extensions import override

from xax.core.config import config_to_dict, field
from xax.core.errors import CheckpointError, ConfigError
from xax.core.state import State
from xax.task.mixins.artifacts import ArtifactsConfig, ArtifactsMixin, read_git_state
from xax.task.mixins.data_loader import Cursor

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
BEST_MODES = ("min", "max")


@dataclass
class CheckpointOptions:
    every_n_steps: int | None = field(1000, help="Save every N steps (None: only by time, at the end and on signals)")
    every_n_seconds: float | None = field(None, help="Save every N seconds")
    keep_last: int = field(3, help="Keep the newest K checkpoints")
    keep_best: int = field(0, help="Also keep the best K checkpoints by `checkpoint.best_metric`")
    best_metric: str = field("loss", help="Validation metric that ranks checkpoints for keep_best")
    best_mode: str = field("min", help="'min' or 'max': which end of best_metric is best")
    async_save: bool = field(True, help="Write in the background while training goes on")


@dataclass
class CheckpointingConfig(ArtifactsConfig):
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
    """What a checkpoint gives back besides the arrays."""

    step: int
    path: Path
    state: State
    cursor: Cursor
    metadata: dict[str, Any]


def abstract_like(tree: PyTree) -> PyTree:
    """Shapes, dtypes and shardings of ``tree``: the target a checkpoint is restored into, so it
    lands on the current mesh whatever mesh it was saved under."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _manager(directory: Path, options: CheckpointOptions, *, read_only: bool = False) -> ocp.CheckpointManager:
    policies: list[Any] = [checkpoint_managers.LatestN(n=options.keep_last)]
    if options.keep_best > 0:
        metric, descending = options.best_metric, options.best_mode == "min"
        policies.append(
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[metric],
                reverse=descending,  # BestN keeps the last n after sorting: the smallest when descending
                n=options.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    manager_options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=options.async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(directory, options=manager_options, item_names=("state", "meta"))


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, in numeric order (never by string)."""
    if not directory.is_dir():
        return []
    return sorted(
        int(path.name) for path in directory.iterdir() if path.is_dir() and path.name.isdigit() and _complete(path)
    )


def _complete(step_dir: Path) -> bool:
    # orbax renames a finished checkpoint from a temporary name into place; both items exist then.
    return (step_dir / "state").is_dir() and (step_dir / "meta").is_dir()


def resolve_checkpoint(path: Path) -> tuple[Path, list[int]]:
    """Splits a user-given path into (checkpoints directory, candidate steps, newest first).

    Accepts a step directory, a checkpoints directory, or a run directory holding ``checkpoints``.
    """
    path = path.expanduser().resolve()
    if path.name.isdigit() and path.is_dir():
        return path.parent, [int(path.name)]
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory}; pass a run directory or a checkpoint path")
    return directory, steps[::-1]


def load_checkpoint(directory: Path, step: int, target: PyTree | None) -> tuple[PyTree, dict[str, Any]]:
    """Reads one checkpoint: the arrays (into ``target``'s shapes and shardings) and the metadata.

    Raises:
        CheckpointError: Naming the file when the checkpoint is missing, truncated or corrupt.
    """
    step_dir = directory / str(step)
    manager = _manager(directory, CheckpointOptions(), read_only=True)
    try:
        state_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        restored = manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    except Exception as error:
        raise CheckpointError(f"checkpoint {step_dir} is unreadable ({type(error).__name__}: {error})") from error
    finally:
        manager.close()
    return restored["state"], dict(restored["meta"])


def _key_name(key: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """Leaves by dotted path. A checkpoint read without a target comes back as nested dicts, the
    model as modules and named tuples; their paths agree once spelled as names."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {".".join(_key_name(key) for key in path): leaf for path, leaf in flat if leaf is not None}


def saved_array_metadata(directory: Path, step: int) -> PyTree:
    """The saved arrays' shapes and dtypes (no data read), as nested dicts."""
    try:
        return ocp.StandardCheckpointer().metadata(directory / str(step) / "state").item_metadata
    except Exception as error:
        raise CheckpointError(f"checkpoint {directory / str(step) / 'state'} is unreadable ({error})") from error


def load_arrays_anywhere(directory: Path, step: int, sharding: jax.sharding.Sharding) -> PyTree:
    """Every saved array, placed with ``sharding`` (e.g. one device), whatever mesh saved them:
    for reading a checkpoint without the model that wrote it."""
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding),
        saved_array_metadata(directory, step),
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )
    tree, _ = load_checkpoint(directory, step, target)
    return tree


def restore_weights(template: PyTree, directory: Path, step: int, *, prefer_ema: bool = True) -> PyTree:
    """``template`` with its floating-point arrays replaced by those saved in a training checkpoint.

    For using a trained model outside training (sampling, evaluation), on this process's first
    device (each process of a multi-process job reads its own copy), whatever mesh saved it.

    Args:
        template: A model of the same configuration as the saved one (its weights are not used).
        directory: The checkpoints folder (see ``resolve_checkpoint``).
        step: The step to read.
        prefer_ema: Take the moving average of the weights when the checkpoint kept one.

    Raises:
        CheckpointError: If a parameter of ``template`` is missing from the checkpoint or has another shape.
    """
    tree = load_arrays_anywhere(directory, step, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    weights = tree["ema"] if prefer_ema and tree.get("ema") is not None else tree["params"]
    arrays, static = eqx.partition(template, eqx.is_inexact_array)
    check_shapes(arrays, weights, directory / str(step))
    found, wanted = named_leaves(weights), named_leaves(arrays)
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        raise CheckpointError(f"{directory / str(step)} has no {missing[0]}; it holds a different model")
    leaves = [jnp.asarray(found[name], dtype=leaf.dtype) for name, leaf in wanted.items()]
    return eqx.combine(jax.tree.unflatten(jax.tree.structure(arrays), leaves), static)


def read_metadata(directory: Path, step: int) -> dict[str, Any]:
    """A checkpoint's JSON metadata alone (counters, cursor, config, versions, mesh)."""
    manager = _manager(directory, CheckpointOptions(), read_only=True)
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as error:
        raise CheckpointError(f"checkpoint {directory / str(step)} is unreadable ({error})") from error
    finally:
        manager.close()


def check_shapes(target: PyTree, saved: PyTree, source: Path) -> None:
    """Raises if a saved array's shape differs from the model's, naming the parameter path."""
    saved_leaves = named_leaves(saved)
    for name, leaf in named_leaves(target).items():
        if name in saved_leaves and tuple(saved_leaves[name].shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"parameter {name} has shape {tuple(leaf.shape)} in the model but "
                f"{tuple(saved_leaves[name].shape)} in {source}; change the config back or restore partially"
            )


class CheckpointingMixin(ArtifactsMixin[Config], Generic[Config]):
    """Saves and restores the training state: every array of the model, optimizer state, EMA,
    PRNG key, State, data cursor, the resolved config, library version, git commit and mesh."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        options = config.checkpoint
        if options.best_mode not in BEST_MODES:
            raise ConfigError(f"checkpoint.best_mode={options.best_mode!r} is not one of {BEST_MODES}")
        if options.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={options.keep_last} must be at least 1")
        self._checkpoints: ocp.CheckpointManager | None = None
        self._last_save = (0, time.monotonic())
        self.last_valid_metrics: dict[str, float] = {}

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        if self._checkpoints is None:
            self._checkpoints = _manager(self.checkpoint_dir, self.config.checkpoint)
        return self._checkpoints

    def checkpoint_is_due(self, state: State) -> bool:
        options = self.config.checkpoint
        last_step, last_time = self._last_save
        if options.every_n_steps is not None and state.num_steps - last_step >= options.every_n_steps:
            return True
        seconds = options.every_n_seconds
        return seconds is not None and time.monotonic() - last_time >= seconds

    def checkpoint_metadata(self, state: State, cursor: Cursor, mesh: Mesh | None) -> dict[str, Any]:
        from xax import __version__

        git = read_git_state()
        return {
            "format": CHECKPOINT_FORMAT,
            "state": state.to_dict(),
            "cursor": cursor.to_dict(),
            "config": config_to_dict(self.config),
            "xax_version": __version__,
            "git_commit": git.commit if git is not None else None,
            "mesh": {"axis_names": list(mesh.axis_names), "shape": list(mesh.devices.shape)} if mesh else None,
            "valid_metrics": self.last_valid_metrics,
        }

    def save_checkpoint(
        self, tree: PyTree, state: State, cursor: Cursor, mesh: Mesh | None = None, *, wait: bool = False
    ) -> Path:
        """Starts writing a checkpoint of ``tree`` at ``state.num_steps`` (returns once the arrays
        are copied off the devices; ``wait`` also waits for the write). Atomic: a reader never sees
        a partial checkpoint."""
        manager = self.checkpoint_manager()
        step = int(state.num_steps)
        metrics = self.last_valid_metrics if self.config.checkpoint.best_metric in self.last_valid_metrics else None
        if step not in manager.all_steps():
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree),
                    meta=ocp.args.JsonSave(self.checkpoint_metadata(state, cursor, mesh)),
                ),
                metrics=metrics,
                force=True,
            )
        self._last_save = (step, time.monotonic())
        if wait:
            self.wait_for_checkpoint()
        return self.checkpoint_dir / str(step)

    def wait_for_checkpoint(self) -> None:
        """Blocks until any checkpoint being written is complete; raises if the write failed."""
        if self._checkpoints is None:
            return
        try:
            self._checkpoints.wait_until_finished()
            self._checkpoints.check_for_errors()
        except Exception as error:
            raise CheckpointError(
                f"writing a checkpoint under {self.checkpoint_dir} failed ({type(error).__name__}: {error}); "
                "the previous checkpoints are intact"
            ) from error

    def latest_checkpoint(self, before_step: int | None = None) -> Path | None:
        """The newest complete checkpoint (of a step below ``before_step``, if given), or None."""
        steps = self._steps_before(before_step)
        return self.checkpoint_dir / str(steps[-1]) if steps else None

    def _steps_before(self, before_step: int | None) -> list[int]:
        steps = checkpoint_steps(self.checkpoint_dir)
        return steps if before_step is None else [step for step in steps if step < before_step]

    def discard_checkpoints_after(self, step: int) -> list[int]:
        """Deletes the checkpoints of steps after ``step`` (those of a trajectory training left, as
        on a rewind, which would otherwise stand in for the new one's); returns their steps."""
        self.wait_for_checkpoint()
        manager = self.checkpoint_manager()
        later = sorted(saved for saved in manager.all_steps() if saved > step)
        for saved in later:
            manager.delete(saved)  # every process calls it: orbax waits for all of them
        return later

    def restore_training(self, target: PyTree) -> tuple[PyTree, Restored] | None:
        """Restores per ``resume``: None to start afresh, 'auto' for the newest readable checkpoint
        of this run (falling back past unreadable ones, and saying so), or a path."""
        resume = self.config.resume
        if resume is None:
            return None
        if resume == "auto":
            restored = self.restore_latest(target)
            if restored is None:
                logger.info("resume=auto: no checkpoint in %s yet, starting afresh", self.checkpoint_dir)
            return restored
        directory, steps = resolve_checkpoint(Path(resume))
        return self._restore_first_readable(directory, steps, target, fall_back=False)

    def restore_latest(self, target: PyTree, before_step: int | None = None) -> tuple[PyTree, Restored] | None:
        """The newest readable checkpoint of this run (of a step below ``before_step``, if given), or
        None when there is none."""
        steps = self._steps_before(before_step)[::-1]
        if not steps:
            return None
        return self._restore_first_readable(self.checkpoint_dir, steps, target, fall_back=True)

    def _restore_first_readable(
        self, directory: Path, steps: list[int], target: PyTree, *, fall_back: bool
    ) -> tuple[PyTree, Restored]:
        errors = []
        for step in steps:
            try:
                tree, metadata = self._load_matching(directory, step, target)
            except CheckpointError as error:
                if not fall_back or step == steps[-1]:
                    raise
                errors.append(str(error))
                logger.warning("%s; falling back to the previous checkpoint", error)
                continue
            self._report_drift(metadata.get("config", {}))
            state = State.from_dict(metadata["state"])
            self._last_save = (state.num_steps, time.monotonic())
            self.last_valid_metrics = dict(metadata.get("valid_metrics", {}))
            cursor = Cursor.from_dict(metadata["cursor"])
            return tree, Restored(step, directory / str(step), state, cursor, metadata)
        raise CheckpointError("; ".join(errors))

    def _load_matching(self, directory: Path, step: int, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
        # Read the saved shapes first so a mismatch names the parameter, not an orbax internal.
        saved = saved_array_metadata(directory, step)
        if saved is not None:
            try:
                check_shapes(target, saved, directory / str(step))
            except CheckpointError as error:
                drift = self._config_drift(read_metadata(directory, step).get("config", {}))
                detail = f"; config changed since it was saved: {'; '.join(drift)}" if drift else ""
                raise CheckpointError(f"{error}{detail}") from None
        return load_checkpoint(directory, step, abstract_like(target))

    def _config_drift(self, saved_config: dict[str, Any]) -> list[str]:
        """``key: saved -> current`` for every config value that differs from the checkpoint's."""
        current = flatten_dict(config_to_dict(self.config))
        saved = flatten_dict(saved_config)
        return [
            f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(current) | set(saved))
            if current.get(key) != saved.get(key) and key not in ("resume", "warm_start")
        ]

    def _report_drift(self, saved_config: dict[str, Any]) -> None:
        """Prints which config values differ from the checkpoint's."""
        changed = self._config_drift(saved_config)
        if changed:
            logger.warning("Config changed since the checkpoint: %s", "; ".join(changed))

    def warm_start_params(self, params: PyTree) -> PyTree:
        """Copies the model weights of ``warm_start`` into ``params`` where the paths match (a
        backbone into a model with a new head); a shape mismatch names the parameter."""
        path = self.config.warm_start
        if path is None:
            return params
        directory, steps = resolve_checkpoint(Path(path))
        # Read onto one device, then place each array with its own parameter's sharding (a plan's
        # shardings differ from leaf to leaf, in rank too).
        tree = load_arrays_anywhere(directory, steps[0], jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        saved = named_leaves(tree["params"])
        check_shapes(params, tree["params"], directory / str(steps[0]))
        loaded = 0

        def take(key_path: Any, leaf: jax.Array) -> jax.Array:
            nonlocal loaded
            name = ".".join(_key_name(key) for key in key_path)
            if name in saved:
                loaded += 1
                return jax.device_put(np.asarray(saved[name], dtype=leaf.dtype), leaf.sharding)
            return leaf

        result = jax.tree_util.tree_map_with_path(take, params)
        logger.info("Warm start: %d of %d arrays from %s", loaded, len(jax.tree.leaves(params)), directory)
        return result

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            if self._checkpoints is not None:
                try:
                    self.wait_for_checkpoint()
                finally:
                    self._checkpoints.close()
                    self._checkpoints = None


def flatten_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}`` (an empty dict stays a value, so it can be compared)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
