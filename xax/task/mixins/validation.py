"""Validation passes over the held-out split and media logged from them, each at its own cadence."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jaxtyping import Array, PRNGKeyArray, PyTree
from typing_extensions import override

from xax.checkpoint import named_leaves
from xax.core.metric import Histogram, Metric
from xax.core.state import Phase, State
from xax.data.prefetch import DevicePrefetcher
from xax.data.sources import BatchSource
from xax.task.base import BaseTask
from xax.task.loggers.console import Console
from xax.task.mixins.logger import Cadence, LogItem
from xax.task.mixins.train import TrainConfig, composed
from xax.task.mixins.train_step import TrainState, zero_sums_fn
from xax.utils.layer_stats import parameter_samples
from xax.utils.pytree import cast_floating

Config = TypeVar("Config", bound=TrainConfig)


def _addressable(leaf: Any) -> Any:
    """``leaf``, or its global value on the host if other processes hold parts of it."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return multihost_utils.process_allgather(leaf, tiled=True)
    return leaf


class ValidationMixin(BaseTask[Config], Generic[Config]):
    """Runs validation (``valid_every_n_steps`` / ``valid_every_n_seconds``) and the media hook (at
    the logger's heavy cadence) between training steps, with the EMA weights when configured."""

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)

        @property
        def compute_dtype(self) -> jnp.dtype: ...

        last_valid_step: int | None
        last_valid_metrics: dict[str, float]
        # Set by TrainSetupMixin when it builds the steps.
        _eval_step: Callable[..., dict[str, Array]]
        _valid_key: PRNGKeyArray
        _static: PyTree

        def _max_inflight_steps(self) -> int: ...
        def get_batch_source(self, phase: Phase, *, seed: int) -> BatchSource: ...
        def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Array]: ...
        def replicated_sharding(self) -> NamedSharding: ...
        def step_context(self, name: str) -> AbstractContextManager[None]: ...
        def log_item(self, item: LogItem) -> None: ...
        def heavy_log_is_due(self, state: State) -> bool: ...
        def mark_heavy_logged(self, state: State) -> None: ...
        def note_validation(self, step: int, metrics: dict[str, float]) -> None: ...

        console: Console

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._valid_batches: BatchSource | None = None
        self._valid_zeros: Callable[[], dict[str, Array]] | None = None
        self._valid_cadence = Cadence(config.valid_every_n_steps, config.valid_every_n_seconds)
        self._media_compiled = False

    def log_media(self, model: PyTree, batch: PyTree, state: State) -> dict[str, Metric]:
        """Heavy media (images, text) for one validation batch, at the heavy-logging cadence."""
        return {}

    def has_media(self) -> bool:
        """Whether the task logs media at all: a task that does not override the media hook never
        pays for a heavy-logging pass."""
        return type(self).log_media is not ValidationMixin.log_media

    @override
    def resume_cadences(self, step: int) -> None:
        super().resume_cadences(step)
        self._valid_cadence.mark(step)

    @override
    def restart_cadence_clocks(self) -> None:
        super().restart_cadence_clocks()
        self._valid_cadence.restart_clock()

    def valid_is_due(self, state: State) -> bool:
        return self._valid_cadence.is_due(state.num_steps)

    def between_steps(self, ts: TrainState, state: State, over: bool) -> State:
        """Validation and media, when due; both wait for the training step in flight first."""
        valid_due = self.valid_is_due(state) or over
        heavy_due = self.heavy_log_is_due(state) or over
        if heavy_due and not (self.has_media() or composed(self.config).log.layer_stats):
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
        self._valid_cadence.mark(state.num_steps)
        source = self._valid_source()
        source.restore(type(source.cursor)(epoch=0, index=0))
        packed = state.pack()
        params = self.eval_params(ts)
        serial = self._max_inflight_steps() == 0
        sums: dict[str, Array] | None = None
        total = source.num_batches_per_epoch
        # The first pass compiles the evaluation step: allowed as long as the training step's compilation.
        self.note_progress(f"the start of the validation of step {state.num_steps}", compiles=self._valid_zeros is None)
        with DevicePrefetcher(source, self.place_batch, composed(self.config).data.prefetch) as batches:
            for index, batch in enumerate(batches):
                self.console.activity(f"validating {index + 1}" + ("" if total is None else f"/{total}"))
                if self._valid_zeros is None:
                    args = (params, ts.frozen, {"count": jnp.zeros((), jnp.float32)}, batch, packed, self._valid_key)
                    self._valid_zeros = zero_sums_fn(self.replicated_sharding(), self._eval_step, *args)
                sums = self._valid_zeros() if sums is None else sums
                sums = self._eval_step(params, ts.frozen, sums, batch, packed, self._valid_key)
                if serial:
                    jax.block_until_ready(sums)
                self.note_progress(f"validation batch {index + 1} of step {state.num_steps}")
        self.console.activity("")
        if sums is not None:
            # Read here rather than on the logging thread: the checkpoint of this step ranks itself
            # by these values (keep_best), and validation has already waited on the device.
            host = jax.device_get(sums)
            count = max(float(host.pop("count")), 1.0)
            metrics = {name: float(value) / count for name, value in host.items()}
            self.last_valid_metrics = metrics
            self.last_valid_step = state.num_steps
            self.note_validation(state.num_steps, metrics)
            self.log_item(LogItem(state=state, phase="valid", host_scalars=metrics))

    def log_heavy(self, ts: TrainState, state: State) -> None:
        """Logs media for the first validation batch, and with ``log.layer_stats`` the histograms of
        the training dynamics."""
        self.mark_heavy_logged(state)
        if composed(self.config).log.layer_stats:
            self.log_layer_histograms(ts, state)
        if self.has_media():
            self.log_media_batch(ts, state)

    def log_layer_histograms(self, ts: TrainState, state: State) -> None:
        """Histograms of each top-level block's parameter values (sampled on the device) and of each
        per-module statistic over the leaf modules (from the latest statistics logged)."""
        samples = parameter_samples(named_leaves(ts.params))
        if jax.process_count() > 1:
            samples = jax.tree.map(_addressable, samples)
        media: dict[str, Metric] = {name: Histogram(values) for name, values in samples.items()}
        self.log_item(LogItem(state=state, phase="train", media=media, layer_histograms=True))

    def log_media_batch(self, ts: TrainState, state: State) -> None:
        """The task's media for the first validation batch."""
        # The first pass compiles the task's media code: allowed as long as the training step's compilation.
        self.note_progress(f"the start of the media of step {state.num_steps}", compiles=not self._media_compiled)
        source = self._valid_source()
        source.restore(type(source.cursor)(epoch=0, index=0))
        batch_np = next(iter(source))
        batch = self.place_batch(batch_np)
        self.console.activity("making media (log_media)")
        try:
            media = self.log_media(self.eval_model(ts), batch, state.replace(phase="valid"))
        finally:
            self.console.activity("")
        self._media_compiled = True
        if jax.process_count() > 1:
            # The logging thread can read only this process's shards; every process gathers the
            # rest here, together (heavy logging is step-based in multi-process runs).
            media = jax.tree.map(_addressable, media)
        if media:
            self.log_item(LogItem(state=state, phase="valid", media=media))
        self.note_progress(f"the media of step {state.num_steps}")
