"""The training loop: one jitted, buffer-donating step per batch, and the metric hand-off.

The loop is one mixin among those ``xax/task/task.py`` composes: it calls the train state's set-up
(``TrainSetupMixin``), validation and media (``ValidationMixin``), the non-finite policy
(``NonfiniteMixin``), and the data, logging, checkpointing, sharding and perf mixins.
"""

import collections
import logging
import signal
import time
import typing
from abc import abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, PRNGKeyArray, PyTree
from typing_extensions import override

from xax.checkpoint import CheckpointOptions, abstract_like, named_leaves
from xax.core.config import check_range, field
from xax.core.errors import CheckpointWriteError, ConfigError, TrainingStopped
from xax.core.health import Health
from xax.core.metric import Metric
from xax.core.state import Phase, State
from xax.data.cursor import Cursor
from xax.data.feeds import Feed, PrefetchFeed, ResidentFeed, resident_bytes
from xax.data.prefetch import DevicePrefetcher
from xax.data.sources import BatchSource, MapBatchSource
from xax.nn.precision import COMPUTE_DTYPES
from xax.parallel import ParallelOptions, PlanReport, check_batch_size
from xax.task.base import BaseConfig, BaseTask
from xax.task.launchers.base import refuse_timed
from xax.task.mixins.compile import CompileOptions
from xax.task.mixins.data_loader import DataOptions
from xax.task.mixins.logger import LogItem, LogOptions, RateWindow
from xax.task.mixins.process import Closeable
from xax.task.mixins.runnable import EXIT_INTERRUPTED
from xax.task.mixins.train_step import TrainState, empty_sums, zero_sums_fn

if TYPE_CHECKING:
    from xax.task.mixins.nonfinite import Rewind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitParams:
    """What ``get_model`` receives: the PRNG key to initialize the weights with."""

    key: PRNGKeyArray


@dataclass
class PrecisionOptions:
    compute_dtype: str = field(
        "float32", help="dtype of the forward and backward pass (float32, bfloat16, float16); weights stay float32"
    )


@dataclass
class EMAOptions:
    decay: float | None = field(None, help="Keep a moving average of the weights with this decay (e.g. 0.999)")
    use_for_valid: bool = field(True, help="Validate with the moving average when it is on")


@dataclass
class TrainConfig(BaseConfig):
    seed: int = field(0, help="Seed for weights, data order and every random draw in the step")
    max_steps: int | None = field(None, help="Stop after this many optimizer steps")
    max_samples: int | None = field(None, help="Stop after this many training samples")
    max_epochs: int | None = field(None, help="Stop after this many passes over the training data")
    max_seconds: float | None = field(None, help="Stop after this many seconds of training")
    valid_every_n_steps: int | None = field(500, help="Validate every N steps (None: only by time)")
    valid_every_n_seconds: float | None = field(None, help="Validate every N seconds (None: only by steps)")
    grad_accum_steps: int = field(1, help="Split each batch into this many micro-batches and sum their gradients")
    max_grad_norm: float | None = field(None, help="Clip gradients to this global norm (None: no clipping)")
    max_inflight_steps: int = field(3, help="How many steps the host may dispatch ahead of the device")
    precision: PrecisionOptions = field(PrecisionOptions(), help="Mixed-precision policy")
    ema: EMAOptions = field(EMAOptions(), help="Exponential moving average of the weights")


Config = TypeVar("Config", bound=TrainConfig)


@runtime_checkable
class ComposedConfig(Protocol):
    """The options of other config groups that the training mixins read; ``xax.Config`` composes
    them with ``TrainConfig`` (xax/task/task.py)."""

    batch_size: int
    data: DataOptions
    checkpoint: CheckpointOptions
    warm_start: str | None
    parallel: ParallelOptions
    log: LogOptions
    compile: CompileOptions


def composed(config: TrainConfig) -> ComposedConfig:
    """``config`` seen with the other groups the training mixins read (every task config has them)."""
    return typing.cast(ComposedConfig, config)


