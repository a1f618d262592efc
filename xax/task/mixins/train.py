"""The training loop: one jitted, buffer-donating step, validation, and metric hand-off."""

import collections
import logging
import signal
import sys
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jaxtyping import Array, PRNGKeyArray, PyTree
from typing_extensions import override

from xax.core.config import check_range, field
from xax.core.errors import CheckpointWriteError, ConfigError, TrainingStopped
from xax.core.metric import Metric
from xax.core.state import State
from xax.nn.precision import COMPUTE_DTYPES
from xax.parallel import (
    PlanReport,
    axis_sizes,
    check_batch_size,
    gathered_shardings,
    make_report,
)
from xax.task.feeds import Feed, PrefetchFeed, ResidentFeed, gather_batch, resident_bytes
from xax.task.mixins.checkpointing import CheckpointingConfig, CheckpointingMixin, abstract_like, named_leaves
from xax.task.mixins.compile import CompileConfig, CompileMixin
from xax.task.mixins.data_loader import (
    BatchSource,
    Cursor,
    DataLoaderConfig,
    DataLoaderMixin,
    DevicePrefetcher,
    MapBatchSource,
)
from xax.task.mixins.logger import LoggerConfig, LoggerMixin, LogItem
from xax.task.mixins.perf import PerfConfig, PerfMixin
from xax.task.mixins.runnable import EXIT_FAILURE, EXIT_INTERRUPTED
from xax.task.mixins.sharding import ShardingConfig, ShardingMixin
from xax.task.mixins.step_context import StepContextConfig, StepContextMixin
from xax.task.mixins.train_step import (
    NONFINITE_GRADIENT,
    NONFINITE_UPDATE,
    TrainState,
    empty_sums,
    make_eval_step,
    make_train_step,
)
from xax.utils.pytree import cast_floating

logger = logging.getLogger(__name__)

DATA_AXIS = "data"


class _Rewind(Exception):  # noqa: N818 (control flow, never escapes train())
    def __init__(self, step: int, what: str, position: Cursor | None) -> None:
        super().__init__(what)
        self.step = step
        self.what = what
        self.position = position


