"""The pure, jittable pieces of a training step: precision casts, gradient accumulation, EMA."""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, UInt32

from xax.core.health import Health, NonfiniteCause
from xax.core.metric import Scalar
from xax.core.state import State
from xax.utils.layer_stats import group_statistics, leaf_sums
from xax.utils.pytree import cast_floating

# (model, batch, state, key) -> (loss, metrics); the model is already cast to the compute dtype.
LossFn = Callable[[Any, Any, State, PRNGKeyArray], tuple[Array, dict[str, Any]]]


class TrainState(NamedTuple):
    """Every array the training step carries from one step to the next (donated each step).

    Attributes:
        params: The model's floating-point arrays, in float32: what the optimizer updates.
        frozen: The model's other arrays (integer buffers and the like), carried unchanged.
        opt_state: The optimizer state.
        ema: The moving average of ``params``, or None when the EMA is off.
        key: The PRNG key's raw data (``jax.random.key_data``); each step splits off a fresh key.
            Raw data rather than a typed key: it crosses the jit boundary every step without the
            typed key's Python-side wrapping, and it saves as a plain array.
        nonfinite_streak: Steps in a row whose loss or gradient was not finite (their updates skipped).
    """

    params: PyTree
    frozen: PyTree
    opt_state: optax.OptState
    ema: PyTree | None
    key: UInt32[Array, "..."]
    nonfinite_streak: Int[Array, ""]


def scalar_metrics(metrics: dict[str, Any], where: str) -> dict[str, Array]:
    """Unwraps Scalar metrics to float32 arrays; anything else belongs in the media hook."""
    values = {}
    for name, metric in metrics.items():
        if isinstance(metric, Scalar):
            values[name] = jnp.mean(metric.value).astype(jnp.float32)
        elif isinstance(metric, jax.Array):
            values[name] = jnp.mean(metric).astype(jnp.float32)
        else:
            raise TypeError(
                f"{where} returned a {type(metric).__name__} for '{name}'; only Scalar metrics are averaged "
                "during training: return images, text and histograms from compute_media instead"
            )
    return values


def split_microbatches(batch: PyTree, num_micro: int) -> PyTree:
    """(B, ...) -> (num_micro, B / num_micro, ...), taking every num_micro-th sample.

    Strided rather than contiguous micro-batches keep each one spread over all devices of the data
    axis (the batch is sharded along B), so no device idles during accumulation.
    """

    def split(x: Array) -> Array:
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])  # (B / A, A, ...)
        return jnp.swapaxes(x, 0, 1)  # (A, B / A, ...)

    return jax.tree.map(split, batch)


def find_learning_rate(opt_state: optax.OptState) -> Array | None:
    """The current learning rate, where the optimizer exposes one (``optax.inject_hyperparams``)."""
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array) and value.ndim == 0
    )
    return jnp.asarray(found[0][1], jnp.float32) if found else None


