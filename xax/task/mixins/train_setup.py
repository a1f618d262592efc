"""Set-up of training: the train state (built, placed by the plan, or restored) and the jitted steps."""

from typing import TYPE_CHECKING, Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, PRNGKeyArray, PyTree

from xax.checkpoint import named_leaves
from xax.core.health import Health
from xax.core.metric import Metric
from xax.core.state import Phase, State
from xax.data.cursor import Cursor
from xax.data.feeds import gather_batch
from xax.data.sources import BatchSource
from xax.parallel import Plan, PlanReport, axis_sizes, gathered_shardings, make_report
from xax.task.base import BaseTask
from xax.task.mixins.train import InitParams, TrainConfig, composed
from xax.task.mixins.train_step import TrainState, empty_sums, make_eval_step, make_train_step
from xax.utils.layer_stats import layer_groups
from xax.utils.pytree import cast_floating

if TYPE_CHECKING:
    from xax.task.mixins.checkpointing import Restored

Config = TypeVar("Config", bound=TrainConfig)


def host_cpu() -> jax.Device | None:
    """This process's CPU device where the run's devices are GPUs or TPUs; None on a CPU run (the
    devices are the host) or where the CPU backend is unavailable (``JAX_PLATFORMS`` leaves it out)."""
    if jax.default_backend() == "cpu":
        return None
    try:
        return jax.local_devices(backend="cpu")[0]
    except (RuntimeError, ValueError):
        return None


def place_from_host(array: Array, sharding: NamedSharding) -> Array:
    """A host-built array laid out per ``sharding``: each local device receives only its own shard
    (every process built the same values from the same seed)."""
    values = np.asarray(array)
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


class TrainSetupMixin(BaseTask[Config], Generic[Config]):
    """Builds the model and optimizer state, places them per the parallel plan (or restores them
    from a checkpoint), and jits the training and validation steps over them."""

    if TYPE_CHECKING:  # from the mixins composed beside this one (xax/task/task.py)

        @property
        def compute_dtype(self) -> jnp.dtype: ...
        @property
        def plan(self) -> Plan: ...

        def get_model(self, params: InitParams) -> PyTree: ...
        def get_optimizer(self) -> optax.GradientTransformation: ...
        def compute_loss_and_metrics(
            self, model: PyTree, batch: PyTree, state: State, key: PRNGKeyArray
        ) -> tuple[Array, dict[str, Metric]]: ...
        def get_mesh(self) -> Mesh: ...
        def train_state_shardings(self, ts: TrainState) -> TrainState: ...
        def replicated_sharding(self) -> NamedSharding: ...
        def batch_sharding(self) -> NamedSharding: ...
        def constrain_batch(self, batch: PyTree) -> PyTree: ...
        def get_batch_source(self, phase: Phase, *, seed: int) -> BatchSource: ...
        def restore_training(self, target: PyTree) -> "tuple[PyTree, Restored] | None": ...
        def warm_start_params(self, params: PyTree) -> PyTree: ...
        def prewarm_checkpoints(self, tree: PyTree) -> None: ...
        def log_event(self, step: int, kind: str, **detail: str) -> None: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._state_shardings: TrainState | None = None
        self._static: PyTree = None

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
        """Builds the model, splits it into arrays and structure, and places it per the plan: with
        ``parallel.sharded_init``, in one jitted program, run on the host's CPU and sharded from there
        (``parallel.init_on_host``, where the devices are not CPUs) or on the devices, each making
        only its shards; else eagerly on one device and then moved."""
        abstract, static = self.abstract_train_state(optimizer)
        shardings = self._state_shardings = self.train_state_shardings(abstract)
        parallel = composed(self.config).parallel
        if not parallel.sharded_init:
            return jax.device_put(self.fresh_train_state(optimizer)[0], shardings), static
        host = host_cpu() if parallel.init_on_host else None
        if host is None:
            return jax.jit(lambda: self.fresh_train_state(optimizer)[0], out_shardings=shardings)(), static
        # The same program on the host: random initialization unrolls into hundreds of small fusions,
        # each a kernel that a GPU compile builds separately (minutes for GPT-2 small).
        with jax.default_device(host):
            built = jax.jit(lambda: self.fresh_train_state(optimizer)[0])()
        return jax.tree.map(place_from_host, built, shardings), static

    def resume_or_start(self, ts: TrainState) -> tuple[TrainState, State, Cursor | None]:
        """The train state, State and data cursor to start from: a restored checkpoint's, or the
        fresh ones (with warm-started weights if asked)."""
        restored = self.restore_training(ts)
        if restored is None:
            if composed(self.config).warm_start is not None:
                ts = ts._replace(params=self.warm_start_params(ts.params))
                if ts.ema is not None:
                    ema = jax.tree.map(jnp.copy, ts.params)
                    ts = ts._replace(
                        ema=ema if self._state_shardings is None else jax.device_put(ema, self._state_shardings.ema)
                    )
            self.prewarm_checkpoints(ts)
            return ts, State(), None
        ts, info = restored
        self.prewarm_checkpoints(ts)
        self.log_event(info.state.num_steps, "resume", checkpoint=str(info.path))
        self.resume_cadences(info.state.num_steps)
        self.check_resumed_optimizer(ts.opt_state, info.state.num_steps)
        return ts, info.state, info.cursor

    def build_steps(
        self, optimizer: optax.GradientTransformation, static: PyTree, treedef: jax.tree_util.PyTreeDef
    ) -> dict[bool, Any]:
        """Jits the training step and the validation step (kept on self).

        The training step takes the train state as a flat list of arrays: flattening Equinox
        modules and typed keys in Python at every call costs more than a small model's step. It
        comes in two variants: True takes sample indices into device-resident data, False whole
        batches already on the devices. Its metric sums and ``Health`` ride along, both donated.
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
            layer_groups=layer_groups(list(named_leaves(shardings.params)))
            if composed(self.config).log.layer_stats
            else (),
            compute_shardings=gathered_shardings(shardings.params) if "fsdp" in self.plan.parts else None,
        )

        def flat_step(
            leaves: list[Array],
            sums: dict[str, Array],
            health: Health,
            batch: Any,
            packed: Array,
            data: dict[str, Array] | None,
        ) -> tuple[list[Array], dict[str, Array], Health, Array]:
            if data is not None:
                batch = gather_batch(batch, data)
            batch = self.constrain_batch(batch)
            ts = jax.tree.unflatten(treedef, leaves)
            ts, sums, health, loss = step(ts, sums, health, batch, State.unpack(packed, "train"))
            return jax.tree.leaves(ts), sums, health, loss

        donate = composed(self.config).compile.donate
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
                in_shardings=(
                    state,
                    replicated,
                    replicated,
                    self.batch_sharding() if resident else None,
                    replicated,
                    replicated,
                ),
                out_shardings=(state, replicated, replicated, replicated),
                donate_argnums=(0, 1, 2) if donate else (),
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
            _, sums, _, _ = jax.eval_shape(train_step, leaves, empty_sums(), Health.zeros(), batch, packed, None)
            replicated = self.replicated_sharding()
            sums, health = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), (sums, Health.zeros())
            )
            compiled = train_step.lower(leaves, sums, health, batch, packed, None).compile()
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
        steps = self.build_steps(optimizer, static, jax.tree.structure(ts)) if compile_step else None
        return self._plan_report(ts, None if steps is None else steps[False])
