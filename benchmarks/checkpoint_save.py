"""How long an asynchronous checkpoint blocks training, and the step time while it is written.

GPT-2 small (124M parameters) with AdamW state (about 1.5 GB in float32), trained with a jitted,
buffer-donating step on random tokens. The save goes through xax's checkpointing mixin (orbax,
asynchronous): the time the call blocks is the device-to-host copy (and the dispatch of the
arrays' checksums, which the device computes while training goes on); the write itself then runs
in the background while training continues.

``--checksums both`` alternates saves with and without the arrays' checksums
(``checkpoint.checksums``) and writes ``checkpoint_checksum``; ``--floats N`` replaces GPT-2 by N
float32 parameters in eight arrays with an elementwise update (a model for the CPU).

    python -m benchmarks.checkpoint_save --out benchmarks/results
    python -m benchmarks.checkpoint_save --checksums both --out benchmarks/results
    python -m benchmarks.checkpoint_save --floats 64000000 --checksums both --out benchmarks/results
    python -m benchmarks.checkpoint_save --tiny      # a CPU check of the script; no numbers
"""

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import xax
from benchmarks.common import write_results
from xax import ArtifactsConfig, ArtifactsMixin, CheckpointingConfig, CheckpointingMixin
from xax.arch import Transformer, TransformerConfig
from xax.checkpoint import array_checksums
from xax.data import Cursor

NUM_ARRAYS = 8


@dataclass
class SaveOnlyConfig(CheckpointingConfig, ArtifactsConfig):
    pass


class SaveOnly(CheckpointingMixin[SaveOnlyConfig], ArtifactsMixin[SaveOnlyConfig]):
    """The checkpointing mixin on its own, as the training loop uses it."""


