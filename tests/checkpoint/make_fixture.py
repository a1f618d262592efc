"""Writes the committed checkpoint fixture: a tiny MLP trained for a few steps on the CPU.

The fixture proves that checkpoints written by earlier versions of xax still restore
(``test_fixture_restores.py``). Run it again only to add a fixture of a new checkpoint format,
under a new name; never overwrite one that is committed:

    python -m tests.checkpoint.make_fixture NAME

It trains ``TinyMLP`` for ``STEPS`` steps, keeps the newest checkpoint under
``tests/checkpoint/fixtures/NAME/checkpoints/STEP`` and records, in
``tests/checkpoint/fixtures/NAME/fixture.json``, the step, the counters, the data cursor and the
sum of every saved array, as read from the task that wrote it.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

import xax

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STEPS = 6  # one and a half epochs of 32 samples in batches of 8: the cursor is mid-epoch
BATCH_SIZE = 8
NUM_TRAIN = 32


class TinyMLP(eqx.Module):
    """4 -> 8 -> 1, small enough that a checkpoint of it (with Adam's state and an EMA) is a few KiB."""

    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, *, key: PRNGKeyArray) -> None:
        hidden_key, out_key = jax.random.split(key)
        self.hidden = eqx.nn.Linear(4, 8, key=hidden_key)
        self.out = eqx.nn.Linear(8, "scalar", key=out_key)

    def __call__(self, x: Array) -> Array:
        return self.out(jax.nn.tanh(self.hidden(x)))


@dataclass
class FixtureConfig(xax.SupervisedConfig):
    num_train: int = xax.field(NUM_TRAIN, help="Training samples")


class FixtureTask(xax.SupervisedTask[FixtureConfig]):
    """A noisy linear regression fitted by ``TinyMLP`` with Adam."""

    def get_model(self, params: xax.InitParams) -> TinyMLP:
        return TinyMLP(key=params.key)

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(1e-2)

    def get_output(self, model: TinyMLP, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray) -> Array:
        return jax.vmap(model)(batch["x"])

    def compute_loss(
        self, model: TinyMLP, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return jnp.mean((output - batch["y"]) ** 2)

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        rng = np.random.default_rng(0 if phase == "train" else 1)
        num = self.config.num_train if phase == "train" else 16
        x = rng.normal(size=(num, 4)).astype(np.float32)
        y = (x @ np.array([1.0, -2.0, 3.0, 0.5], np.float32)).astype(np.float32)
        return datasets.Dataset.from_dict({"x": x, "y": y})


def fixture_config() -> FixtureConfig:
    return FixtureConfig(batch_size=BATCH_SIZE, max_steps=STEPS)


def fixture_argv(run_dir: Path, *overrides: str) -> list[str]:
    """The command-line options the fixture was trained with (and that resume it)."""
    return [
        f"artifacts.run_dir={run_dir}",
        "launcher.kind=single_device",
        "ema.decay=0.9",
        "log.stdout=false",
        "log.tensorboard=false",
        "compile.cache=false",
        f"checkpoint.every_n_steps={STEPS // 2}",
        "checkpoint.keep_last=1",
        *overrides,
    ]


def array_sums(tree: Any) -> dict[str, float]:
    """The float64 sum of every array of ``tree`` (PRNG keys by their key data), by dotted path."""
    sums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if hasattr(leaf, "dtype"):
            sums[jax.tree_util.keystr(path, simple=True, separator=".")] = float(np.sum(np.asarray(leaf, np.float64)))
    return sums


def make_fixture(name: str) -> Path:
    """Trains the fixture task and keeps its newest checkpoint under ``fixtures/NAME``."""
    destination = FIXTURES / name
    if destination.exists():
        raise SystemExit(f"{destination} exists; committed fixtures are never rewritten: pick a new name")
    tasks: list[FixtureTask] = []

    class Recorded(FixtureTask):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        Recorded.launch(fixture_config(), argv=fixture_argv(run_dir))
        task = tasks[0]
        assert task.final_train_state is not None
        step_dirs = sorted((run_dir / "checkpoints").iterdir(), key=lambda path: int(path.name))
        assert step_dirs and step_dirs[-1].name == str(STEPS), f"expected a checkpoint of step {STEPS}: {step_dirs}"
        meta = json.loads((step_dirs[-1] / "meta" / "metadata").read_text())
        shutil.copytree(step_dirs[-1], destination / "checkpoints" / step_dirs[-1].name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    record = {
        "step": STEPS,
        "state": meta["state"],
        "cursor": meta["cursor"],
        "xax_version": xax.__version__,
        "git_commit": commit or None,
        "array_sums": array_sums(task.final_train_state._asdict()),
    }
    (destination / "fixture.json").write_text(json.dumps(record, indent=2) + "\n")
    return destination


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.checkpoint.make_fixture NAME")
    print(make_fixture(sys.argv[1]))
