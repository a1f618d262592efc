"""GPT-2 small training throughput: xax's Task loop against a hand-written JAX loop and PyTorch.

All three train the same model (GPT-2 small: 124M parameters, sequence 1024, vocabulary 50257, tied
embeddings) on the same kind of data (random token windows, held on the device, a batch gathered
by index each step) with bfloat16 compute, float32 weights and AdamW, batch 16:

- ``xax``: a ``xax.Task`` with arch's ``Transformer`` (cuDNN attention, scanned layers) fed from an
  in-memory Hugging Face dataset, so xax's device-resident data path is used, with default logging
  (stdout, JSONL, TensorBoard, CPU and GPU stats). Steps per second come from the JSONL
  ``elapsed_time_s`` of the first record at or after ``--warmup`` and the last one, at ``--steps``.
- ``jax``: ``benchmarks.gpt2_reference``, GPT-2 written by hand in plain JAX (no xax model code, as
  nanoGPT writes it), in a jitted step that donates the weights and optimizer state and gathers its
  batch from the device-resident windows. Its logits are bf16 and its cross-entropy float32, as
  PyTorch's under autocast; ``--loss`` chooses xax's loss only.
- ``torch``: ``benchmarks.torch_models.GPT`` (nanoGPT's layout) with ``torch.compile``, flash
  attention through ``F.scaled_dot_product_attention(is_causal=True)``, bf16 autocast and
  ``torch.optim.AdamW(fused=True)``.

Each loop runs in a process of its own, one after the other on the same GPU, so that neither
framework's allocator holds memory the next one needs. MFU counts ``6 N + 12 L T d`` FLOPs per
token (N: parameters without the position table, whose lookup does no matmul; the second term is
attention's score and value products) against the H100's dense bf16 peak of 989 TFLOP/s.

    python -m benchmarks.gpt2_throughput --steps 500 --warmup 100 --out benchmarks/results
    python -m benchmarks.gpt2_throughput --tiny    # a CPU check of the script (a minute or two); no numbers
"""

import argparse
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import equinox as eqx
import jax
import numpy as np
import optax
import pyarrow as pa
from datasets.table import InMemoryTable
from jaxtyping import Array, Int, PRNGKeyArray
from typing_extensions import override

import xax
from benchmarks import gpt2_reference
from benchmarks.common import (
    quiet_run_argv,
    reference_attention,
    run_child_processes,
    steps_per_second_after,
    write_results,
)
from xax.arch import Transformer, TransformerConfig, count_params
from xax.nn import chunked_cross_entropy, cross_entropy, projected_cross_entropy

LOOPS = ("xax", "jax", "torch")
# The H100 SXM's dense bfloat16 tensor-core peak.
PEAK_FLOPS = 989e12
# "full": float32 logits (B, T, V), then the cross-entropy; "chunked": xax's chunked_cross_entropy,
# 1024 tokens at a time, recomputing each chunk's logits in the backward pass.
# "projected": xax's projected_cross_entropy (vocabulary padded to a multiple of 128 for the GEMMs,
# float32 logits); "projected_bf16": the same with bfloat16 logits, as torch.autocast computes them.
LOSSES = ("full", "chunked", "projected", "projected_bf16")
SDPA_BACKENDS = ("flash", "cudnn", "auto")
JAX_ATTENTION = ("cudnn", "xla", "auto")


@dataclass(frozen=True)
class Setup:
    """What the three loops share.

    Attributes:
        model: The model's shape and dtype policy.
        batch: Windows per optimizer step.
        num_windows: Random token windows in the (device-resident) training set.
        learning_rate: AdamW's constant learning rate (nanoGPT's for GPT-2 small).
        betas: AdamW's (beta1, beta2), nanoGPT's.
        weight_decay: Decoupled weight decay, applied to every parameter in all three loops.
    """

    model: TransformerConfig
    batch: int
    num_windows: int
    learning_rate: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1


def make_setup(tiny: bool, attention: str) -> Setup:
    """The benchmark's sizes; ``attention`` is the JAX attention implementation ("cudnn", "xla", "auto")."""
    if tiny:
        model = TransformerConfig.gpt2_tiny().with_updates(compute_dtype="bfloat16", attention_impl=attention)
        return Setup(model=model, batch=4, num_windows=64)
    model = TransformerConfig.gpt2_small().with_updates(compute_dtype="bfloat16", attention_impl=attention)
    return Setup(model=model, batch=16, num_windows=2048)


def token_windows(setup: Setup, seed: int = 0) -> np.ndarray:
    """Random int32 windows (num_windows, max_seq_len + 1): inputs and their next-token targets."""
    shape = (setup.num_windows, setup.model.max_seq_len + 1)
    return np.random.default_rng(seed).integers(0, setup.model.vocab_size, shape, dtype=np.int32)


