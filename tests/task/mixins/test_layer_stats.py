"""``log.layer_stats``: per-module statistics from a real run equal the norms computed by hand."""

from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.task.loggers.test_tensorboard import read_events, tag_values
from tests.task.toy import Digits, DigitsConfig, final_params, read_jsonl
from xax.core.health import Health
from xax.core.state import State
from xax.task.mixins.train_step import TrainState, empty_sums, make_train_step
from xax.utils.layer_stats import HISTOGRAM_VALUES, layer_groups

LR = 0.1
STARTED: list["PlainSGD"] = []


class PlainSGD(Digits):
    """The small CNN (conv, head) under plain SGD, so that a step's gradient is (before - after) / LR."""

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(LR)

    def on_run_start(self) -> None:
        STARTED.append(self)
        super().on_run_start()


def launch(run_dir: Path, *overrides: str) -> PlainSGD:
    argv = [f"artifacts.run_dir={run_dir}", "log.stdout=false", "log.every_n_steps=1", "log.every_n_seconds=null"]
    PlainSGD.launch(DigitsConfig(batch_size=32, max_steps=1, num_train=64), argv=[*argv, *overrides])
    return STARTED[-1]


def sgd_step(loss_fn: Any, model: dict, groups: list) -> tuple[Any, TrainState]:
    """The training step of ``model`` under SGD (0.1) with the layer groups ``groups``, and its state."""
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.sgd(0.1)
    step = make_train_step(
        loss_fn,
        static,
        optimizer,
        compute_dtype=jnp.dtype(jnp.float32),
        grad_accum_steps=1,
        ema_decay=None,
        layer_groups=groups,
    )
    key = jax.random.key_data(jax.random.key(0))
    frozen = jax.tree.map(lambda _: None, params)
    return step, TrainState(params, frozen, optimizer.init(params), None, key, jnp.zeros((), jnp.int32))


def norm(*arrays: jax.Array) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays)))