def gpt2_training(args: argparse.Namespace) -> tuple[Any, Callable[[Any], tuple[Any, jax.Array]], str]:
    """GPT-2 (small, or tiny with ``--tiny``) and AdamW: the state, a donating step, a description."""
    base = TransformerConfig.gpt2_tiny() if args.tiny else TransformerConfig.gpt2_small()
    config = base.with_updates(compute_dtype="bfloat16")
    model = Transformer(config, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer = optax.adamw(3e-4)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, config.max_seq_len + 1), 0, config.vocab_size)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state):
        params, opt_state = state

        def loss_fn(params):
            logits, _ = eqx.combine(params, static)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax relies on it (as in xax's step)
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    name = "GPT-2 tiny" if args.tiny else "GPT-2 small"
    described = (
        f"{name}, {num_params / 1e6:.1f}M parameters + AdamW state, batch {args.batch}x{config.max_seq_len}, "
        "bf16 compute"
    )
    return (params, optimizer.init(params)), step, described


def floats_training(args: argparse.Namespace) -> tuple[Any, Callable[[Any], tuple[Any, jax.Array]], str]:
    """``--floats`` float32 parameters in eight arrays and a memory-bound elementwise update."""
    rows = max(args.floats // (NUM_ARRAYS * 1024), 1)
    keys = jax.random.split(jax.random.key(0), NUM_ARRAYS)
    state = {f"w{i}": jax.random.normal(key, (rows, 1024), jnp.float32) for i, key in enumerate(keys)}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state):
        updated = {name: value - 1e-3 * jnp.tanh(value) for name, value in state.items()}
        return updated, sum(jnp.mean(value) for value in updated.values())

    num_params = NUM_ARRAYS * rows * 1024
    return state, step, f"{num_params / 1e6:.1f}M float32 parameters in {NUM_ARRAYS} arrays, elementwise update"


def phase_columns(phases: dict[str, float], blocked: float) -> dict[str, float]:
    """Where a save's blocking time went (``CheckpointManager.save_phases``): orbax's save (the copy of
    the arrays off the devices), the dispatch of the checksums, and the rest (waits, metadata, the mixin)."""
    orbax, checksums = phases.get("orbax_save", 0.0), phases.get("checksums_dispatch", 0.0)
    return {"orbax_save_s": orbax, "checksums_dispatch_s": checksums, "rest_s": blocked - orbax - checksums}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="How long an asynchronous checkpoint blocks training")
    parser.add_argument("--batch", type=int, default=None, help="Sequences per step (default 16; 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="Steps after each save (default 30; 4 with --tiny)")
    parser.add_argument(
        "--saves", type=int, default=None, help="Checkpoints written per setting (default 3; 1 with --tiny)"
    )
    parser.add_argument(
        "--checksums",
        choices=("on", "off", "both"),
        default="on",
        help="Record the arrays' checksums (checkpoint.checksums); 'both' alternates and compares",
    )
    parser.add_argument("--floats", type=int, default=None, help="A model of this many float32s instead of GPT-2")
    parser.add_argument(
        "--prewarm",
        choices=("on", "off"),
        default="on",
        help="Prewarm the checkpointer when the state is ready, as the training loop does (off: the first save pays)",
    )
    parser.add_argument(
        "--pinned",
        choices=("default", "on", "off", "both"),
        default="default",
        help="Copy off the GPU through pinned host memory (checkpoint.pinned_host; default: orbax's choice); "
        "'both' alternates on and off and compares",
    )
    parser.add_argument("--name", default=None, help="Results file name (default checkpoint_save or _checksum)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="GPT-2 tiny: checks the script on CPU")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 16)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.saves = args.saves or (1 if args.tiny else 3)
    checksum_settings = {"on": [True], "off": [False], "both": [False, True]}[args.checksums]
    pinned_settings = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[args.pinned]
    settings = [(checksums, pinned) for checksums in checksum_settings for pinned in pinned_settings]

    state, step, described = floats_training(args) if args.floats else gpt2_training(args)

    def timed_steps(state, count):
        times = []
        for _ in range(count):
            start = time.perf_counter()
            state, loss = step(state)
            loss.block_until_ready()
            times.append(time.perf_counter() - start)
        return state, times

    rows = []
    sizes = []
    with tempfile.TemporaryDirectory() as run_dir:
        tasks = {}
        for checksums, pinned in settings:
            config = SaveOnlyConfig()
            config.artifacts.run_dir = str(Path(run_dir) / f"checksums_{checksums}_pinned_{pinned}")
            config.checkpoint.checksums = checksums
            config.checkpoint.pinned_host = pinned
            tasks[checksums, pinned] = SaveOnly(config)
            if args.prewarm == "on":  # as the training loop does once its state is placed
                tasks[checksums, pinned].prewarm_checkpoints({"params": state})
        state, _ = timed_steps(state, 5)  # compile and warm up
        state, baseline = timed_steps(state, args.steps)
        for save in range(args.saves):
            for (checksums, pinned), task in tasks.items():  # alternating, so that each sees the same conditions
                start = time.perf_counter()
                task.save_checkpoint({"params": state}, xax.State(num_steps=save + 1), Cursor(), None)
                blocked = time.perf_counter() - start
                state, during = timed_steps(state, args.steps)
                write_start = time.perf_counter()
                task.wait_for_checkpoint()
                remaining = time.perf_counter() - write_start
                first_half = during[: max(3, args.steps // 2)]
                row: dict[str, Any] = {"save": save + 1}
                if args.checksums == "both":
                    row["checksums"] = "on" if checksums else "off"
                if args.pinned == "both":
                    row["pinned_host"] = "on" if pinned else "off"
                row.update(
                    {
                        "blocked_s": blocked,
                        **phase_columns(task.checkpoint_manager().save_phases, blocked),
                        "step_ms_baseline": 1000 * statistics.median(baseline),
                        "step_ms_during_write": 1000 * statistics.median(first_half),
                        "ratio_during_vs_baseline": statistics.median(first_half) / statistics.median(baseline),
                        "write_left_after_steps_s": remaining,
                    }
                )
                rows.append(row)
        for task in tasks.values():
            files = Path(task.checkpoint_dir).rglob("*")
            sizes.append(sum(f.stat().st_size for f in files if f.is_file()) / args.saves)
            task.on_run_end()
    # The checksums alone, computed and read back (what the device does beside training).
    tree = {"params": state}
    jax.block_until_ready(array_checksums(tree)[1])  # compiled already when a save had checksums
    dispatches, computes = [], []
    for _ in range(3):
        start = time.perf_counter()
        _, checksums = array_checksums(tree)
        dispatches.append(time.perf_counter() - start)
        jax.block_until_ready(checksums)
        computes.append(time.perf_counter() - start)
    dispatch_ms, checksum_s = 1000 * statistics.median(dispatches), statistics.median(computes)
    size = sum(sizes) / len(sizes)
    notes = (
        f"{described}; checkpoint about {size / 2**30:.2f} GiB on disk. Targets: blocked at most 0.2 s, "
        "step time during the background write within 5% of normal. Step times are medians over the first "
        f"half of the {args.steps} steps after each save (when the write is running). The checksums of every "
        f"array alone: {dispatch_ms:.2f} ms to dispatch (what the training thread spends on them), "
        f"{checksum_s:.3f} s until computed (on the device, beside training). Checkpointer prewarmed at the "
        f"start: {args.prewarm}. Pinned host memory for the copy off the device: {args.pinned} "
        f"(orbax {ocp.__version__})."
    )
    name = args.name or ("checkpoint_checksum" if args.checksums == "both" else "checkpoint_save")
    write_results(args.out, name, rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
