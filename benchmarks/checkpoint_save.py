"""How long an asynchronous checkpoint blocks training, and the step time while it is written.

GPT-2 small (124M parameters) with AdamW state (about 1.5 GB in float32), trained with a jitted,
buffer-donating step on random tokens. The save goes through xax's checkpointing mixin (orbax,
asynchronous): the time the call blocks is the device-to-host copy; the write itself then runs
in the background while training continues.

    python -m benchmarks.checkpoint_save --out benchmarks/results
    python -m benchmarks.checkpoint_save --tiny      # a CPU check of the script; no numbers
"""

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import optax

import xax
from benchmarks.common import write_results
from xax.arch.transformer import Transformer, TransformerConfig
from xax.task.mixins.checkpointing import CheckpointingConfig, CheckpointingMixin
from xax.task.mixins.data_loader import Cursor


class SaveOnly(CheckpointingMixin[CheckpointingConfig]):
    """The checkpointing mixin on its own, as the training loop uses it."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="How long an asynchronous checkpoint blocks GPT-2 small training")
    parser.add_argument("--batch", type=int, default=None, help="Sequences per step (default 16; 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="Steps after each save (default 30; 4 with --tiny)")
    parser.add_argument("--saves", type=int, default=None, help="Checkpoints written (default 3; 1 with --tiny)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="GPT-2 tiny: checks the script on CPU")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 16)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.saves = args.saves or (1 if args.tiny else 3)

    base = TransformerConfig.gpt2_tiny() if args.tiny else TransformerConfig.gpt2_small()
    config = base.with_updates(compute_dtype="bfloat16")
    model = Transformer(config, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(params)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, config.max_seq_len + 1), 0, config.vocab_size)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        def loss_fn(params):
            logits, _ = eqx.combine(params, static)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax relies on it (as in xax's step)
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def timed_steps(params, opt_state, count):
        times = []
        for _ in range(count):
            start = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, tokens)
            loss.block_until_ready()
            times.append(time.perf_counter() - start)
        return params, opt_state, times

    params, opt_state, _ = timed_steps(params, opt_state, 5)  # compile and warm up
    params, opt_state, baseline = timed_steps(params, opt_state, args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        task = SaveOnly(CheckpointingConfig())
        task.config.artifacts.run_dir = run_dir
        for save in range(args.saves):
            tree = {"params": params, "opt_state": opt_state}
            start = time.perf_counter()
            task.save_checkpoint(tree, xax.State(num_steps=save + 1), Cursor(), None)
            blocked = time.perf_counter() - start
            params, opt_state, during = timed_steps(params, opt_state, args.steps)
            write_start = time.perf_counter()
            task.wait_for_checkpoint()
            remaining = time.perf_counter() - write_start
            rows.append(
                {
                    "save": save + 1,
                    "blocked_s": blocked,
                    "step_ms_baseline": 1000 * statistics.median(baseline),
                    "step_ms_during_write": 1000 * statistics.median(during[: max(3, args.steps // 2)]),
                    "ratio_during_vs_baseline": statistics.median(during[: max(3, args.steps // 2)])
                    / statistics.median(baseline),
                    "write_left_after_steps_s": remaining,
                }
            )
        size = sum(f.stat().st_size for f in Path(run_dir).rglob("*") if f.is_file()) / args.saves
        task.on_run_end()
    notes = (
        f"{'GPT-2 tiny' if args.tiny else 'GPT-2 small'}, "
        f"{num_params / 1e6:.1f}M parameters + AdamW state, batch {args.batch}x{config.max_seq_len}, "
        f"bf16 compute; checkpoint about {size / 2**30:.2f} GiB on disk. Targets: blocked at most 0.2 s, "
        "step time during the background write within 5% of normal. Step times are medians over the first "
        f"half of the {args.steps} steps after each save (when the write is running)."
    )
    write_results(args.out, "checkpoint_save", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