def test_logged_statistics_equal_the_norms_of_the_step(tmp_path: Path) -> None:
    task = launch(tmp_path, "log.layer_stats=true")
    after = final_params(task).params
    before = task.fresh_train_state(task.full_optimizer())[0].params  # the same seed: the same start
    grads = jax.tree.map(lambda b, a: (np.asarray(b, np.float64) - np.asarray(a, np.float64)) / LR, before, after)
    (record,) = [r["scalars"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train"]
    for module in ("conv", "head"):
        p0, p1, g = getattr(before, module), getattr(after, module), getattr(grads, module)
        expected = {
            "grad_norm": norm(g.weight, g.bias),
            "param_norm": norm(p0.weight, p0.bias),
            "update_ratio": norm(p1.weight - p0.weight, p1.bias - p0.bias) / norm(p0.weight, p0.bias),
        }
        for name, value in expected.items():
            np.testing.assert_allclose(record[f"layers/{module}/{name}"], value, rtol=2e-4, err_msg=name)
        assert record[f"layers/{module}/nonfinite"] == 0.0
    # The groups partition the model here, so they add up to the step's global gradient norm.
    total = np.hypot(record["layers/conv/grad_norm"], record["layers/head/grad_norm"])
    np.testing.assert_allclose(total, record["grad_norm"], rtol=1e-5)
    # Every logger gets them: TensorBoard too.
    tags = tag_values(read_events(tmp_path / "tensorboard" / "train"))
    assert {"layers/conv/grad_norm", "layers/head/update_ratio"} <= set(tags)


def test_off_by_default_nothing_is_computed_or_logged(tmp_path: Path) -> None:
    launch(tmp_path)
    (record,) = [r["scalars"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train"]
    assert not [name for name in record if name.startswith("layers/")]

    # The step built without groups has none of their reductions.
    model = {"a": {"w": jnp.ones((3, 2))}, "b": {"w": jnp.ones((2,))}}

    def loss_fn(model: Any, batch: jax.Array, state: State, key: jax.Array) -> tuple[jax.Array, dict]:
        return jnp.sum((batch @ model["a"]["w"] * model["b"]["w"][None, :]) ** 2), {}

    def equations(groups: list) -> int:
        step, ts = sgd_step(loss_fn, model, groups)
        with jax.numpy_dtype_promotion("standard"):
            jaxpr = jax.make_jaxpr(step)(ts, empty_sums(), Health.zeros(), jnp.ones((4, 3)), State())
        return len(jaxpr.eqns)

    off, on = equations([]), equations(layer_groups(["a.w", "b.w"]))
    assert on > off


def test_histograms_at_the_media_cadence_hold_the_parameters_and_the_modules_statistics(tmp_path: Path) -> None:
    """A run longer than the media cadence (every 2 steps, 5 steps): TensorBoard gets each block's
    parameter values and each statistic over the modules at steps 2, 4 and the last, and the last
    ones describe the final parameters and the last logged statistics exactly."""
    overrides = ("log.layer_stats=true", "log.heavy_every_n_steps=2", "log.heavy_every_n_seconds=null")
    argv = [f"artifacts.run_dir={tmp_path}", "log.stdout=false", "log.every_n_steps=1", "log.every_n_seconds=null"]
    PlainSGD.launch(DigitsConfig(batch_size=32, max_steps=5, num_train=64), argv=[*argv, *overrides])
    after = final_params(STARTED[-1]).params
    tags = tag_values(read_events(tmp_path / "tensorboard" / "train"))
    for tag in ("layers/conv/params", "layers/head/params", "layers/grad_norm", "layers/update_ratio"):
        assert [step for step, _ in tags[tag]] == [2, 4, 5], tag
    for module in ("conv", "head"):
        leaves = [np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(getattr(after, module))]
        stride = -(-sum(leaf.size for leaf in leaves) // HISTOGRAM_VALUES)  # every stride-th value of each leaf
        values = np.concatenate([leaf[::stride] for leaf in leaves])
        histo = tags[f"layers/{module}/params"][-1][1].histo
        assert histo.num == values.size
        np.testing.assert_allclose(
            [histo.min, histo.max, histo.sum], [values.min(), values.max(), values.sum()], rtol=1e-5
        )
    (last,) = [r["scalars"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train" and r["step"] == 5]
    grad_norms = [last["layers/conv/grad_norm"], last["layers/head/grad_norm"]]
    histo = tags["layers/grad_norm"][-1][1].histo
    assert histo.num == 2
    np.testing.assert_allclose(histo.sum, sum(grad_norms), rtol=1e-6)
    # The histogram records write no line of their own to log.jsonl.
    assert all(r["scalars"] for r in read_jsonl(tmp_path / "log.jsonl") if "phase" in r)


def test_a_skipped_step_reports_the_weights_norm_no_update_and_its_nonfinite_gradients() -> None:
    """A gradient with a NaN in one module: the step is skipped (the weights kept), the statistics still
    give each module's weight norm, a zero update and the NaN count where it is."""
    model = {"a": {"w": jnp.arange(6.0).reshape(3, 2)}, "b": {"w": jnp.asarray([3.0, 4.0])}}

    def loss_fn(model: Any, batch: jax.Array, state: State, key: jax.Array) -> tuple[jax.Array, dict]:
        # sqrt at 0 has an infinite slope: b's gradient is inf * 0 = NaN in its first entry only.
        return jnp.sum(batch @ model["a"]["w"]) + jnp.sum(jnp.sqrt(model["b"]["w"] * jnp.asarray([0.0, 1.0]))), {}

    step, ts = sgd_step(loss_fn, model, layer_groups(["a.w", "b.w"]))
    with jax.numpy_dtype_promotion("standard"):
        new_ts, sums, _, _ = jax.jit(step)(ts, empty_sums(), Health.zeros(), jnp.ones((4, 3)), State())
    np.testing.assert_array_equal(np.asarray(new_ts.params["a"]["w"]), np.asarray(model["a"]["w"]))  # kept
    stats = {name: float(value) for name, value in sums.items() if name.startswith("layers/")}
    np.testing.assert_allclose(stats["layers/a/param_norm"], norm(model["a"]["w"]), rtol=1e-6)
    np.testing.assert_allclose(stats["layers/b/param_norm"], 5.0, rtol=1e-6)
    assert stats["layers/a/update_ratio"] == stats["layers/b/update_ratio"] == 0.0
    assert stats["layers/a/nonfinite"] == 0.0 and stats["layers/b/nonfinite"] == 1.0