def make_train_step(
    loss_fn: LossFn,
    static: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    compute_dtype: jnp.dtype,
    grad_accum_steps: int,
    ema_decay: float | None,
    grad_shardings: PyTree | None = None,
    compute_shardings: PyTree | None = None,
    layer_groups: Sequence[tuple[str, Sequence[int]]] = (),
) -> Callable[
    [TrainState, dict[str, Array], Health, PyTree, State], tuple[TrainState, dict[str, Array], Health, Array]
]:
    """Builds the (unjitted) training step.

    The step returns the new train state, the metric sums and the ``Health`` with this step added,
    and the step's loss (a small output the host can wait on to bound how far it runs ahead of the
    device).
    ``grad_shardings`` (the parameters' shardings) lays the gradients out like the parameters, so
    that a sharded plan reduce-scatters them instead of all-reducing whole copies;
    ``compute_shardings`` is the layout the cast parameters are used in (FSDP gathers them there).
    ``layer_groups`` (``xax.utils.layer_stats.layer_groups``; empty: off, at no cost) adds each group's
    gradient norm, parameter norm, update-to-parameter ratio and non-finite count to the metric sums.
    """

    def forward(params: PyTree, frozen: PyTree, batch: PyTree, state: State, key: PRNGKeyArray) -> Any:
        params = cast_floating(params, compute_dtype)
        if compute_shardings is not None:
            params = jax.lax.with_sharding_constraint(params, compute_shardings)
        model = eqx.combine(params, frozen, static)
        loss, metrics = loss_fn(model, batch, state, key)
        return loss.astype(jnp.float32), scalar_metrics(metrics, "compute_metrics")

    grad_fn = jax.value_and_grad(forward, has_aux=True)

    def step(
        ts: TrainState, sums: dict[str, Array], health: Health, batch: PyTree, state: State
    ) -> tuple[TrainState, dict[str, Array], Health, Array]:
        key, step_key = jax.random.split(jax.random.wrap_key_data(ts.key))
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(ts.params, ts.frozen, batch, state, step_key)
        else:
            micro_batches = split_microbatches(batch, grad_accum_steps)
            micro_keys = jax.random.split(step_key, grad_accum_steps)

            def accumulate(carry: Any, inputs: Any) -> tuple[Any, None]:
                (loss_i, metrics_i), grads_i = grad_fn(ts.params, ts.frozen, inputs[0], state, inputs[1])
                return jax.tree.map(jnp.add, carry, (loss_i, metrics_i, grads_i)), None

            _, first_metrics = jax.eval_shape(
                forward, ts.params, ts.frozen, jax.tree.map(lambda x: x[0], micro_batches), state, step_key
            )
            zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), first_metrics, ts.params))
            totals, _ = jax.lax.scan(accumulate, zeros, (micro_batches, micro_keys))
            loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, totals)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)

        # Per-leaf squared norms give the global norm and, for free, the first non-finite leaf (the
        # small replicated leaves' sums taken together: one kernel per leaf would cost more in launches
        # than bytes; a sharded leaf is summed where it lies).
        replicated = None
        if grad_shardings is not None:
            replicated = [sharding.is_fully_replicated for sharding in jax.tree.leaves(grad_shardings)]

        def per_leaf(values: list[Array]) -> Array:
            return leaf_sums(values, replicated)

        squares = per_leaf([jnp.square(g.astype(jnp.float32)) for g in jax.tree.leaves(grads)])
        grad_norm = jnp.sqrt(jnp.sum(squares))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def weight_squares() -> Array:
            return per_leaf([jnp.square(p.astype(jnp.float32)) for p in jax.tree.leaves(ts.params)])

        def update(_: None) -> tuple[Any, ...]:
            # optax's internals (e.g. Adam's bias correction, float ** int32 count) rely on standard
            # promotion; the user's own code keeps whatever promotion mode they run with.
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
                params = optax.apply_updates(ts.params, updates)
            # Finite gradients can still make non-finite weights (a learning rate of NaN or 1e38):
            # such an update is dropped like a non-finite gradient. The check is a count per leaf,
            # fused with the update; nothing is read on the host.
            params_ok = per_leaf([(~jnp.isfinite(p)).astype(jnp.float32) for p in jax.tree.leaves(params)]) == 0
            ok = jnp.all(params_ok)
            params = jax.tree.map(lambda new, old: jnp.where(ok, new, old), params, ts.params)
            opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), opt_state, ts.opt_state)
            ema = None
            if ema_decay is not None and ts.ema is not None:
                ema = optax.incremental_update(params, ts.ema, step_size=1.0 - ema_decay)
            if not layer_groups:
                return params, opt_state, ema, params_ok
            # The applied update's and the weights' squared sizes per leaf, for the layer statistics;
            # both read the weights before the update, here in one computation.
            pairs = zip(jax.tree.leaves(params), jax.tree.leaves(ts.params), strict=True)
            return params, opt_state, ema, params_ok, per_leaf([jnp.square(p - q) for p, q in pairs]), weight_squares()

        def keep(_: None) -> tuple[Any, ...]:
            num_leaves = len(jax.tree.leaves(ts.params))
            kept = (ts.params, ts.opt_state, ts.ema, jnp.ones(num_leaves, bool))
            return (*kept, jnp.zeros(num_leaves, jnp.float32), weight_squares()) if layer_groups else kept

        # A non-finite step never touches the weights; the host learns of it at the next log.
        params, opt_state, ema, params_ok, *squares_for_stats = jax.lax.cond(finite, update, keep, None)
        applied = finite & jnp.all(params_ok)
        streak = jnp.where(applied, 0, ts.nonfinite_streak + 1).astype(jnp.int32)
        step_number = state.num_steps + 1
        # What went wrong first in this step: the loss, then a gradient leaf, then the update of a
        # parameter leaf (leaf numbers count from 1 in the parameters' flattening order).
        grads_ok = jnp.isfinite(squares)
        loss_code, grad_code, update_code = (
            int(NonfiniteCause.LOSS),
            int(NonfiniteCause.GRADIENT),
            int(NonfiniteCause.UPDATE),
        )
        cause = jnp.where(
            ~jnp.isfinite(loss),
            loss_code,
            jnp.where(~jnp.all(grads_ok), grad_code, jnp.where(applied, 0, update_code)),
        )
        bad_leaf = jnp.where(
            cause == grad_code,
            jnp.argmin(grads_ok) + 1,
            jnp.where(cause == update_code, jnp.argmin(params_ok) + 1, 0),
        )
        health = health.record(step=step_number, applied=applied, cause=cause, leaf=bad_leaf, streak=streak)

        values = {"loss": loss, "grad_norm": grad_norm, **metrics}
        if layer_groups:
            values.update(
                group_statistics(
                    layer_groups,
                    squares,
                    per_leaf([(~jnp.isfinite(g)).astype(jnp.float32) for g in jax.tree.leaves(grads)]),
                    squares_for_stats[1],
                    squares_for_stats[0],
                )
            )
        learning_rate = find_learning_rate(opt_state)
        if learning_rate is not None:
            values["learning_rate"] = learning_rate
        new_sums = {name: sums.get(name, jnp.zeros((), jnp.float32)) + value for name, value in values.items()}
        new_sums["count"] = sums["count"] + 1.0
        new_state = TrainState(params, ts.frozen, opt_state, ema, jax.random.key_data(key), streak)
        return new_state, new_sums, health, loss

    return step