class TrainMixin(BaseTask[Config], Generic[Config]):
    """Trains a model: the user supplies the model, optimizer and loss; this supplies the loop."""

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)
        stop_signal: int | None
        save_requested: bool
        last_valid_step: int | None
        _static: PyTree
        _state_shardings: TrainState | None
        _last_save: tuple[int, float]
        grad_leaf_names: list[str]

        def full_optimizer(self) -> optax.GradientTransformation: ...
        def init_train_state(self, optimizer: optax.GradientTransformation) -> tuple[TrainState, PyTree]: ...
        def resume_or_start(self, ts: TrainState) -> tuple[TrainState, State, Cursor | None]: ...
        def build_steps(
            self, optimizer: optax.GradientTransformation, static: PyTree, treedef: jax.tree_util.PyTreeDef
        ) -> dict[bool, Any]: ...
        def _plan_report(self, ts: TrainState, train_step: Any | None) -> PlanReport: ...
        def validate(self, ts: TrainState, state: State) -> None: ...
        def valid_is_due(self, state: State) -> bool: ...
        def between_steps(self, ts: TrainState, state: State, over: bool) -> State: ...
        def act_on_nonfinite(self, health: Health) -> "Rewind | None": ...
        def check_rewind_budget(self, rewind: "Rewind", rewinds: int, skipped: set[Cursor]) -> None: ...
        def rewind_to(self, template: PyTree, rewind: "Rewind") -> tuple[TrainState, State, Cursor]: ...
        def remember_position(self, step: int, position: Cursor) -> None: ...
        def clear_positions(self) -> None: ...
        def _forget_positions(self) -> None: ...
        def _take_alert(self) -> Health | None: ...
        def get_mesh(self) -> Mesh: ...
        def replicated_sharding(self) -> NamedSharding: ...
        def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Array]: ...
        def get_batch_source(self, phase: Phase, *, seed: int) -> BatchSource: ...
        def add_worker(self, worker: Closeable) -> None: ...
        def step_context(self, name: str) -> AbstractContextManager[None]: ...
        def pop_section_times(self) -> dict[str, float]: ...
        def analyze_train_step(self, step: Any, *args: Any, dtype: jnp.dtype) -> None: ...
        def record_train_step(self, step: Any, *args: Any, start_step: int) -> None: ...
        def perf_after_step(self, step: int, loss: jax.Array) -> None: ...
        def perf_metrics(self, steps_per_second: float) -> dict[str, float]: ...
        def light_log_is_due(self, state: State) -> bool: ...
        def heavy_log_is_due(self, state: State) -> bool: ...
        def log_item(self, item: LogItem) -> None: ...
        def flush_logs(self) -> None: ...
        def checkpoint_is_due(self, state: State) -> bool: ...
        def save_checkpoint(
            self, tree: PyTree, state: State, cursor: Cursor, mesh: Mesh | None = None, *, wait: bool = False
        ) -> epath.Path: ...
        def announce_start(self, params: PyTree) -> None: ...
        def announce_end(self, state: State, last_checkpoint: epath.Path | None) -> None: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.final_train_state: TrainState | None = None
        self.train_feed: Feed | None = None
        # (treedef, leaves, State, cursor) after the newest step: what is saved if the task fails.
        self._last_completed: tuple[Any, list[Array], State, Cursor] | None = None
        self._last_checkpoint: epath.Path | None = None
        # Known once the training data is open (for the progress of a max_epochs run).
        self._batches_per_epoch: int | None = None
        self._compiled = False

    @abstractmethod
    def get_model(self, params: InitParams) -> PyTree:
        """Builds the model (an Equinox module or any pytree of arrays) from a PRNG key."""

    @abstractmethod
    def get_optimizer(self) -> optax.GradientTransformation:
        """The optax optimizer; learning-rate schedules go inside it as usual."""

    @abstractmethod
    def compute_loss_and_metrics(
        self, model: PyTree, batch: PyTree, state: State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, Metric]]:
        """Runs inside the jitted step: the scalar loss to minimize and Scalar metrics to average."""

    # ---- set-up ----------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype the model computes in (cast inputs to it in ``get_output``)."""
        return jnp.dtype(COMPUTE_DTYPES[self.config.precision.compute_dtype])

    @override
    def validate_config(self) -> None:
        """Checks values the type system cannot, before anything is created or compiled."""
        super().validate_config()
        config = self.config
        if config.precision.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"precision.compute_dtype={config.precision.compute_dtype!r} is not one of {sorted(COMPUTE_DTYPES)}"
            )
        for key in ("max_steps", "max_samples", "max_epochs", "max_seconds", "valid_every_n_steps"):
            value = getattr(config, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}={value} must be positive (or None)")
        if config.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps={config.grad_accum_steps} must be at least 1")
        if config.ema.decay is not None and not 0.0 <= config.ema.decay < 1.0:
            raise ConfigError(f"ema.decay={config.ema.decay} must be in [0, 1)")
        check_range("max_grad_norm", config.max_grad_norm, minimum=0.0, inclusive=False, unset="no clipping")
        check_range("valid_every_n_seconds", config.valid_every_n_seconds, minimum=0.0, inclusive=False)
        check_range("max_inflight_steps", config.max_inflight_steps, minimum=0)
        options = composed(config).checkpoint
        check_range("checkpoint.every_n_steps", options.every_n_steps, minimum=1, unset="save by time only")
        check_range("checkpoint.every_n_seconds", options.every_n_seconds, minimum=0.0, inclusive=False)
        check_range("checkpoint.keep_best", options.keep_best, minimum=0)
        if self.placement is not None and self.placement.lockstep:
            refuse_timed("max_seconds", config.max_seconds, "max_steps")
            refuse_timed("valid_every_n_seconds", config.valid_every_n_seconds, "valid_every_n_steps")
            refuse_timed("checkpoint.every_n_seconds", options.every_n_seconds, "checkpoint.every_n_steps")
        check_batch_size(composed(config).batch_size, config.grad_accum_steps, self.get_mesh())

    @override
    def expected_total_steps(self) -> int | None:
        """The step training stops at, by ``max_steps``, ``max_samples`` and (once the training
        data is open) ``max_epochs``; None when only time limits it."""
        config = self.config
        limits = [config.max_steps]
        if config.max_samples is not None:
            limits.append(-(-config.max_samples // composed(config).batch_size))
        if config.max_epochs is not None and self._batches_per_epoch is not None:
            limits.append(config.max_epochs * self._batches_per_epoch)
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

    @override
    def expected_total_seconds(self) -> float | None:
        return self.config.max_seconds

    def tokens_per_sample(self) -> int | None:
        """Tokens in one training sample (a sequence's length), for the tokens/s rate; None for a
        task without tokens."""
        return None

    # ---- the loop --------------------------------------------------------------------------

    def is_training_over(self, state: State) -> bool:
        config = self.config
        return (
            (config.max_steps is not None and state.num_steps >= config.max_steps)
            or (config.max_samples is not None and state.num_samples >= config.max_samples)
            or (config.max_epochs is not None and state.epoch >= config.max_epochs)
            or (config.max_seconds is not None and state.elapsed_time_s >= config.max_seconds)
        )

    def run(self) -> State:
        """Trains until a limit is reached; returns the final state."""
        return self.train()

    def train(self) -> State:
        optimizer = self.full_optimizer()
        ts, static = self.init_train_state(optimizer)
        self._static = static
        self.announce_start((ts.params, ts.frozen))
        template = abstract_like(ts)
        self.grad_leaf_names = list(named_leaves(ts.params))
        ts, state, cursor = self.resume_or_start(ts)
        treedef = jax.tree.structure(ts)
        train_steps = self.build_steps(optimizer, static, treedef)
        if composed(self.config).parallel.report:
            logger.info("%s", "\n".join(self._plan_report(ts, train_steps[False]).lines()))
        # Data positions (the cursor before the batch) of batches that gave non-finite steps: skipped
        # whenever a rewound run reaches them again, however the steps are numbered by then.
        skipped: set[Cursor] = set()
        rewinds = 0
        while True:
            try:
                state, rewind = self._train_loop(train_steps, treedef, ts, state, cursor, skipped)
            except (TrainingStopped, CheckpointWriteError):
                raise  # saved already, or saving is what failed
            except Exception:
                # A bug in the task's own code (a media hook, a data source) mid-run: keep the work
                # done so far, then let the error surface as usual.
                self._save_after_error()
                raise
            if rewind is None:
                self.announce_end(state, self._last_checkpoint)
                return state
            rewinds += 1
            self.check_rewind_budget(rewind, rewinds, skipped)
            ts, state, cursor = self.rewind_to(template, rewind)
            self.note_progress(f"the rewind to step {state.num_steps}")
            if rewind.position is not None:
                skipped.add(rewind.position)

    def training_position(self) -> tuple[State, Cursor] | None:
        """Where training stands: the State after the newest completed step of this run and the
        data position of the batch after it; None before the first step. Safe to read from any thread."""
        done = self._last_completed
        return None if done is None else (done[2], done[3])

    def _save_after_error(self) -> None:
        """Saves the state after the last completed step, when it is newer than the last checkpoint.
        Only in single-process runs: saving is collective, and the others may not have failed."""
        done = self._last_completed
        if done is None or jax.process_count() > 1 or done[2].num_steps <= self._last_save[0]:
            return
        treedef, leaves, state, cursor = done
        try:
            path = self.save_checkpoint(jax.tree.unflatten(treedef, leaves), state, cursor, self.get_mesh(), wait=True)
        except Exception as error:  # the original error matters more; say why nothing was saved
            logger.error("could not save after the failure at step %d: %s", state.num_steps, error)
            return
        logger.warning("saved %s (step %d) before stopping on the error below", path, state.num_steps)

    def _train_loop(
        self,
        train_steps: dict[bool, Any],
        treedef: jax.tree_util.PyTreeDef,
        ts: TrainState,
        state: State,
        cursor: Cursor | None,
        skipped: set[Cursor],
    ) -> "tuple[State, Rewind | None]":
        """Steps until a limit, or until a non-finite step calls for a rewind (returned, for the
        caller to carry out); ``skipped`` holds the data positions of batches to drop (after a
        rewind); ``train_steps`` holds the step taking indices into resident data (True) or whole
        batches."""
        feed = self.train_feed = self.make_train_feed(cursor)
        self.add_worker(feed)
        train_step = train_steps[feed.data is not None]
        leaves = jax.tree.leaves(ts)
        self.clear_positions()
        self._last_completed = None
        position = feed.cursor
        batch: PyTree | None = next(feed)
        replicated = self.replicated_sharding()
        zero_sums = zero_sums_fn(
            replicated, train_step, leaves, empty_sums(), Health.zeros(), batch, state.pack(), feed.data
        )
        zero_health = jax.jit(Health.zeros, out_shardings=replicated)
        sums, health = zero_sums(), zero_health()
        inflight: collections.deque[Array] = collections.deque()
        max_inflight = self._max_inflight_steps()
        start = time.perf_counter() - state.elapsed_time_s
        first_step = state.num_steps
        window = RateWindow(time.perf_counter(), feed.wait_time_s)
        batch_size = composed(self.config).batch_size
        while not self.is_training_over(state):
            if batch is None:
                position = feed.cursor
                with self.step_context("data"):
                    batch = next(feed)
            if position in skipped:
                logger.warning(
                    "Skipping the batch at epoch %d, batch %d (step %d), which gave a non-finite step",
                    position.epoch,
                    position.index,
                    state.num_steps + 1,
                )
                batch = None
                continue
            self.remember_position(state.num_steps + 1, position)
            if not self._compiled:
                logger.info("compiling the training step ...")
            if state.num_steps == first_step:
                self.analyze_train_step(
                    train_step, leaves, sums, health, batch, state.pack(), feed.data, dtype=self.compute_dtype
                )
                self.record_train_step(
                    train_step, leaves, sums, health, batch, state.pack(), feed.data, start_step=first_step
                )
            leaves, sums, health, loss = train_step(leaves, sums, health, batch, state.pack(), feed.data)
            self.perf_after_step(state.num_steps + 1, loss)
            batch = None
            inflight.append(loss)
            if len(inflight) > max_inflight:
                inflight.popleft().block_until_ready()
            if state.num_steps == first_step:
                loss.block_until_ready()
                window.first_step_s = time.perf_counter() - window.start
                self.restart_cadence_clocks()
                if not self._compiled:
                    logger.info("compiled and ran the first step in %.1f s", window.first_step_s)
                self._compiled = True
            state = State(
                num_steps=state.num_steps + 1,
                num_samples=state.num_samples + batch_size,
                num_valid_steps=state.num_valid_steps,
                elapsed_time_s=time.perf_counter() - start,
                epoch=feed.cursor.epoch,
            )
            window.steps += 1
            self._last_completed = (treedef, leaves, state, feed.cursor)
            self.note_progress(f"training step {state.num_steps}")
            over = self.is_training_over(state)
            if self.light_log_is_due(state) or over:
                host = {
                    **window.close(feed.wait_time_s, batch_size, self.tokens_per_sample()),
                    "epoch": float(state.epoch),
                    **self.pop_section_times(),
                    **self.host_metrics(),
                }
                host.update(self.perf_metrics(host["steps_per_second"]))
                self.log_item(LogItem(state=state, phase="train", sums=sums, health=health, system_scalars=host))
                sums, health = zero_sums(), zero_health()
                window = RateWindow(time.perf_counter(), feed.wait_time_s)
                if over:
                    self.flush_logs()  # so a non-finite last window is seen before the final save
            stop_signal, save_requested, alert = self._requests(state, over)
            if alert is not None:
                rewind = self.act_on_nonfinite(alert)
                if rewind is not None:
                    return state, rewind
            self._forget_positions()
            if self.valid_is_due(state) or self.heavy_log_is_due(state) or over:
                state = self.between_steps(jax.tree.unflatten(treedef, leaves), state, over)
            if over or stop_signal is not None or save_requested or self.checkpoint_is_due(state):
                ts = jax.tree.unflatten(treedef, leaves)
                if self._needs_ranking(state, stop_signal):
                    with self.step_context("valid"):
                        self.validate(ts, state)
                    state = state.replace(num_valid_steps=state.num_valid_steps + 1)
                self._checkpoint_or_stop(ts, state, feed.cursor, over, stop_signal)
        self.flush_logs()
        self.final_train_state = jax.tree.unflatten(treedef, leaves)
        return state, None

    def _needs_ranking(self, state: State, stop_signal: int | None) -> bool:
        """Whether a checkpoint about to be saved needs a validation pass of its own: keep_best ranks
        a checkpoint only by the validation of its step, and the cadences need not line up. Not
        when stopping on a signal, which should be quick."""
        keep_best = composed(self.config).checkpoint.keep_best
        return keep_best > 0 and stop_signal is None and self.last_valid_step != state.num_steps

    def _requests(self, state: State, over: bool) -> tuple[int | None, bool, Health | None]:
        """The stop signal, save request and non-finite alert to act on after this step.

        With one process, whatever has arrived. With several, a signal reaches each process at its
        own step, and the logging threads see a non-finite window at their own times: acting on
        them apart would send one process into a checkpoint or a rewind (collectives) while the
        others run the next step, and all would wait forever. There, the requests are pooled at
        steps every process agrees on (multiples of ``multi_process_sync_steps``, and the last
        step), after each process's logging thread has caught up, and all act on them together.
        """
        if jax.process_count() == 1:
            return self.stop_signal, self.save_requested, self._take_alert()
        every = self.multi_process_sync_steps()
        if not over and state.num_steps % every != 0:
            return None, False, None
        self.flush_logs()  # every process has now seen the same metrics
        mine = np.array([self.stop_signal or 0, int(self.save_requested)], dtype=np.int32)
        pooled = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 2)
        signals = [int(signum) for signum in pooled[:, 0] if signum]
        # SIGINT (exit 130) wins over SIGTERM (exit 0): someone asked to interrupt.
        stop = None if not signals else (signal.SIGINT if signal.SIGINT in signals else signals[0])
        return stop, bool(pooled[:, 1].any()), self._take_alert()

    def multi_process_sync_steps(self) -> int:
        """How often (in steps) processes pool stop, save and non-finite requests: the light-log
        cadence, or every 100 steps when logging is by time only."""
        return composed(self.config).log.every_n_steps or 100

    def _checkpoint_or_stop(
        self, ts: TrainState, state: State, cursor: Cursor, over: bool, stop_signal: int | None
    ) -> None:
        """Saves when due, asked (SIGUSR1) or stopping; on ``stop_signal`` (SIGTERM/SIGINT), saves and stops."""
        stopping = stop_signal is not None
        with self.step_context("checkpoint"):
            path = self.save_checkpoint(ts, state, cursor, self.get_mesh(), wait=over or stopping)
        self._last_checkpoint = path
        logger.info("checkpoint of step %d: %s", state.num_steps, path)
        self.save_requested = False
        if stop_signal is not None and not over:
            self.flush_logs()
            name = signal.Signals(stop_signal).name
            code = 0 if stop_signal == signal.SIGTERM else EXIT_INTERRUPTED
            raise TrainingStopped(f"interrupted by {name} at step {state.num_steps}; saved {path}", code)

    def make_train_feed(self, cursor: Cursor | None = None) -> Feed:
        """Batches for training: indices into a device-resident copy of the data when it is in
        memory and small enough (``data.device_resident_max_mb``), else prefetched batches."""
        source = self.get_batch_source("train", seed=self.config.seed)
        self._batches_per_epoch = source.num_batches_per_epoch
        if cursor is not None:
            source.restore(cursor)
        data = composed(self.config).data
        limit = data.device_resident_max_mb * 2**20
        if isinstance(source, MapBatchSource) and source.arrays is not None and resident_bytes(source) <= limit:
            return ResidentFeed(source, self.replicated_sharding())
        return PrefetchFeed(DevicePrefetcher(source, self.place_batch, data.prefetch))

    def _max_inflight_steps(self) -> int:
        """How many steps may be queued on the devices.

        Simulated CPU devices run each program's collectives on one shared thread pool; with two
        programs in flight their all-reduces can take every thread and wait on each other forever.
        There, each program finishes before the next starts (the host and the "devices" share the
        same cores, so nothing is lost by not overlapping them).
        """
        mesh = self.get_mesh()
        if mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu":
            return 0
        return self.config.max_inflight_steps

    @override
    def on_run_start(self) -> None:
        super().on_run_start()
        self.get_mesh()
