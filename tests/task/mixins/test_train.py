"""The training loop, end to end through ``launch``, checked against exact formulas."""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xax
from tests.task.toy import Regression, RegressionConfig, final_params, read_jsonl, regression_dataset
from xax.data import PrefetchFeed, ResidentFeed


def run(tmp_path: Path, *overrides: str, config: RegressionConfig | None = None) -> tuple[Regression, xax.State]:
    """Launches the regression task and returns the task object and its final state."""
    tasks: list[Regression] = []

    class Recorded(Regression):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    # Logs by steps only: a timed record (every 10 s by default) would land at whatever step a slow machine
    # reached, changing the windows the tests count and compare.
    argv = [
        f"artifacts.run_dir={tmp_path}",
        "log.stdout=false",
        "log.tensorboard=false",
        "log.every_n_seconds=null",
        "compile.cache=false",
    ]
    state = Recorded.launch(config or RegressionConfig(batch_size=32), argv=[*argv, *overrides])
    return tasks[0], state


def train_losses(run_dir: Path) -> list[float]:
    return [r["scalars"]["loss"] for r in read_jsonl(run_dir / "log.jsonl") if r["phase"] == "train"]


def test_loss_falls_and_run_dir_is_complete(tmp_path: Path) -> None:
    _, state = run(tmp_path, "max_steps=60", "log.every_n_steps=10", "valid_every_n_steps=30", "log.tensorboard=true")
    assert state.num_steps == 60
    assert state.num_samples == 60 * 32
    losses = train_losses(tmp_path)
    assert len(losses) == 6
    assert losses[-1] < 0.1 * losses[0]
    for name in ("config.yaml", "versions.json", "command.txt", "log.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert "max_steps: 60" in (tmp_path / "config.yaml").read_text()
    valid = [r for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "valid"]
    assert [r["step"] for r in valid] == [30, 60]


def test_counters_are_exact_integers(tmp_path: Path) -> None:
    _, state = run(tmp_path, "max_samples=100", "batch_size=8", "log.every_n_steps=5")
    assert state.num_steps == 13  # ceil(100 / 8)
    assert state.num_samples == 104
    assert isinstance(state.num_samples, int)
    records = read_jsonl(tmp_path / "log.jsonl")
    assert [r["num_samples"] for r in records if r["phase"] == "train"][:2] == [40, 80]


def test_epoch_limit(tmp_path: Path) -> None:
    # 512 samples at batch 64 with the last partial batch dropped: 8 steps an epoch.
    _, state = run(tmp_path, "max_epochs=2", "batch_size=64")
    assert state.epoch == 2
    assert state.num_steps == 16


def test_seconds_limit(tmp_path: Path) -> None:
    _, state = run(tmp_path, "max_seconds=1.0", "valid_every_n_steps=null")
    assert 1.0 <= state.elapsed_time_s < 30.0
    assert state.num_steps > 0


def test_validation_counts_every_sample(tmp_path: Path) -> None:
    # 100 validation samples at batch 32: three full batches and a last one of 4.
    task, _ = run(tmp_path, "max_steps=5", "valid_every_n_steps=5", "batch_size=32")
    params = final_params(task).params
    data = regression_dataset(100, 1).with_format("numpy")[:]
    predictions = data["x"] @ np.asarray(params.weight)[0] + np.asarray(params.bias)[0]
    expected = float(np.mean((predictions - data["y"]) ** 2))
    valid = [r for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "valid"]
    assert valid[-1]["scalars"]["loss"] == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_equals_full_batch(tmp_path: Path) -> None:
    full, _ = run(tmp_path / "full", "max_steps=8", "batch_size=32")
    accum, _ = run(tmp_path / "accum", "max_steps=8", "batch_size=32", "grad_accum_steps=4")
    for a, b in zip(jax.tree.leaves(final_params(full).params), jax.tree.leaves(final_params(accum).params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(train_losses(tmp_path / "full"), train_losses(tmp_path / "accum"), rtol=1e-5)


def test_ema_follows_its_formula(tmp_path: Path) -> None:
    decay = 0.9
    task, _ = run(tmp_path, "max_steps=1", f"ema.decay={decay}")
    initial = eqx.filter(task.get_model(xax.InitParams(jax.random.split(jax.random.key(0))[0])), eqx.is_array)
    final = final_params(task)
    for ema_leaf, p0, p1 in zip(
        jax.tree.leaves(final.ema), jax.tree.leaves(initial), jax.tree.leaves(final.params), strict=True
    ):
        np.testing.assert_allclose(ema_leaf, decay * p0 + (1 - decay) * p1, rtol=1e-6)


def test_gradient_clipping(tmp_path: Path) -> None:
    # With SGD (lr 0.05) and clipping to 0.01, one update moves the parameters by exactly lr * 0.01.
    task, _ = run(tmp_path, "max_steps=1", "max_grad_norm=0.01", "log.every_n_steps=1")
    initial = eqx.filter(task.get_model(xax.InitParams(jax.random.split(jax.random.key(0))[0])), eqx.is_array)
    delta = optax.tree.norm(jax.tree.map(jnp.subtract, final_params(task).params, initial))
    assert float(delta) == pytest.approx(0.05 * 0.01, rel=1e-4)
    assert read_jsonl(tmp_path / "log.jsonl")[0]["scalars"]["grad_norm"] > 0.01


def test_bfloat16_compute_keeps_float32_weights_and_loss(tmp_path: Path) -> None:
    seen = {}

    class Spy(Regression):
        def get_output(self, model, batch, state, key):
            seen["weight"] = model.weight.dtype
            out = super().get_output(model, batch, state, key)
            seen["output"] = out.dtype
            return out

        def compute_loss(self, model, batch, output, state, key):
            seen["loss_input"] = output.dtype
            return super().compute_loss(model, batch, output, state, key)

    tasks = []

    class Recorded(Spy):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    Recorded.launch(
        RegressionConfig(batch_size=32, max_steps=3),
        argv=[f"artifacts.run_dir={tmp_path}", "log.stdout=false", "precision.compute_dtype=bfloat16"],
    )
    assert seen["weight"] == jnp.bfloat16
    assert seen["output"] == jnp.bfloat16
    assert seen["loss_input"] == jnp.float32
    assert final_params(tasks[0]).params.weight.dtype == jnp.float32


def test_learning_rate_schedule_is_logged(tmp_path: Path) -> None:
    class Scheduled(Regression):
        def get_optimizer(self) -> optax.GradientTransformation:
            return optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))

    tasks = []

    class Recorded(Scheduled):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    Recorded.launch(
        RegressionConfig(batch_size=32, max_steps=10),
        argv=[f"artifacts.run_dir={tmp_path}", "log.stdout=false", "log.every_n_steps=5", "log.every_n_seconds=null"],
    )
    rates = [r["scalars"]["learning_rate"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train"]
    # The logged value is the mean over the window of the rate each step's update used.
    assert rates[0] == pytest.approx(np.mean([0.1 - 0.01 * k for k in range(5)]), rel=1e-5)
    assert rates[1] == pytest.approx(np.mean([0.1 - 0.01 * k for k in range(5, 10)]), rel=1e-5)


def test_indivisible_batch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "batch_size=30", "grad_accum_steps=4", "max_steps=1", "launcher.kind=multi_device")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "batch_size=30" in err and f"multiple of {4 * jax.device_count()}" in err


def test_non_scalar_training_metric_is_rejected(tmp_path: Path) -> None:
    class Bad(Regression):
        def compute_metrics(self, model, batch, output, loss, state):
            return {"picture": xax.Image(jnp.zeros((4, 4)))}

    with pytest.raises(TypeError, match="picture"):
        Bad.launch(RegressionConfig(batch_size=32, max_steps=1), argv=[f"artifacts.run_dir={tmp_path}"])


def test_task_without_config_type_shows_the_right_form() -> None:
    class Untyped(xax.SupervisedTask):
        pass

    with pytest.raises(TypeError, match=r"Untyped\(xax.SupervisedTask\[Config\]\)"):
        Untyped.get_config_class()


def test_device_resident_and_prefetched_data_train_identically(tmp_path: Path) -> None:
    # Gathering batches on the device from indices must feed exactly the batches the background
    # worker would have made.
    resident, _ = run(tmp_path / "resident", "max_steps=40", "batch_size=32", "log.every_n_steps=1")
    prefetched, _ = run(
        tmp_path / "prefetched", "max_steps=40", "batch_size=32", "log.every_n_steps=1", "data.device_resident_max_mb=0"
    )
    assert isinstance(resident.train_feed, ResidentFeed)
    assert isinstance(prefetched.train_feed, PrefetchFeed)
    np.testing.assert_array_equal(train_losses(tmp_path / "resident"), train_losses(tmp_path / "prefetched"))
