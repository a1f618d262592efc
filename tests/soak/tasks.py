"""The tasks the soak tests run in subprocesses: ``python -m tests.soak.tasks key=value ...``.

One regression (the shared toy's) with knobs for what a long or faulty run needs: targets that drift
with training time (so the validation loss falls, then rises), a block of extra weights that makes
checkpoints megabytes large, NaN rows in chosen batches, and a learning rate that jumps to a value
that overflows the weights.
"""

import time
from dataclasses import dataclass

import datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

import xax
from tests.task.toy import RegressionConfig, regression_arrays, regression_dataset
from xax.data import shuffle_order


@dataclass
class SoakConfig(RegressionConfig):
    drift: float = xax.field(
        0.0,
        help="Training targets are scaled by 1 + drift * ((t - drift_center_s) / drift_center_s)^2 at t seconds of "
        "training; the validation targets are not, so the validation loss is lowest near drift_center_s",
    )
    drift_center_s: float = xax.field(20.0, help="Seconds of training at which the training targets are unscaled")
    ballast: int = xax.field(0, help="Extra weights (this many float32s, joined to the output by their mean)")
    poison_steps: list[int] = xax.field([], help="Set a NaN feature in one row of each of these steps' batches")
    lr_jump_step: int | None = xax.field(None, help="From this optimizer update on (1-based), use lr_jump_to")
    lr_jump_to: float = xax.field(1e38, help="The learning rate after lr_jump_step")


class Ballasted(eqx.Module):
    """The linear model plus ``ballast`` weights that only shift the output by their mean."""

    linear: eqx.nn.Linear
    ballast: Float[Array, " n"] | None

    def __init__(self, num_features: int, ballast: int, *, key: PRNGKeyArray) -> None:
        linear_key, ballast_key = jax.random.split(key)
        self.linear = eqx.nn.Linear(num_features, "scalar", key=linear_key)
        self.ballast = 0.01 * jax.random.normal(ballast_key, (ballast,)) if ballast > 0 else None

    def __call__(self, x: Float[Array, " features"]) -> Float[Array, ""]:
        out = self.linear(x)
        return out if self.ballast is None else out + jnp.mean(self.ballast).astype(out.dtype)


class SoakRegression(xax.SupervisedTask[SoakConfig]):
    def get_model(self, params: xax.InitParams) -> Ballasted:
        return Ballasted(self.config.num_features, self.config.ballast, key=params.key)

    def get_optimizer(self) -> optax.GradientTransformation:
        config = self.config
        if config.lr_jump_step is None:
            return optax.sgd(config.learning_rate)
        # The schedule counts applied updates; a dropped (non-finite) one does not advance it.
        schedules = [optax.constant_schedule(config.learning_rate), optax.constant_schedule(config.lr_jump_to)]
        return optax.sgd(optax.join_schedules(schedules, [config.lr_jump_step - 1]))

    def get_output(self, model: Ballasted, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray) -> Array:
        return jax.vmap(model)(batch["x"].astype(self.compute_dtype))

    def compute_loss(
        self, model: Ballasted, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        target = batch["y"]
        if self.config.drift and state.phase == "train":
            center = self.config.drift_center_s
            offset = (jnp.asarray(state.elapsed_time_s, jnp.float32) - center) / center
            target = target * (1.0 + self.config.drift * offset**2)
        return jnp.mean((output - target) ** 2)

    def compute_metrics(
        self, model: Ballasted, batch: dict[str, Array], output: Array, loss: Array, state: xax.State
    ) -> dict[str, xax.Metric]:
        return {"abs_error": xax.Scalar(jnp.mean(jnp.abs(output - batch["y"])))}

    def compute_media(
        self, model: Ballasted, batch: dict[str, Array], output: Array, state: xax.State
    ) -> dict[str, xax.Metric]:
        return {"media_output": xax.Scalar(output)} if self.config.media else {}

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        config = self.config
        if phase != "train":
            return regression_dataset(config.num_valid, 1, config.num_features)
        if not config.poison_steps:
            return regression_dataset(config.num_train, 0, config.num_features)
        x, y = regression_arrays(config.num_train, 0, config.num_features)
        # The rows of the first epoch's batches in order (the loader's shuffle of epoch 0).
        order = shuffle_order(config.num_train, config.seed, 0)
        for step in config.poison_steps:
            x[order[(step - 1) * config.batch_size]] = np.nan
        return datasets.Dataset.from_dict({"x": x, "y": y})

    def host_metrics(self) -> dict[str, float]:
        # The wall clock at the end of each logged window: runs side by side line up by it.
        return {**super().host_metrics(), "soak/clock_s": time.time()}


if __name__ == "__main__":
    state = SoakRegression.launch(SoakConfig(batch_size=32))
    print(f"steps={state.num_steps}")