class _Window:
    """Host-side rates over one logging window (no device reads)."""

    def __init__(self, start: float, wait_time_s: float) -> None:
        self.start = start
        self.wait_time_s = wait_time_s
        self.steps = 0
        self.first_step_s: float | None = None

    def close(self, wait_time_s: float, batch_size: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        scalars = {
            "steps_per_second": self.steps / seconds,
            "samples_per_second": self.steps * batch_size / seconds,
            "data_wait_fraction": (wait_time_s - self.wait_time_s) / seconds,
        }
        if self.first_step_s is not None:
            scalars["time_to_first_step_s"] = self.first_step_s
        return scalars


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
class TrainConfig(
    LoggerConfig,
    CheckpointingConfig,
    DataLoaderConfig,
    CompileConfig,
    StepContextConfig,
    PerfConfig,
    ShardingConfig,
):
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
    nan: NanOptions = field(NanOptions(), help="What to do about non-finite losses and gradients")


Config = TypeVar("Config", bound=TrainConfig)


def _addressable(leaf: Any) -> Any:
    """``leaf``, or its global value on the host if other processes hold parts of it."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return multihost_utils.process_allgather(leaf, tiled=True)
    return leaf


class TrainMixin(
    DataLoaderMixin[Config],
    LoggerMixin[Config],
    CheckpointingMixin[Config],
    CompileMixin[Config],
    StepContextMixin[Config],
    PerfMixin[Config],
    ShardingMixin[Config],
    Generic[Config],
):
    """Trains a model: the user supplies the model, optimizer and loss; this supplies the loop."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._valid_batches: BatchSource | None = None
        self._valid_zeros: Callable[[], dict[str, Array]] | None = None
        self._valid_cadence_last = (0, time.monotonic())
        self.final_train_state: TrainState | None = None
        self.train_feed: Feed | None = None
        self.nonfinite_alert: dict[str, float] | None = None
        self._grad_leaf_names: list[str] = []
        self._state_shardings: TrainState | None = None
        self.last_valid_step: int | None = None
        # (treedef, leaves, State, cursor) after the newest step: what is saved if the task fails.
        self._last_completed: tuple[Any, list[Array], State, Cursor] | None = None
        self._health_lock = threading.Lock()
        self._health_seen_step = 0
        # The data position of each step's batch, kept until its window is known to be finite.
        self._positions: dict[int, Cursor] = {}

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

    def log_media(self, model: PyTree, batch: PyTree, state: State) -> dict[str, Metric]:
        """Heavy media (images, text) for one validation batch, at the heavy-logging cadence."""
        return {}

    def has_media(self) -> bool:
        """Whether the task logs media at all: a task that does not override the media hook never
        pays for a heavy-logging pass."""
        return type(self).log_media is not TrainMixin.log_media

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
        if config.nan.policy not in NAN_POLICIES:
            raise ConfigError(f"nan.policy={config.nan.policy!r} is not one of {list(NAN_POLICIES)}")
        if config.ema.decay is not None and not 0.0 <= config.ema.decay < 1.0:
            raise ConfigError(f"ema.decay={config.ema.decay} must be in [0, 1)")
        check_range("max_grad_norm", config.max_grad_norm, minimum=0.0, inclusive=False, unset="no clipping")
        check_range("valid_every_n_seconds", config.valid_every_n_seconds, minimum=0.0, inclusive=False)
        check_range("max_inflight_steps", config.max_inflight_steps, minimum=0)
        check_range("nan.max_consecutive", config.nan.max_consecutive, minimum=1)
        check_range("nan.max_rewinds", config.nan.max_rewinds, minimum=0)
        options = config.checkpoint
        check_range("checkpoint.every_n_steps", options.every_n_steps, minimum=1, unset="save by time only")
        check_range("checkpoint.every_n_seconds", options.every_n_seconds, minimum=0.0, inclusive=False)
        check_range("checkpoint.keep_best", options.keep_best, minimum=0)
        check_batch_size(config.batch_size, config.grad_accum_steps, self.get_mesh())

    def full_optimizer(self) -> optax.GradientTransformation:
        """The user's optimizer, behind global-norm clipping when ``max_grad_norm`` is set."""
        optimizer = self.get_optimizer()
        if self.config.max_grad_norm is not None:
            optimizer = optax.chain(optax.clip_by_global_norm(self.config.max_grad_norm), optimizer)
        return optimizer

    def fresh_train_state(self, optimizer: optax.GradientTransformation) -> tuple[TrainState, PyTree]:
        """Builds the model and splits it into the train state's arrays and its structure (unplaced)."""
        model_key, train_key = jax.random.split(jax.random.key(self.config.seed))
        model = self.get_model(InitParams(key=model_key))
        arrays, static = eqx.partition(model, eqx.is_array)
        params, frozen = eqx.partition(arrays, eqx.is_inexact_array)
        params = cast_floating(params, jnp.dtype(jnp.float32))
        # A copy, not the same buffers: both trees are donated to the step.
        ema = jax.tree.map(jnp.copy, params) if self.config.ema.decay is not None else None
        with jax.numpy_dtype_promotion("standard"):  # as in the step: optax relies on it
            opt_state = optimizer.init(params)
        streak = jnp.zeros((), jnp.int32)
        state = TrainState(params, frozen, opt_state, ema, jax.random.key_data(train_key), streak)
        return state, static

    def abstract_train_state(self, optimizer: optax.GradientTransformation) -> tuple[TrainState, PyTree]:
        """The train state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves; nothing is allocated)
        and the model's structure."""
        statics: list[PyTree] = []

        def build() -> TrainState:
            state, static = self.fresh_train_state(optimizer)
            statics.append(static)
            return state

        return jax.eval_shape(build), statics[0]

    def init_train_state(self, optimizer: optax.GradientTransformation) -> tuple[TrainState, PyTree]:
        """Builds the model, splits it into arrays and structure, and places it per the plan: inside
        one jitted program when ``parallel.sharded_init`` (no device ever holds a whole copy), else
        eagerly on one device and then moved."""
        abstract, static = self.abstract_train_state(optimizer)
        shardings = self._state_shardings = self.train_state_shardings(abstract)
        if self.config.parallel.sharded_init:
            state = jax.jit(lambda: self.fresh_train_state(optimizer)[0], out_shardings=shardings)()
        else:
            state = jax.device_put(self.fresh_train_state(optimizer)[0], shardings)
        return state, static

    @override
    def expected_total_steps(self) -> int | None:
        config = self.config
        limits = [config.max_steps]
        if config.max_samples is not None:
            limits.append(-(-config.max_samples // config.batch_size))
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

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
        template = abstract_like(ts)
        self._grad_leaf_names = list(named_leaves(ts.params))
        ts, state, cursor = self.resume_or_start(ts)
        treedef = jax.tree.structure(ts)
        train_steps = self._build_steps(optimizer, static, treedef)
        if self.config.parallel.report:
            logger.info("%s", "\n".join(self._plan_report(ts, train_steps[False]).lines()))
        # Data positions (the cursor before the batch) of batches that gave non-finite steps: skipped
        # whenever a rewound run reaches them again, however the steps are numbered by then.
        skipped: set[Cursor] = set()
        rewinds = 0
        while True:
            try:
                return self._train_loop(train_steps, treedef, ts, state, cursor, skipped)
            except _Rewind as rewind:
                rewinds += 1
                self._check_rewind_budget(rewind, rewinds, skipped)
                ts, state, cursor = self._rewind(template, rewind)
                if rewind.position is not None:
                    skipped.add(rewind.position)
            except (TrainingStopped, CheckpointWriteError):
                raise  # saved already, or saving is what failed
            except Exception:
                # A bug in the task's own code (a media hook, a data source) mid-run: keep the work
                # done so far, then let the error surface as usual.
                self._save_after_error()
                raise

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
            print(f"error: could not save after the failure at step {state.num_steps}: {error}", file=sys.stderr)
            return
        print(f"saved {path} (step {state.num_steps}) before stopping on the error below", file=sys.stderr)

    def _check_rewind_budget(self, rewind: "_Rewind", rewinds: int, skipped: set[Cursor]) -> None:
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

    def _train_loop(
        self,
        train_steps: dict[bool, Any],
        treedef: jax.tree_util.PyTreeDef,
        ts: TrainState,
        state: State,
        cursor: Cursor | None,
        skipped: set[Cursor],
    ) -> State:
        """Steps until a limit; ``skipped`` holds the data positions of batches to drop (after a
        rewind); ``train_steps`` holds the step taking indices into resident data (True) or whole
        batches."""
        feed = self.train_feed = self.make_train_feed(cursor)
        self.add_worker(feed)
        train_step = train_steps[feed.data is not None]
        leaves = jax.tree.leaves(ts)
        self._positions = {}
        self._last_completed = None
        position = feed.cursor
        batch: PyTree | None = next(feed)
        zero_sums = self._zero_sums_fn(train_step, leaves, empty_sums(), batch, state.pack(), feed.data)
        sums = zero_sums()
        inflight: collections.deque[Array] = collections.deque()
        max_inflight = self._max_inflight_steps()
        start = time.perf_counter() - state.elapsed_time_s
        first_step = state.num_steps
        window = _Window(time.perf_counter(), feed.wait_time_s)
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
            self._positions[state.num_steps + 1] = position
            if state.num_steps == first_step:
                self.analyze_train_step(
                    train_step, leaves, sums, batch, state.pack(), feed.data, dtype=self.compute_dtype
                )
            leaves, sums, loss = train_step(leaves, sums, batch, state.pack(), feed.data)
            self.perf_after_step(state.num_steps + 1, loss)
            batch = None
            inflight.append(loss)
            if len(inflight) > max_inflight:
                inflight.popleft().block_until_ready()
            if state.num_steps == first_step:
                loss.block_until_ready()
                window.first_step_s = time.perf_counter() - window.start
                self.restart_cadence_clocks()
                self._valid_cadence_last = (self._valid_cadence_last[0], time.monotonic())
                logger.info("First step (including compilation) took %.2f s", window.first_step_s)
            state = State(
                num_steps=state.num_steps + 1,
                num_samples=state.num_samples + self.config.batch_size,
                num_valid_steps=state.num_valid_steps,
                elapsed_time_s=time.perf_counter() - start,
                epoch=feed.cursor.epoch,
            )
            window.steps += 1
            self._last_completed = (treedef, leaves, state, feed.cursor)
            over = self.is_training_over(state)
            if self.light_log_is_due(state) or over:
                host = {
                    **window.close(feed.wait_time_s, self.config.batch_size),
                    "epoch": float(state.epoch),
                    **self.pop_section_times(),
                    **self.host_metrics(),
                }
                host.update(self.perf_metrics(host["steps_per_second"]))
                self.log_item(LogItem(state=state, phase="train", sums=sums, host_scalars=host))
                sums = zero_sums()
                window = _Window(time.perf_counter(), feed.wait_time_s)
                if over:
                    self.flush_logs()  # so a non-finite last window is seen before the final save
            stop_signal, save_requested, nonfinite = self._requests(state, over)
            if nonfinite is not None:
                self._on_nonfinite(nonfinite)
            self._forget_positions()
            if self.valid_is_due(state) or self.heavy_log_is_due(state) or over:
                state = self._between_steps(jax.tree.unflatten(treedef, leaves), state, over)
            if over or stop_signal is not None or save_requested or self.checkpoint_is_due(state):
                ts = jax.tree.unflatten(treedef, leaves)
                if self._needs_ranking(state, stop_signal):
                    with self.step_context("valid"):
                        self.validate(ts, state)
                    state = state.replace(num_valid_steps=state.num_valid_steps + 1)
                self._checkpoint_or_stop(ts, state, feed.cursor, over, stop_signal)
        self.flush_logs()
        self.final_train_state = jax.tree.unflatten(treedef, leaves)
        return state

    def _needs_ranking(self, state: State, stop_signal: int | None) -> bool:
        """Whether a checkpoint about to be saved needs a validation pass of its own: keep_best ranks
        a checkpoint only by the validation of its step, and the cadences need not line up. Not
        when stopping on a signal, which should be quick."""
        return self.config.checkpoint.keep_best > 0 and stop_signal is None and self.last_valid_step != state.num_steps

    def _requests(self, state: State, over: bool) -> tuple[int | None, bool, dict[str, float] | None]:
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
        return self.config.log.every_n_steps or 100

    @override
    def on_health(self, state: State, health: dict[str, float]) -> None:
        # Runs on the logging thread: only records; the training thread acts on it. An alert the
        # training thread has not taken yet is merged with, never replaced by, a later window's.
        with self._health_lock:
            self._health_seen_step = state.num_steps
            if health.get("_nonfinite_steps", 0.0) <= 0:
                return
            pending = self.nonfinite_alert
            if pending is not None:
                health = {
                    **pending,
                    "_nonfinite_steps": pending["_nonfinite_steps"] + health["_nonfinite_steps"],
                    "_max_nonfinite_streak": max(pending["_max_nonfinite_streak"], health["_max_nonfinite_streak"]),
                }
            self.nonfinite_alert = health

    def _take_alert(self) -> dict[str, float] | None:
        with self._health_lock:
            alert, self.nonfinite_alert = self.nonfinite_alert, None
            return alert

    def _forget_positions(self) -> None:
        """Drops the data positions of steps whose windows the logging thread has found finite."""
        seen = self._health_seen_step
        # Steps are added in increasing order, so the first key is the oldest: O(1) on every step.
        if self.nonfinite_alert is None and self._positions and next(iter(self._positions)) <= seen:
            self._positions = {step: cursor for step, cursor in self._positions.items() if step > seen}

    def _on_nonfinite(self, health: dict[str, float]) -> None:
        """Acts on non-finite steps per ``nan.policy`` (their updates were never applied)."""
        step = int(health["_first_nonfinite_step"])
        leaf = int(health["_first_nonfinite_leaf"])
        cause = int(health["_first_nonfinite_cause"])
        if cause == NONFINITE_GRADIENT:
            culprit = f"non-finite gradient of {self._grad_leaf_names[leaf - 1]}"
        elif cause == NONFINITE_UPDATE:
            culprit = f"update made {self._grad_leaf_names[leaf - 1]} non-finite (check the learning rate)"
        else:
            culprit = "non-finite loss"
        what = f"{culprit} at step {step} ({int(health['_nonfinite_steps'])} step(s) skipped)"
        self.wait_for_checkpoint()
        # A checkpoint saved after the step (before the host learned of it) is finite, since the
        # update was not applied, but its trajectory has already passed the bad batch.
        last_good = self.latest_checkpoint(before_step=step)
        policy = self.config.nan.policy
        streak = int(health["_max_nonfinite_streak"])
        if policy == "halt" or (policy == "skip" and streak >= self.config.nan.max_consecutive):
            self.flush_logs()
            limit = f"; {streak} in a row (nan.max_consecutive={self.config.nan.max_consecutive})"
            raise TrainingStopped(
                f"error: {what}{limit if policy == 'skip' else ''}; last good checkpoint: {last_good or 'none'}",
                EXIT_FAILURE,
            )
        if policy == "rewind":
            if last_good is None:
                raise TrainingStopped(
                    f"error: {what}; nan.policy=rewind but no checkpoint precedes step {step}", EXIT_FAILURE
                )
            raise _Rewind(step, what, self._positions.get(step))
        logger.warning("%s; continuing (nan.policy=skip)", what)

    def _rewind(self, template: PyTree, rewind: "_Rewind") -> tuple[TrainState, State, Cursor]:
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
        self._valid_cadence_last = (info.state.num_steps, time.monotonic())
        self.resume_cadences(info.state.num_steps)
        self._health_seen_step = info.state.num_steps
        self.log_event(info.state.num_steps, "rewind", checkpoint=str(info.path), reason=rewind.what)
        return ts, info.state, info.cursor

    def resume_or_start(self, ts: TrainState) -> tuple[TrainState, State, Cursor | None]:
        """The train state, State and data cursor to start from: a restored checkpoint's, or the
        fresh ones (with warm-started weights if asked)."""
        restored = self.restore_training(ts)
        if restored is None:
            if self.config.warm_start is not None:
                ts = ts._replace(params=self.warm_start_params(ts.params))
                if ts.ema is not None:
                    ema = jax.tree.map(jnp.copy, ts.params)
                    ts = ts._replace(
                        ema=ema if self._state_shardings is None else jax.device_put(ema, self._state_shardings.ema)
                    )
            return ts, State(), None
        ts, info = restored
        self.log_event(info.state.num_steps, "resume", checkpoint=str(info.path))
        self._valid_cadence_last = (info.state.num_steps, time.monotonic())
        self.resume_cadences(info.state.num_steps)
        return ts, info.state, info.cursor

    def _checkpoint_or_stop(
        self, ts: TrainState, state: State, cursor: Cursor, over: bool, stop_signal: int | None
    ) -> None:
        """Saves when due, asked (SIGUSR1) or stopping; on ``stop_signal`` (SIGTERM/SIGINT), saves and stops."""
        stopping = stop_signal is not None
        with self.step_context("checkpoint"):
            path = self.save_checkpoint(ts, state, cursor, self.get_mesh(), wait=over or stopping)
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
        if cursor is not None:
            source.restore(cursor)
        limit = self.config.data.device_resident_max_mb * 2**20
        if isinstance(source, MapBatchSource) and source.arrays is not None and resident_bytes(source) <= limit:
            return ResidentFeed(source, self.replicated_sharding())
        return PrefetchFeed(DevicePrefetcher(source, self.place_batch, self.config.data.prefetch))

    def _build_steps(
        self, optimizer: optax.GradientTransformation, static: PyTree, treedef: jax.tree_util.PyTreeDef
    ) -> dict[bool, Any]:
        """Jits the training step and the validation step (kept on self).

        The training step takes the train state as a flat list of arrays: flattening Equinox
        modules and typed keys in Python at every call costs more than a small model's step. It
        comes in two variants: True takes sample indices into device-resident data, False whole
        batches already on the devices.
        """
        if self._state_shardings is None:
            raise RuntimeError("init_train_state must run before the steps are built")
        shardings = self._state_shardings
        loss_fn = self.compute_loss_and_metrics
        step = make_train_step(
            loss_fn,
            static,
            optimizer,
            compute_dtype=self.compute_dtype,
            grad_accum_steps=self.config.grad_accum_steps,
            ema_decay=self.config.ema.decay,
            grad_shardings=shardings.params,
            compute_shardings=gathered_shardings(shardings.params) if "fsdp" in self.plan.parts else None,
        )

        def flat_step(
            leaves: list[Array], sums: dict[str, Array], batch: Any, packed: Array, data: dict[str, Array] | None
        ) -> tuple[list[Array], dict[str, Array], Array]:
            if data is not None:
                batch = gather_batch(batch, data)
            batch = self.constrain_batch(batch)
            ts, sums, loss = step(jax.tree.unflatten(treedef, leaves), sums, batch, State.unpack(packed, "train"))
            return jax.tree.leaves(ts), sums, loss

        donate = self.config.compile.donate
        eval_step = make_eval_step(loss_fn, static, compute_dtype=self.compute_dtype)

        def constrained_eval_step(
            params: PyTree, frozen: PyTree, sums: dict[str, Array], batch: PyTree, packed: Array, key: PRNGKeyArray
        ) -> dict[str, Array]:
            return eval_step(params, frozen, sums, self.constrain_batch(batch), packed, key)

        self._eval_step = jax.jit(constrained_eval_step, donate_argnums=(2,) if donate else ())
        self._valid_key = jax.random.fold_in(jax.random.key(self.config.seed), 1)
        # Explicit shardings let the host pass numpy inputs (indices, counters) straight to the call,
        # placed by the jit's fast path rather than a separate, slower device_put. Whole batches
        # keep the layout ``place_batch`` gave them (None); the step lays them out by the plan.
        replicated = self.replicated_sharding()
        state = jax.tree.leaves(shardings)
        return {
            resident: jax.jit(
                flat_step,
                in_shardings=(state, replicated, self.batch_sharding() if resident else None, replicated, replicated),
                out_shardings=(state, replicated, replicated),
                donate_argnums=(0, 1) if donate else (),
            )
            for resident in (True, False)
        }

    def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes and dtypes of a training batch, laid out along the batch axes (one batch is read)."""
        batch = next(iter(self.get_batch_source("train", seed=self.config.seed)))
        sharding = self.batch_sharding()
        return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for name, x in batch.items()}

    def _plan_report(self, ts: TrainState, train_step: Any | None) -> PlanReport:
        """The report of ``ts``'s layout and, given the (whole-batch) training step, of its compiled form."""
        compiled = None
        if train_step is not None:
            leaves, batch, packed = jax.tree.leaves(ts), self.example_batch(), State().pack()
            _, sums, _ = jax.eval_shape(train_step, leaves, empty_sums(), batch, packed, None)
            sums = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated_sharding()), sums
            )
            compiled = train_step.lower(leaves, sums, batch, packed, None).compile()
        groups = {"params": ts.params, "opt_state": ts.opt_state, "ema": ts.ema, "frozen": ts.frozen}
        return make_report(self.plan.name, axis_sizes(self.get_mesh()), groups, ts.params, compiled)

    def plan_report(self, *, compile_step: bool = True) -> PlanReport:
        """Memory per device of the train state under the plan and, with ``compile_step``, XLA's memory
        analysis and FLOPs of the compiled training step; the train state is never allocated."""
        self.validate_config()
        optimizer = self.full_optimizer()
        abstract, static = self.abstract_train_state(optimizer)
        shardings = self._state_shardings = self.train_state_shardings(abstract)
        ts = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
        self._static = static
        steps = self._build_steps(optimizer, static, jax.tree.structure(ts)) if compile_step else None
        return self._plan_report(ts, None if steps is None else steps[False])

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

    def _between_steps(self, ts: TrainState, state: State, over: bool) -> State:
        """Validation and media, when due; both wait for the training step in flight first."""
        valid_due = self.valid_is_due(state) or over
        heavy_due = self.heavy_log_is_due(state) or over
        if heavy_due and not self.has_media():
            self.mark_heavy_logged(state)
            heavy_due = False
        if not (valid_due or heavy_due):
            return state
        jax.block_until_ready(ts)
        if valid_due:
            with self.step_context("valid"):
                self.validate(ts, state)
            state = state.replace(num_valid_steps=state.num_valid_steps + 1)
        if heavy_due:
            with self.step_context("media"):
                self.log_heavy(ts, state)
        return state

    def _zero_sums_fn(self, step: Callable[..., Any], *args: Any) -> Callable[[], dict[str, Array]]:
        """Returns a function making fresh zero metric sums with the full set of keys ``step``
        returns (a fixed structure, so the step compiles once); the sums are its argument after
        the first one (training) or its only dict output (validation)."""
        out = jax.eval_shape(step, *args)
        shapes = out if isinstance(out, dict) else out[1]
        sharding = self.replicated_sharding()
        return jax.jit(lambda: {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}, out_shardings=sharding)

    def valid_is_due(self, state: State) -> bool:
        last_step, last_time = self._valid_cadence_last
        config = self.config
        if config.valid_every_n_steps is not None and state.num_steps - last_step >= config.valid_every_n_steps:
            return True
        seconds = config.valid_every_n_seconds
        return seconds is not None and time.monotonic() - last_time >= seconds

    def eval_params(self, ts: TrainState) -> PyTree:
        if ts.ema is not None and self.config.ema.use_for_valid:
            return ts.ema
        return ts.params

    def eval_model(self, ts: TrainState) -> PyTree:
        """The model used for validation and media: the EMA weights if configured, in inference mode."""
        params = cast_floating(self.eval_params(ts), self.compute_dtype)
        return eqx.nn.inference_mode(eqx.combine(params, ts.frozen, self._static))

    def _valid_source(self) -> BatchSource:
        if self._valid_batches is None:
            self._valid_batches = self.get_batch_source("valid", seed=self.config.seed)
        return self._valid_batches

    def validate(self, ts: TrainState, state: State) -> None:
        """One pass over the validation split; the averages are logged under ``valid``."""
        self._valid_cadence_last = (state.num_steps, time.monotonic())
        source = self._valid_source()
        source.restore(type(source.cursor)(epoch=0, index=0))
        packed = state.pack()
        params = self.eval_params(ts)
        serial = self._max_inflight_steps() == 0
        sums: dict[str, Array] | None = None
        with DevicePrefetcher(source, self.place_batch, self.config.data.prefetch) as batches:
            for batch in batches:
                if self._valid_zeros is None:
                    args = (params, ts.frozen, {"count": jnp.zeros((), jnp.float32)}, batch, packed, self._valid_key)
                    self._valid_zeros = self._zero_sums_fn(self._eval_step, *args)
                sums = self._valid_zeros() if sums is None else sums
                sums = self._eval_step(params, ts.frozen, sums, batch, packed, self._valid_key)
                if serial:
                    jax.block_until_ready(sums)
        if sums is not None:
            # Read here rather than on the logging thread: the checkpoint of this step ranks itself
            # by these values (keep_best), and validation has already waited on the device.
            host = jax.device_get(sums)
            count = max(float(host.pop("count")), 1.0)
            metrics = {name: float(value) / count for name, value in host.items()}
            self.last_valid_metrics = metrics
            self.last_valid_step = state.num_steps
            self.log_item(LogItem(state=state, phase="valid", host_scalars=metrics))

    def log_heavy(self, ts: TrainState, state: State) -> None:
        """Logs media for the first validation batch."""
        self.mark_heavy_logged(state)
        source = self._valid_source()
        source.restore(type(source.cursor)(epoch=0, index=0))
        batch_np = next(iter(source))
        batch = self.place_batch(batch_np)
        media = self.log_media(self.eval_model(ts), batch, state.replace(phase="valid"))
        if jax.process_count() > 1:
            # The logging thread can read only this process's shards; every process gathers the
            # rest here, together (heavy logging is step-based in multi-process runs).
            media = jax.tree.map(_addressable, media)
        if media:
            self.log_item(LogItem(state=state, phase="valid", media=media))

    @override
    def on_run_start(self) -> None:
        super().on_run_start()
        self.get_mesh()
