"""Step rate over a run longer than every default cadence, minute by minute.

Two tasks train with the DEFAULT config (metrics every 100 steps or 10 s, media every 300 s,
validation every 500 steps, a checkpoint every 1000 steps), each for ``--minutes`` of training
(``max_seconds``): the README's regression MLP, which has no media, and the MNIST example, which
logs an image grid. By default both run at once, each in its own process on the same device, so
that both pass the 300 s media cadence inside one ten-minute call; ``--one-at-a-time`` runs them
in sequence. The rate of each minute, counted from the first step, comes from the run's
``log.jsonl``; the result is the last whole minute's rate over minute 1's (minute 0 holds the first
validation's and checkpoint's compilation). Target: >= 0.97.

    python -m benchmarks.long_run --out benchmarks/results        # 8.5 minutes, both tasks at once
    python -m benchmarks.long_run --tiny                          # a CPU check: 10 s "minutes"
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import equinox as eqx
import jax
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

import xax
from benchmarks.common import write_results
from examples.mnist import Config as MnistConfig
from examples.mnist import MnistClassification

TASKS = ("regression", "mnist")
BATCH = 128
# --tiny: a "minute" of 10 s, 6 of them, with every cadence firing several times inside.
TINY_MINUTE_S, TINY_MINUTES = 10.0, 6.0
TINY_CADENCES = (
    "log.every_n_seconds=1",
    "log.heavy_every_n_seconds=10",
    "valid_every_n_steps=null",
    "valid_every_n_seconds=8",
    "checkpoint.every_n_steps=null",
    "checkpoint.every_n_seconds=8",
)


@dataclass
class RegressionConfig(xax.SupervisedConfig):
    hidden: int = xax.field(512, help="Width of the hidden layers")
    num_train: int = xax.field(100_000, help="Training samples")
    num_valid: int = xax.field(10_000, help="Validation samples")


def regression_data(num: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, 4)).astype(np.float32)
    y = (np.sin(x[:, 0]) + x[:, 1] * x[:, 2] - 0.5 * x[:, 3] + 0.1 * rng.normal(size=num)).astype(np.float32)
    return datasets.Dataset.from_dict({"x": x, "y": y}).with_format("numpy")


class Regression(xax.SupervisedTask[RegressionConfig]):
    """The README's experiment: an MLP regressing a scalar from four features, no media."""

    def get_model(self, params: xax.InitParams) -> eqx.nn.MLP:
        return eqx.nn.MLP(4, 1, self.config.hidden, depth=2, key=params.key)

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(1e-3)

    def get_output(
        self, model: eqx.nn.MLP, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray
    ) -> Float[Array, " b"]:
        return jax.vmap(model)(batch["x"].astype(self.compute_dtype))[:, 0]

    def compute_loss(
        self, model: eqx.nn.MLP, batch: dict[str, Array], output: Array, state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return ((output - batch["y"]) ** 2).mean()

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        return regression_data(self.config.num_train, 0) if phase == "train" else regression_data(10_000, 1)


def child(task: str, run_dir: Path, seconds: float, tiny: bool) -> None:
    """Trains one task with the default cadences (scaled down with ``tiny``) for ``seconds``."""
    argv = [f"artifacts.run_dir={run_dir}", "launcher.kind=single_device", "log.stdout=false", "compile.cache=false"]
    argv += list(TINY_CADENCES) if tiny else []
    if task == "regression":
        Regression.launch(RegressionConfig(batch_size=BATCH, max_seconds=seconds), argv=argv)
    else:
        # On a CPU the example's CNN is slow; a narrower one keeps the check short.
        argv += ["channels=4", "hidden=16"] if tiny else []
        MnistClassification.launch(MnistConfig(batch_size=BATCH, max_seconds=seconds), argv=argv)


def minute_rates(run_dir: Path, minute_s: float) -> list[float]:
    """Steps per second in each whole minute of training, counted from the first logged step (whose
    compilation is left out), from the training records' (elapsed time, step) pairs interpolated at
    the minute marks."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    points = sorted((r["elapsed_time_s"], r["step"]) for r in records if r.get("phase") == "train")
    times, steps = np.array([t for t, _ in points]), np.array([s for _, s in points], dtype=np.float64)
    marks = np.arange(times[0], times[-1] + 1e-9, minute_s)
    return [float(delta) / minute_s for delta in np.diff(np.interp(marks, times, steps))]


def summarize(task: str, run_dir: Path, minute_s: float) -> dict[str, Any]:
    rates = minute_rates(run_dir, minute_s)
    if len(rates) < 3 or rates[1] <= 0:
        raise RuntimeError(f"{task} logged {len(rates)} whole minute(s) ({rates}); it needs 3, minute 1 not empty")
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    valid = [r for r in records if r.get("phase") == "valid"]
    train = [r for r in records if r.get("phase") == "train"]
    return {
        "task": task,
        "steps": max(r["step"] for r in train),
        "minute_1_steps_per_s": rates[1],
        "last_minute_steps_per_s": rates[-1],
        "ratio_last_vs_minute_1": rates[-1] / rates[1],
        "lowest_minute_vs_minute_1": min(rates[1:]) / rates[1],
        "steps_per_s_by_minute": ", ".join(f"{rate:.0f}" for rate in rates),
        "validations": sum("loss" in r["scalars"] for r in valid),
        "media_passes": sum("loss" not in r["scalars"] for r in valid),
        "windows_with_checkpoint": sum("timers/checkpoint_s" in r["scalars"] for r in train),
    }


def run_tasks(tasks: Sequence[str], seconds: float, minute_s: float, tiny: bool, together: bool) -> list[dict]:
    """Runs each task in its own process (all at once when ``together``), then reads their logs."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if together and len(tasks) > 1:
            # Each process would otherwise take 75% of the device's memory for itself.
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / len(tasks):.2f}"
        procs = []
        for task in tasks:
            flags = ["--child", task, "--run-dir", str(Path(tmp) / task), "--seconds", str(seconds)]
            command = [sys.executable, "-m", "benchmarks.long_run", *flags, *(["--tiny"] if tiny else [])]
            print(f"== {task}: {' '.join(command[1:])}", flush=True)
            procs.append(subprocess.Popen(command, env=env))
            if not together:
                procs[-1].wait()
        codes = [proc.wait() for proc in procs]
        failed = [f"{task} (exit {code})" for task, code in zip(tasks, codes, strict=True) if code != 0]
        if failed:
            raise SystemExit(f"error: {', '.join(failed)} failed; see their output above")
        return [summarize(task, Path(tmp) / task, minute_s) for task in tasks]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Step rate, minute by minute, past every default cadence")
    parser.add_argument("--minutes", type=float, default=8.5, help="Training minutes of each task (default 8.5)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"Comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--one-at-a-time", action="store_true", help="Run the tasks in sequence, not at once")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="10 s minutes, cadences scaled down: checks the script")
    parser.add_argument("--child", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.run_dir, args.seconds, args.tiny)
        return
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks or set(tasks) - set(TASKS):
        raise SystemExit(f"error: --tasks {args.tasks!r}; choose from {','.join(TASKS)}")
    minute_s = TINY_MINUTE_S if args.tiny else 60.0
    minutes = TINY_MINUTES if args.tiny else args.minutes
    rows = run_tasks(tasks, minutes * minute_s, minute_s, args.tiny, together=not args.one_at_a_time)
    how = "in sequence" if args.one_at_a_time else "at once, each in its own process on the same device"
    cadences = (
        "cadences scaled down (metrics every 1 s, media every 10 s, validation and checkpoints every 8 s) and "
        "MNIST's CNN narrowed to 4 channels"
        if args.tiny
        else "the default cadences (metrics every 100 steps or 10 s, media every 300 s, validation every 500 "
        "steps, a checkpoint every 1000 steps)"
    )
    notes = (
        f"{', '.join(tasks)} ({how}), batch {BATCH}, {minutes:g} {'10-second ' if args.tiny else ''}minutes of "
        f"training each with {cadences}. Steps/s of each whole minute after the first step, from log.jsonl; "
        "minute 0 compiles validation and checkpointing, so the ratio is the last whole minute over minute 1. "
        "Target: ratio >= 0.97."
    )
    write_results(args.out, "long_run", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