def windows_dataset(windows: np.ndarray) -> datasets.Dataset:
    """The windows as an in-memory Hugging Face dataset with one fixed-length int32 column, "tokens"."""
    length = windows.shape[1]
    features = datasets.Features({"tokens": datasets.List(datasets.Value("int32"), length=length)})
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), length)})
    # A fingerprint of the contents spares ``datasets`` hashing every row.
    fingerprint = hashlib.sha256(windows.tobytes()).hexdigest()[:32]
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features), fingerprint=fingerprint)


def gpt2_loss(model: Transformer, tokens: Int[Array, "batch seq_plus_one"], loss: str) -> Array:
    """Mean next-token cross-entropy of windows of ``T + 1`` tokens; the same code in xax's and the JAX loop."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T), (B, T)
    if loss == "chunked":
        hidden, _ = model.hidden_states(inputs)  # (B, T, D)
        return chunked_cross_entropy(hidden, model.unembedding(), targets)
    if loss in ("projected", "projected_bf16"):
        hidden, _ = model.hidden_states(inputs)  # (B, T, D)
        return projected_cross_entropy(hidden, model.unembedding(), targets, float32_logits=loss == "projected")
    logits, _ = model(inputs)  # (B, T, V) float32
    return cross_entropy(logits, targets)


def make_optimizer(setup: Setup) -> optax.GradientTransformation:
    b1, b2 = setup.betas
    return optax.adamw(setup.learning_rate, b1=b1, b2=b2, eps=1e-8, weight_decay=setup.weight_decay)


def flops_per_token(setup: Setup, num_params: int) -> float:
    """``6 N + 12 L T d``: N the parameters without the position table (a lookup, no matmul)."""
    cfg = setup.model
    matmul_params = num_params - cfg.max_seq_len * cfg.d_model
    return 6 * matmul_params + 12 * cfg.num_layers * cfg.max_seq_len * cfg.d_model


# ---- shared by the throughput benchmarks --------------------------------------------------------


def time_steps(step: Callable[[int], Any], sync: Callable[[Any], None], steps: int, warmup: int) -> float:
    """Steps per second of ``step(i)`` for i in [warmup, steps), after ``warmup`` untimed steps.

    Args:
        step: Runs step ``i`` (asynchronously) and returns something ``sync`` can wait on.
        sync: Waits until the device has finished what was handed to it.
        steps: The last step.
        warmup: Steps (compilation included) before the clock starts.

    Returns:
        Steps per second over the timed steps.
    """
    out: Any = None
    start = time.perf_counter()
    for i in range(steps):
        out = step(i)
        if i + 1 == warmup:
            sync(out)
            start = time.perf_counter()
    sync(out)
    return (steps - warmup) / (time.perf_counter() - start)


def xax_argv(run_dir: str, steps: int, warmup: int) -> list[str]:
    """Command-line overrides of an xax benchmark run (``quiet_run_argv``'s) in bfloat16, with a
    logging window ending exactly at ``warmup`` (every 100 steps, xax's default, when it divides)."""
    return [
        *quiet_run_argv(run_dir, steps),
        f"log.every_n_steps={math.gcd(100, warmup)}",
        "precision.compute_dtype=bfloat16",
    ]


def run_children(module: str, loops: Sequence[str], child_args: list[str]) -> dict[str, float | None]:
    """Runs each loop in a fresh process of ``module`` (``--child LOOP``); None marks a loop that failed."""

    def env(loop: str) -> dict[str, str]:
        # JAX, imported by the shared module, would otherwise reserve most of the GPU's memory for
        # itself as soon as anything touches a device, and PyTorch would run out of it.
        return {"JAX_PLATFORMS": "cpu"} if loop == "torch" else {}

    results = run_child_processes(module, loops, child_args, extra_env=env)
    return {loop: None if result is None else float(result["steps_per_s"]) for loop, result in results.items()}


def add_common_args(parser: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    parser.add_argument("--steps", type=int, default=None, help=f"Last timed step (default {steps}; 8 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help=f"Untimed steps first (default {warmup}; 2 --tiny)")
    parser.add_argument("--which", default=",".join(LOOPS), help="Comma-separated loops to run, of xax,jax,torch")
    parser.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true", help="Tiny model and batch: checks the script on CPU")
    parser.add_argument("--torch-sdpa", choices=SDPA_BACKENDS, default="flash", help="PyTorch attention kernel")
    parser.add_argument(
        "--jax-attention",
        choices=JAX_ATTENTION,
        default=None,
        help="JAX attention of xax's and the JAX loop (default cudnn, which fails rather than falls back; auto --tiny)",
    )
    parser.add_argument("--child", choices=LOOPS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)


def resolve_common_args(args: argparse.Namespace, steps: int, warmup: int) -> list[str]:
    """Fills the defaults that depend on ``--tiny``, checks the values and returns the loops to run."""
    args.steps = args.steps if args.steps is not None else (8 if args.tiny else steps)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else warmup)
    if args.jax_attention is None:
        args.jax_attention = "auto" if args.tiny else "cudnn"
    if not 0 < args.warmup < args.steps:
        raise SystemExit(f"error: need 0 < --warmup < --steps, got --warmup {args.warmup} --steps {args.steps}")
    loops = [name.strip() for name in args.which.split(",") if name.strip()]
    unknown = sorted(set(loops) - set(LOOPS))
    if unknown or not loops:
        raise SystemExit(f"error: --which {args.which!r} names {unknown or 'no loop'}; use a subset of {LOOPS}")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="xax_bench_tiny_")) if args.tiny else Path("benchmarks/results")
    return loops


def common_child_args(args: argparse.Namespace) -> list[str]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--torch-sdpa", args.torch_sdpa]
    flags += ["--jax-attention", args.jax_attention]
    return [*flags, "--tiny"] if args.tiny else flags


def torch_device_setup(sdpa: str) -> tuple[Any, Any]:
    """The torch device and a context manager that picks the attention kernel on CUDA.

    Returns:
        ``(device, context factory)``; on CPU the context does nothing.
    """
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        return torch.device("cpu"), contextlib.nullcontext
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    backends = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION]}
    if sdpa == "auto":
        return torch.device("cuda"), contextlib.nullcontext
    return torch.device("cuda"), lambda: sdpa_kernel(backends[sdpa])


