"""Small real tasks shared by the tests: a linear regression and an MNIST-sized CNN."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

import xax

WEIGHTS = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


def regression_arrays(num: int, seed: int, num_features: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Features (num, num_features) and targets (num,) of the noisy linear regression, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, num_features)).astype(np.float32)
    y = (x[:, :4] @ WEIGHTS + 0.1 * rng.normal(size=num)).astype(np.float32)
    return x, y


def regression_dataset(num: int, seed: int, num_features: int = 4) -> datasets.Dataset:
    x, y = regression_arrays(num, seed, num_features)
    return datasets.Dataset.from_dict({"x": x, "y": y})


@dataclass
class RegressionConfig(xax.SupervisedConfig):
    learning_rate: float = xax.field(0.05, help="SGD learning rate")
    num_train: int = xax.field(512, help="Training samples")
    num_valid: int = xax.field(100, help="Validation samples")
    num_features: int = xax.field(4, help="Input features (the first four carry the signal)")
    media: bool = xax.field(False, help="Log the validation batch's outputs as media (their mean)")


RegressionConfigT = TypeVar("RegressionConfigT", bound=RegressionConfig)


class RegressionBase(xax.SupervisedTask[RegressionConfigT], Generic[RegressionConfigT]):
    def get_model(self, params: xax.InitParams) -> eqx.nn.Linear:
        return eqx.nn.Linear(self.config.num_features, "scalar", key=params.key)

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.config.learning_rate)

    def get_output(self, model: eqx.nn.Linear, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray) -> Array:
        return jax.vmap(model)(batch["x"].astype(self.compute_dtype))

    def compute_loss(
        self, model: eqx.nn.Linear, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return jnp.mean((output - batch["y"]) ** 2)

    def compute_metrics(
        self, model: eqx.nn.Linear, batch: dict[str, Array], output: Array, loss: Array, state: xax.State
    ) -> dict[str, xax.Metric]:
        return {"abs_error": xax.Scalar(jnp.mean(jnp.abs(output - batch["y"])))}

    def compute_media(
        self, model: eqx.nn.Linear, batch: dict[str, Array], output: Array, state: xax.State
    ) -> dict[str, xax.Metric]:
        # The per-row outputs themselves: in a multi-process run each process holds only its rows.
        return {"media_output": xax.Scalar(output)} if self.config.media else {}

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset | datasets.IterableDataset:
        num, seed = (self.config.num_train, 0) if phase == "train" else (self.config.num_valid, 1)
        return regression_dataset(num, seed, self.config.num_features)


class Regression(RegressionBase[RegressionConfig]):
    pass


def final_params(task: xax.SupervisedTask) -> xax.TrainState:
    """The train state a finished run left behind."""
    assert task.final_train_state is not None
    return task.final_train_state


class SmallCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, *, key: PRNGKeyArray) -> None:
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, 3, stride=2, padding=1, key=k1)
        self.head = eqx.nn.Linear(8 * 14 * 14, 10, key=k2)

    def __call__(self, x: Array) -> Array:
        return self.head(jax.nn.relu(self.conv(x[None])).reshape(-1))


def digits_dataset(num: int, seed: int) -> datasets.Dataset:
    """MNIST-shaped data (uint8 28x28 images, 10 classes) whose label is learnable from the pixels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=num)
    images = rng.integers(0, 64, size=(num, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label : 2 * label + 4, 4:24] = 255
    return datasets.Dataset.from_dict({"image": images, "label": labels.astype(np.int32)}).with_format("numpy")


@dataclass
class DigitsConfig(xax.SupervisedConfig):
    num_train: int = xax.field(1024, help="Training samples")


class Digits(xax.SupervisedTask[DigitsConfig]):
    def get_model(self, params: xax.InitParams) -> SmallCNN:
        return SmallCNN(key=params.key)

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(1e-3)

    def get_output(self, model: SmallCNN, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray) -> Array:
        return jax.vmap(model)(batch["image"].astype(self.compute_dtype) / 255.0)

    def compute_loss(
        self, model: SmallCNN, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return optax.softmax_cross_entropy_with_integer_labels(output, batch["label"]).mean()

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        return digits_dataset(self.config.num_train if phase == "train" else 200, 0 if phase == "train" else 1)


def read_jsonl(path: "object") -> list[dict]:
    """Every metric record of a log.jsonl, in file order (resume and rewind markers left out)."""
    import json

    lines = [json.loads(line) for line in Path(str(path)).read_text().splitlines()]
    return [line for line in lines if "event" not in line]


ROOT = Path(__file__).resolve().parents[2]


def start_toy(
    run_dir: "Path | str",
    *overrides: str,
    module: str = "tests.task.toy_main",
    env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[str]:
    """Starts ``python -m MODULE`` (by default the regression task of ``toy_main``) in its own process,
    without this process's JAX, XLA and SLURM settings (``env`` added on top)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "SLURM_"))}
    argv = [f"artifacts.run_dir={run_dir}", "compile.cache=false", "log.tensorboard=false", *overrides]
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        env=inherited | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
