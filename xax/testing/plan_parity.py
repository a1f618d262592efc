"""Parity of parallel plans: one tiny language model, trained through the Task loop under several
plans and device counts, must give the per-step loss and gradient norm of one device.

``run_parity`` trains ``TinyLM`` (a tiny GPT-2-style ``xax.arch`` transformer, float32, AdamW, an
EMA of the weights) once per ``PlanCase`` and compares each run's training losses, gradient norms
and final validation loss (of the EMA weights) with those of the first case. It runs on whatever
devices JAX has: simulated CPU devices in tests, GPUs in ``benchmarks/parallel_gpu.py``.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import jax
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray
from typing_extensions import override

from xax.arch.transformer import Transformer, TransformerConfig
from xax.core.config import field
from xax.core.metric import Metric
from xax.core.state import Phase, State
from xax.nn.losses import cross_entropy
from xax.task.mixins.train import InitParams
from xax.task.task import Config, Task


@dataclass
class TinyLMConfig(Config):
    num_windows: int = field(64, help="Random token windows in the training split")
    seq_len: int = field(16, help="Tokens per window (inputs; the window holds one more for the targets)")
    learning_rate: float = field(1e-2, help="AdamW learning rate: large, so that a few steps change the loss")


class TinyLM(Task[TinyLMConfig]):
    """Next-token prediction on random token windows with ``TransformerConfig.gpt2_tiny`` in float32."""

    @property
    def model_config(self) -> TransformerConfig:
        # attention "xla": the same kernel on every backend, so GPU runs compare like CPU ones;
        # scanned layers: the weights carry the leading layer axis the sharding rules must skip.
        return TransformerConfig.gpt2_tiny().with_updates(attention_impl="xla", scan_layers=True)

    @override
    def get_model(self, params: InitParams) -> Transformer:
        return Transformer(self.model_config, key=params.key)

    @override
    def get_optimizer(self) -> optax.GradientTransformation:
        # eps well above float32 rounding: with Adam's default (1e-8) a gradient entry that is pure
        # rounding noise still moves its weight by a full learning rate, in a random direction, and
        # the comparison would measure that noise rather than the plans.
        return optax.adamw(self.config.learning_rate, eps=1e-4, weight_decay=0.1)

    @override
    def compute_loss_and_metrics(
        self, model: Transformer, batch: dict[str, Array], state: State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, Metric]]:
        tokens = batch["tokens"]
        logits, _ = model(tokens[:, :-1])  # (B, T, V)
        return cross_entropy(logits, tokens[:, 1:]), {}

    @override
    def batch_columns(self) -> tuple[str, ...]:
        return ("tokens",)

    @override
    def get_dataset(self, phase: Phase) -> datasets.Dataset:
        num, seed = (self.config.num_windows, 0) if phase == "train" else (self.config.batch_size, 1)
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, self.model_config.vocab_size, (num, self.config.seq_len + 1), dtype=np.int32)
        return datasets.Dataset.from_dict({"tokens": tokens}).with_format("numpy")


@dataclass(frozen=True)
class PlanCase:
    """One run: a device count, a plan and any further overrides (``parallel.tensor=2``, ...)."""

    num_devices: int
    plan: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        extra = f" ({', '.join(self.overrides)})" if self.overrides else ""
        return f"{self.plan} on {self.num_devices} device{'s' if self.num_devices > 1 else ''}{extra}"


@dataclass(frozen=True)
class Trace:
    """What one run logged: per-step training loss and gradient norm, and the final validation loss."""

    loss: list[float]
    grad_norm: list[float]
    valid_loss: float

    def to_dict(self) -> dict[str, list[float] | float]:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "valid_loss": self.valid_loss}


def run_case(case: PlanCase, run_dir: Path, *, steps: int, batch_size: int = 8, overrides: Sequence[str] = ()) -> Trace:
    """Trains ``TinyLM`` for ``steps`` steps under ``case`` and reads back what it logged.

    Matmuls run at full float32 precision: GPUs otherwise multiply float32 in TF32 (10-bit
    mantissas), whose rounding, differing with each plan's reduction order, reached 3e-4 relative
    in the gradient norm on two H200s, and would hide the plans' own differences.
    """
    with jax.default_matmul_precision("highest"):
        _launch_case(case, run_dir, steps=steps, batch_size=batch_size, overrides=overrides)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train = [r["scalars"] for r in records if r["phase"] == "train"]
    valid = [r["scalars"]["loss"] for r in records if r["phase"] == "valid"]
    return Trace([s["loss"] for s in train], [s["grad_norm"] for s in train], valid[-1])


def _launch_case(case: PlanCase, run_dir: Path, *, steps: int, batch_size: int, overrides: Sequence[str]) -> None:
    TinyLM.launch(
        TinyLMConfig(batch_size=batch_size, max_steps=steps),
        argv=[
            "launcher.kind=multi_device",
            f"launcher.num_devices={case.num_devices}",
            f"parallel.plan={case.plan}",
            f"artifacts.run_dir={run_dir}",
            "valid_every_n_steps=null",
            "ema.decay=0.9",
            "log.every_n_steps=1",
            "log.every_n_seconds=null",
            "log.stdout=false",
            "log.tensorboard=false",
            "compile.cache=false",
            *overrides,
            *case.overrides,
        ],
    )


def relative_differences(reference: Trace, other: Trace) -> dict[str, float]:
    """The largest ``|other - reference| / |reference|`` of each logged quantity."""
    if len(other.loss) != len(reference.loss):
        raise AssertionError(f"{len(other.loss)} training records against {len(reference.loss)} of the reference")

    def worst(a: Sequence[float], b: Sequence[float]) -> float:
        return max((abs(y - x) / abs(x) if x != 0 else math.inf * (y != x) for x, y in zip(a, b)), default=0.0)

    return {
        "loss": worst(reference.loss, other.loss),
        "grad_norm": worst(reference.grad_norm, other.grad_norm),
        "valid_loss": worst([reference.valid_loss], [other.valid_loss]),
    }


def check_parity(reference: Trace, traces: dict[str, Trace], *, rtol: float) -> dict[str, dict[str, float]]:
    """Compares every trace with the reference; raises listing every run beyond ``rtol``.

    Returns:
        Per run label, the largest relative difference of each quantity.
    """
    differences = {label: relative_differences(reference, trace) for label, trace in traces.items()}
    failures = [
        f"{label}: {name} differs by {value:.3g} relative (tolerance {rtol:g})"
        for label, values in differences.items()
        for name, value in values.items()
        if not value <= rtol
    ]
    if failures:
        raise AssertionError("plans disagree with the reference run:\n" + "\n".join(failures))
    return differences


def run_parity(
    reference: PlanCase,
    cases: Sequence[PlanCase],
    work_dir: Path,
    *,
    steps: int = 3,
    rtol: float = 1e-5,
    overrides: Sequence[str] = (),
) -> tuple[Trace, dict[str, dict[str, float]]]:
    """Runs the reference and every case, and checks each against the reference at ``rtol``.

    Args:
        reference: The run the others must match (usually ``PlanCase(1, "dp")``).
        cases: The runs to check.
        work_dir: A folder for the runs' directories.
        steps: Optimizer steps per run.
        rtol: The relative tolerance on every step's loss and gradient norm and on the validation loss.
        overrides: Config overrides applied to every run.

    Returns:
        The reference trace and, per case label, the largest relative differences.

    Raises:
        AssertionError: Naming every case and quantity beyond ``rtol``.
    """
    if len(jax.devices()) < max(case.num_devices for case in (reference, *cases)):
        raise ValueError(f"the cases need up to {max(c.num_devices for c in cases)} devices; JAX has {jax.devices()}")
    base = run_case(reference, work_dir / "reference", steps=steps, overrides=overrides)
    traces = {
        case.label: run_case(case, work_dir / f"case_{i}", steps=steps, overrides=overrides)
        for i, case in enumerate(cases)
    }
    return base, check_parity(base, traces, rtol=rtol)