# ---- the three loops ---------------------------------------------------------------------------


@dataclass
class Config(xax.Config):
    tiny: bool = xax.field(False, help="Tiny model and batch (a CPU check of the benchmark)")
    attention: str = xax.field("cudnn", help="Attention implementation: cudnn, xla or auto")
    loss: str = xax.field("projected_bf16", help=f"The loss, one of {LOSSES} (see LOSSES)")


class GPT2Throughput(xax.Task[Config]):
    """GPT-2 small on random token windows: the loss only, as the hand-written loop computes."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.setup = make_setup(config.tiny, config.attention)

    @override
    def validate_config(self) -> None:
        if self.config.loss not in LOSSES:
            raise xax.ConfigError(f"loss={self.config.loss!r} is not one of {list(LOSSES)}")
        super().validate_config()

    @override
    def get_model(self, params: xax.InitParams) -> Transformer:
        return Transformer(self.setup.model, key=params.key)

    @override
    def get_optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.setup)

    @override
    def compute_loss_and_metrics(
        self, model: Transformer, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, xax.Metric]]:
        return gpt2_loss(model, batch["tokens"], self.config.loss), {}

    @override
    def batch_columns(self) -> tuple[str, ...]:
        return ("tokens",)

    @override
    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        windows = token_windows(self.setup)
        return windows_dataset(windows if phase == "train" else windows[: self.setup.batch])


def run_xax(args: argparse.Namespace) -> float:
    setup = make_setup(args.tiny, args.jax_attention)
    with tempfile.TemporaryDirectory() as run_dir:
        GPT2Throughput.launch(
            Config(batch_size=setup.batch, tiny=args.tiny, attention=args.jax_attention, loss=args.loss),
            argv=xax_argv(run_dir, args.steps, args.warmup),
        )
        return steps_per_second_after(Path(run_dir), args.warmup)


def reference_shape(cfg: TransformerConfig) -> gpt2_reference.GPTShape:
    """The hand-written reference's sizes for an xax GPT-2 config."""
    return gpt2_reference.GPTShape(
        cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.norm_eps
    )


def run_jax(args: argparse.Namespace) -> float:
    setup = make_setup(args.tiny, args.jax_attention)
    shape = reference_shape(setup.model)
    params = gpt2_reference.init_params(shape, jax.random.key(0))
    optimizer = make_optimizer(setup)
    opt_state = optimizer.init(params)
    step = gpt2_reference.make_train_step(shape, optimizer, reference_attention(args.jax_attention))
    windows = jax.device_put(token_windows(setup))
    rng = np.random.default_rng(1)
    state = [params, opt_state]

    def one_step(_: int) -> Array:
        indices = rng.integers(0, setup.num_windows, setup.batch, dtype=np.int32)
        state[0], state[1], loss = step(state[0], state[1], windows, indices)
        return loss

    return time_steps(one_step, jax.block_until_ready, args.steps, args.warmup)