def make_eval_step(
    loss_fn: LossFn, static: PyTree, *, compute_dtype: jnp.dtype
) -> Callable[[PyTree, PyTree, dict[str, Array], PyTree, Array, PRNGKeyArray], dict[str, Array]]:
    """Builds the (unjitted) validation step: sums of loss and metrics weighted by batch size.

    Weighting by the number of samples makes the average over a pass exact, including the last,
    smaller batch, so every validation sample counts once.
    """

    def step(
        params: PyTree, frozen: PyTree, sums: dict[str, Array], batch: PyTree, packed: Array, key: PRNGKeyArray
    ) -> dict[str, Array]:
        model = eqx.nn.inference_mode(eqx.combine(cast_floating(params, compute_dtype), frozen, static))
        loss, metrics = loss_fn(model, batch, State.unpack(packed, "valid"), key)
        num = jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
        values = {"loss": loss.astype(jnp.float32), **scalar_metrics(metrics, "compute_metrics")}
        new_sums = {name: sums.get(name, jnp.zeros((), jnp.float32)) + value * num for name, value in values.items()}
        new_sums["count"] = sums["count"] + num
        return new_sums

    return step


def empty_sums() -> dict[str, Array]:
    """The smallest sums a step accepts; the step's output gives the full set of keys."""
    return {"count": jnp.zeros((), jnp.float32)}


def zero_sums_fn(
    sharding: jax.sharding.Sharding, step: Callable[..., Any], *args: Any
) -> Callable[[], dict[str, Array]]:
    """Returns a jitted function making fresh zero metric sums with the full set of keys ``step``
    returns (a fixed structure, so the step compiles once), placed with ``sharding``.

    The sums are the second output of ``step(*args)`` (training) or its only output (validation).
    """
    out = jax.eval_shape(step, *args)
    shapes = out if isinstance(out, dict) else out[1]
    return jax.jit(lambda: {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}, out_shardings=sharding)
