"""Writes the committed checkpoints of a tiny DiT task and a tiny SSM language-model task, as
written by the xax of before the MLPs were unified (commit 94fad41: DiT's ``mlp.fc1``/``mlp.fc2``,
the SSM model's ``mlp.w1``/``b1``/``w2``/``b2``). ``test_legacy_names.py`` restores them with the
current code, whose MLP parameters are ``mlp.up_proj``/``mlp.down_proj``.

The tasks below run under either version of xax (the DiT config's field names are looked up). To
write a fixture, run this file with the old xax first on the path, from a worktree of it:

    git worktree add /tmp/oldxax 94fad41
    cd /tmp/oldxax && PYTHONPATH=/tmp/oldxax JAX_PLATFORMS=cpu \\
        python /path/to/xax/tests/checkpoint/make_legacy_fixture.py --model dit|ssm NAME
    git worktree remove /tmp/oldxax

It trains for ``STEPS`` steps, keeps the newest checkpoint under
``tests/checkpoint/fixtures/NAME/checkpoints/STEP`` and records, in ``legacy.json`` beside it,
the model, the step, the counters, the data cursor and the float64 sum of every saved array under
its old name. Committed fixtures are never rewritten.
"""

import argparse
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

import xax
from xax.arch.dit import DiT, DiTConfig
from xax.arch.ssm import SSMConfig, SSMLanguageModel

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RECORD = "legacy.json"
STEPS = 6  # one and a half epochs of 32 samples in batches of 8: the cursor is mid-epoch
BATCH_SIZE = 8
NUM_TRAIN = 32
SEQ_LEN = 8
VOCAB = 16


def tiny_dit() -> DiTConfig:
    """A one-block DiT on 4x4 single-channel inputs (the old config said hidden_dim/depth)."""
    names = {field.name for field in fields(DiTConfig)}
    width = "d_model" if "d_model" in names else "hidden_dim"
    depth = "num_layers" if "num_layers" in names else "depth"
    values: dict[str, Any] = {width: 8, depth: 1}
    return DiTConfig(
        input_size=4, patch_size=2, in_channels=1, num_heads=2, mlp_ratio=2.0, num_classes=2, frequency_dim=8, **values
    )


def tiny_ssm() -> SSMConfig:
    """A one-block diagonal SSM language model with an MLP (mlp_ratio=2)."""
    return SSMConfig(vocab_size=VOCAB, d_model=8, num_layers=1, layer="diagonal", d_state=4, mlp_ratio=2)


@dataclass
class LegacyConfig(xax.SupervisedConfig):
    num_train: int = xax.field(NUM_TRAIN, help="Training samples")


class DiTFixtureTask(xax.SupervisedTask[LegacyConfig]):
    """Denoising 4x4 noise images with a one-block DiT and Adam."""

    def get_model(self, params: xax.InitParams) -> DiT:
        return DiT(tiny_dit(), key=params.key)

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(1e-2)

    def get_output(self, model: DiT, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray) -> Array:
        return jax.vmap(model)(batch["x"], batch["t"], batch["y"])

    def compute_loss(
        self, model: DiT, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return jnp.mean((output - batch["target"]) ** 2)

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        rng = np.random.default_rng(0 if phase == "train" else 1)
        num = self.config.num_train if phase == "train" else 16
        x = rng.normal(size=(num, 1, 4, 4)).astype(np.float32)
        t = rng.uniform(size=(num,)).astype(np.float32)
        y = rng.integers(0, 2, size=(num,)).astype(np.int32)
        return datasets.Dataset.from_dict({"x": x, "t": t, "y": y, "target": (0.5 * x).astype(np.float32)})


class SSMFixtureTask(xax.SupervisedTask[LegacyConfig]):
    """Next-token prediction of a counting sequence with a one-block SSM language model and Adam."""

    def get_model(self, params: xax.InitParams) -> SSMLanguageModel:
        return SSMLanguageModel(tiny_ssm(), key=params.key)

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(1e-2)

    def get_output(
        self, model: SSMLanguageModel, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return model(batch["tokens"][:, :-1])

    def compute_loss(
        self, model: SSMLanguageModel, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(output, batch["tokens"][:, 1:]))

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        rng = np.random.default_rng(0 if phase == "train" else 1)
        num = self.config.num_train if phase == "train" else 16
        start = rng.integers(0, VOCAB, size=(num, 1))
        tokens = ((start + np.arange(SEQ_LEN + 1)[None, :]) % VOCAB).astype(np.int32)
        return datasets.Dataset.from_dict({"tokens": tokens})


TASKS: dict[str, type[xax.SupervisedTask[LegacyConfig]]] = {"dit": DiTFixtureTask, "ssm": SSMFixtureTask}


def legacy_config() -> LegacyConfig:
    return LegacyConfig(batch_size=BATCH_SIZE, max_steps=STEPS)


def legacy_argv(run_dir: Path, *overrides: str) -> list[str]:
    """The command-line options the fixtures were trained with (and that resume them)."""
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


def make_legacy_fixture(model: str, name: str) -> Path:
    """Trains the ``model`` fixture task and keeps its newest checkpoint under ``fixtures/NAME``."""
    destination = FIXTURES / name
    if destination.exists():
        raise SystemExit(f"{destination} exists; committed fixtures are never rewritten: pick a new name")
    tasks: list[Any] = []

    base: Any = TASKS[model]

    class Recorded(base):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        Recorded.launch(legacy_config(), argv=legacy_argv(run_dir))
        task = tasks[0]
        assert task.final_train_state is not None
        step_dirs = sorted((run_dir / "checkpoints").iterdir(), key=lambda path: int(path.name))
        assert step_dirs and step_dirs[-1].name == str(STEPS), f"expected a checkpoint of step {STEPS}: {step_dirs}"
        meta = json.loads((step_dirs[-1] / "meta" / "metadata").read_text())
        shutil.copytree(step_dirs[-1], destination / "checkpoints" / step_dirs[-1].name)
    git = ["git", "-C", str(Path(xax.__file__).parent), "rev-parse", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    record = {
        "model": model,
        "step": STEPS,
        "state": meta["state"],
        "cursor": meta["cursor"],
        "xax_version": xax.__version__,
        "git_commit": commit or None,
        "array_sums": array_sums(task.final_train_state._asdict()),
    }
    (destination / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return destination


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(TASKS), required=True)
    parser.add_argument("name")
    args = parser.parse_args()
    print(make_legacy_fixture(args.model, args.name))