def run_torch(args: argparse.Namespace) -> float:
    import torch

    from benchmarks.torch_models import GPT, GPTShape

    setup = make_setup(args.tiny, args.jax_attention)
    device, attention = torch_device_setup(args.torch_sdpa)
    cfg = setup.model
    shape = GPTShape(cfg.vocab_size, cfg.max_seq_len, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.norm_eps)
    torch.manual_seed(0)
    model = GPT(shape).to(device)
    optimizer = torch_adamw(model, setup.learning_rate, setup.betas, setup.weight_decay)
    loss_fn = torch.compile(model.loss)
    windows = torch.from_numpy(token_windows(setup)).long().to(device)
    return time_torch_training(
        lambda rows: loss_fn(windows[rows]), optimizer, setup.num_windows, setup.batch, device, attention, args
    )


def torch_adamw(model: Any, learning_rate: float, betas: tuple[float, float], weight_decay: float) -> Any:
    """PyTorch's fused AdamW (one kernel for all parameters) with eps 1e-8, as optax's default."""
    import torch

    return torch.optim.AdamW(
        model.parameters(), lr=learning_rate, betas=betas, eps=1e-8, weight_decay=weight_decay, fused=True
    )


def time_torch_training(
    loss_of_rows: Callable[[Any], Any],
    optimizer: Any,
    num_rows: int,
    batch: int,
    device: Any,
    attention: Callable[[], Any],
    args: argparse.Namespace,
) -> float:
    """Steps per second of a PyTorch training loop: each step draws ``batch`` random rows on the
    device, computes ``loss_of_rows(rows)`` under bf16 autocast and ``attention()`` (the SDPA backend),
    then runs the backward pass and the optimizer."""
    import torch

    def one_step(_: int) -> None:
        rows = torch.randint(0, num_rows, (batch,), device=device)
        with attention(), torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of_rows(rows)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync(_: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    return time_steps(one_step, sync, args.steps, args.warmup)


RUNNERS: dict[str, Callable[[argparse.Namespace], float]] = {"xax": run_xax, "jax": run_jax, "torch": run_torch}


def report(args: argparse.Namespace, rates: dict[str, float | None]) -> None:
    setup = make_setup(args.tiny, args.jax_attention)
    num_params = count_params(eqx.filter_eval_shape(Transformer, setup.model, key=jax.random.key(0)))
    tokens_per_step = setup.batch * setup.model.max_seq_len
    per_token = flops_per_token(setup, num_params)
    xax_rate = rates.get("xax")
    rows = []
    for loop, rate in rates.items():
        if rate is None:
            rows.append({"loop": loop, "tokens_per_s": "failed", "step_ms": "", "mfu": "", "xax_over_this": ""})
            continue
        tokens_per_s = rate * tokens_per_step
        rows.append(
            {
                "loop": loop,
                "tokens_per_s": tokens_per_s,
                "step_ms": 1000.0 / rate,
                "mfu": tokens_per_s * per_token / PEAK_FLOPS,
                "xax_over_this": "" if xax_rate is None else xax_rate / rate,
            }
        )
    cfg = setup.model
    name = "GPT-2 tiny" if args.tiny else "GPT-2 small"
    notes = (
        f"{name}, {num_params / 1e6:.1f}M parameters, batch {setup.batch}x{cfg.max_seq_len}, vocabulary "
        f"{cfg.vocab_size}, bf16 compute, AdamW "
        f"(lr {setup.learning_rate}, betas {setup.betas}, weight decay {setup.weight_decay}); xax's loss '{args.loss}' "
        "(the hand-written JAX GPT-2 of benchmarks/gpt2_reference.py: bf16 logits, float32 cross-entropy), "
        f"attention '{args.jax_attention}'; PyTorch attention '{args.torch_sdpa}'. Steps {args.warmup}..{args.steps} "
        f"timed, each loop in its own process. MFU: {per_token / 1e9:.3f} GFLOP per token (6N + 12LTd) over "
        f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s. "
        "Targets: xax at least 480k tokens/s and at least 1.2x PyTorch (torch.compile), ahead of the hand-written JAX."
    )
    write_results(args.out, "gpt2_throughput", rows, notes, tiny=args.tiny)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GPT-2 small training throughput: xax, JAX and PyTorch")
    add_common_args(parser, steps=500, warmup=100)
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default="projected_bf16",
        help="Loss of xax's loop; the default computes bf16 logits, as PyTorch's loop and the hand-written JAX "
        "GPT-2 do",
    )
    args = parser.parse_args(argv)
    loops = resolve_common_args(args, steps=500, warmup=100)
    if args.child is not None:
        rate = RUNNERS[args.child](args)
        args.result_file.write_text(json.dumps({"steps_per_s": rate}))
        return
    rates = run_children("benchmarks.gpt2_throughput", loops, [*common_child_args(args), "--loss", args.loss])
    report(args, rates)


if __name__ == "__main__":
    main()
