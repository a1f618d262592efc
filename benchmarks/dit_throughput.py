"""DiT-B/2 training throughput: xax's Task loop against a hand-written JAX loop and PyTorch.

All three train the same class-conditional denoiser (DiT-B/2 on 32x32x4 latents: 256 tokens, 12
blocks 768 wide, adaLN-Zero) with the same loss (eps prediction on a linear 1000-step schedule, one
random step per sample, labels dropped to the null label 10% of the time for classifier-free
guidance), bfloat16 compute, float32 weights and AdamW, batch 256, on random latents held on the
device:

- ``xax``: a ``xax.Task`` with arch's ``DiT`` (cuDNN attention) and ``diffusion_loss``, fed from an
  in-memory Hugging Face dataset (device-resident), with default logging; steps per second from
  the JSONL ``elapsed_time_s`` of the first record at or after ``--warmup`` and the last one.
- ``jax``: ``benchmarks.dit_reference``, a DiT written by hand in plain JAX (no xax model code:
  per-block weight dictionaries, batched ``(B, T, D)`` layers, ``jax.nn.dot_product_attention``),
  with the same loss in a jitted step that donates the weights, optimizer state and PRNG key and
  gathers its batch from the device-resident latents.
- ``torch``: ``benchmarks.torch_models.DiT`` with ``torch.compile`` (model and loss), flash
  attention through ``F.scaled_dot_product_attention``, bf16 autocast and fused AdamW.

Each loop runs in a process of its own, one after the other on the same GPU. MFU counts
``6 (N_token T + N_image) + 12 L T^2 d`` FLOPs per image: N_token the parameters applied to every
token, N_image those applied once per image (timestep MLP, adaLN modulations), attention's score
and value products, against the H100's dense bf16 peak of 989 TFLOP/s.

    python -m benchmarks.dit_throughput --steps 300 --warmup 50 --out benchmarks/results
    python -m benchmarks.dit_throughput --tiny    # a CPU check of the script (a minute or two); no numbers
"""

import argparse
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
from datasets.table import InMemoryTable
from jaxtyping import Array, Float, Int, PRNGKeyArray
from typing_extensions import override

import xax
from benchmarks import dit_reference
from benchmarks.common import reference_attention, steps_per_second_after, write_results
from benchmarks.gpt2_throughput import (
    PEAK_FLOPS,
    add_common_args,
    common_child_args,
    resolve_common_args,
    run_children,
    time_steps,
    time_torch_training,
    torch_adamw,
    torch_device_setup,
    xax_argv,
)
from xax.arch import DiT, DiTConfig, dit_config, num_tokens
from xax.arch.diffusion import GaussianSchedule, diffusion_loss, drop_labels

# Ho & Salimans (2022)'s probability of training on the null label.
LABEL_DROP = 0.1


@dataclass(frozen=True)
class Setup:
    """What the three loops share.

    Attributes:
        model: The DiT's shape.
        batch: Images per optimizer step (256, DiT's global batch).
        num_samples: Random latents in the (device-resident) training set.
        learning_rate: AdamW's constant learning rate, DiT's 1e-4.
        weight_decay: 0, as DiT trains.
        schedule_steps: Steps of the linear noise schedule (Ho et al. 2020's 1000).
    """

    model: DiTConfig
    batch: int
    num_samples: int
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    schedule_steps: int = 1000


def make_setup(tiny: bool, attention: str) -> Setup:
    """The benchmark's sizes; ``attention`` is the JAX attention implementation ("cudnn", "xla", "auto")."""
    impl = None if attention == "auto" else attention
    if tiny:
        model = dit_config(
            "DiT-S/2",
            input_size=8,
            d_model=32,
            num_layers=2,
            num_heads=2,
            num_classes=10,
            frequency_dim=16,
            attention_impl=impl,
        )
        return Setup(model=model, batch=8, num_samples=64)
    return Setup(model=dit_config("DiT-B/2", attention_impl=impl), batch=256, num_samples=2048)


def random_latents(setup: Setup, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal float32 latents (N, C * H * W) and int32 labels (N,)."""
    cfg = setup.model
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((setup.num_samples, cfg.in_channels * cfg.input_size**2), dtype=np.float32)
    labels = rng.integers(0, cfg.num_classes or 1, setup.num_samples, dtype=np.int32)
    return latents, labels


def latents_dataset(latents: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """An in-memory Hugging Face dataset: "latents" (fixed-length float32 lists) and "label" (int32)."""
    width = latents.shape[1]
    features = datasets.Features(
        {"latents": datasets.List(datasets.Value("float32"), length=width), "label": datasets.Value("int32")}
    )
    table = pa.table(
        {
            "latents": pa.FixedSizeListArray.from_arrays(pa.array(latents.reshape(-1)), width),
            "label": pa.array(labels),
        }
    )
    fingerprint = hashlib.sha256(latents.tobytes() + labels.tobytes()).hexdigest()[:32]
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features), fingerprint=fingerprint)


def dit_loss(
    model: DiT,
    latents: Float[Array, "batch chw"],
    labels: Int[Array, " batch"],
    key: PRNGKeyArray,
    schedule: GaussianSchedule,
) -> Array:
    """The eps-prediction loss with label dropout; the same code in xax's and the JAX loop.

    The model computes in the dtype of its weights (cast before the call); the noising and the
    squared error stay float32.
    """
    cfg = model.config
    drop_key, loss_key = jax.random.split(key)
    x0 = latents.reshape(-1, cfg.in_channels, cfg.input_size, cfg.input_size)  # (B, C, H, W)
    y = drop_labels(labels, drop_key, LABEL_DROP, model.null_label)
    dtype = model.patch_embed.weight.dtype

    def denoiser(x_t: Array, t: Array) -> Array:
        return jax.vmap(model)(x_t.astype(dtype), t, y).astype(jnp.float32)

    return diffusion_loss(denoiser, schedule, x0, loss_key)


def make_optimizer(setup: Setup) -> optax.GradientTransformation:
    return optax.adamw(setup.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=setup.weight_decay)


def make_schedule(setup: Setup) -> GaussianSchedule:
    return GaussianSchedule.from_name("linear", setup.schedule_steps)


def flops_per_image(setup: Setup) -> float:
    """``6 (N_token T + N_image) + 12 L T^2 d`` (see the module docstring); the class table is a lookup."""
    model = eqx.filter_eval_shape(DiT, setup.model, key=jax.random.key(0))
    per_image = sum(
        math.prod(leaf.shape)
        for part in (model.time_embed, model.blocks.modulation, model.final.modulation)
        for leaf in jax.tree.leaves(part)
    )
    blocks = model.blocks
    per_token = sum(
        math.prod(leaf.shape)
        for part in (model.patch_embed, blocks.qkv, blocks.proj, blocks.mlp, model.final.linear)
        for leaf in jax.tree.leaves(part)
    )
    cfg, tokens = setup.model, num_tokens(setup.model)
    return 6 * (per_token * tokens + per_image) + 12 * cfg.num_layers * tokens**2 * cfg.d_model


# ---- the three loops ---------------------------------------------------------------------------


@dataclass
class Config(xax.Config):
    tiny: bool = xax.field(False, help="Tiny model and batch (a CPU check of the benchmark)")
    attention: str = xax.field("cudnn", help="Attention implementation: cudnn, xla or auto")


class DiTThroughput(xax.Task[Config]):
    """DiT-B/2 on random latents: the loss only, as the hand-written loop computes."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.setup = make_setup(config.tiny, config.attention)
        # Built here, outside any trace, so the step closes over concrete tables.
        self.schedule = make_schedule(self.setup)

    @override
    def get_model(self, params: xax.InitParams) -> DiT:
        return DiT(self.setup.model, key=params.key)

    @override
    def get_optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.setup)

    @override
    def compute_loss_and_metrics(
        self, model: DiT, batch: dict[str, Array], state: xax.State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, xax.Metric]]:
        return dit_loss(model, batch["latents"], batch["label"], key, self.schedule), {}

    @override
    def batch_columns(self) -> tuple[str, ...]:
        return ("latents", "label")

    @override
    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        latents, labels = random_latents(self.setup)
        if phase != "train":
            latents, labels = latents[: self.setup.batch], labels[: self.setup.batch]
        return latents_dataset(latents, labels)


def run_xax(args: argparse.Namespace) -> float:
    setup = make_setup(args.tiny, args.jax_attention)
    with tempfile.TemporaryDirectory() as run_dir:
        DiTThroughput.launch(
            Config(batch_size=setup.batch, tiny=args.tiny, attention=args.jax_attention),
            argv=xax_argv(run_dir, args.steps, args.warmup),
        )
        return steps_per_second_after(Path(run_dir), args.warmup)


def reference_shape(cfg: DiTConfig) -> dit_reference.DiTShape:
    """The hand-written reference's sizes for an xax DiT config."""
    return dit_reference.DiTShape(
        cfg.input_size,
        cfg.patch_size,
        cfg.in_channels,
        cfg.d_model,
        cfg.num_layers,
        cfg.num_heads,
        cfg.mlp_ratio,
        cfg.num_classes or 1,
        cfg.frequency_dim,
    )


def run_jax(args: argparse.Namespace) -> float:
    setup = make_setup(args.tiny, args.jax_attention)
    shape = reference_shape(setup.model)
    params = dit_reference.init_params(shape, jax.random.key(0))
    optimizer = make_optimizer(setup)
    opt_state = optimizer.init(params)
    step = dit_reference.make_train_step(shape, optimizer, reference_attention(args.jax_attention))
    latents_np, labels_np = random_latents(setup)
    latents, labels = jax.device_put(latents_np), jax.device_put(labels_np)
    rng = np.random.default_rng(1)
    state = [params, opt_state, jax.random.key(1)]

    def one_step(_: int) -> Array:
        indices = rng.integers(0, setup.num_samples, setup.batch, dtype=np.int32)
        state[0], state[1], state[2], loss = step(*state, latents, labels, indices)
        return loss

    return time_steps(one_step, jax.block_until_ready, args.steps, args.warmup)


def run_torch(args: argparse.Namespace) -> float:
    import torch

    from benchmarks.torch_models import DiT as TorchDiT
    from benchmarks.torch_models import DiTShape
    from benchmarks.torch_models import diffusion_loss as torch_diffusion_loss

    setup = make_setup(args.tiny, args.jax_attention)
    device, attention = torch_device_setup(args.torch_sdpa)
    cfg = setup.model
    shape = DiTShape(
        cfg.input_size,
        cfg.patch_size,
        cfg.in_channels,
        cfg.d_model,
        cfg.num_layers,
        cfg.num_heads,
        cfg.mlp_ratio,
        cfg.num_classes or 1,
        cfg.frequency_dim,
    )
    torch.manual_seed(0)
    model = TorchDiT(shape).to(device)
    optimizer = torch_adamw(model, setup.learning_rate, (0.9, 0.999), setup.weight_decay)
    alpha_bar = torch.tensor(np.asarray(make_schedule(setup).alpha_bar), device=device)
    latents_np, labels_np = random_latents(setup)
    image = (cfg.in_channels, cfg.input_size, cfg.input_size)
    latents = torch.from_numpy(latents_np).view(-1, *image).to(device)
    labels = torch.from_numpy(labels_np).long().to(device)

    @torch.compile
    def loss_fn(x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch_diffusion_loss(model, x0, y, alpha_bar, LABEL_DROP)

    return time_torch_training(
        lambda rows: loss_fn(latents[rows], labels[rows]),
        optimizer,
        setup.num_samples,
        setup.batch,
        device,
        attention,
        args,
    )


RUNNERS: dict[str, Callable[[argparse.Namespace], float]] = {"xax": run_xax, "jax": run_jax, "torch": run_torch}


def report(args: argparse.Namespace, rates: dict[str, float | None]) -> None:
    setup = make_setup(args.tiny, args.jax_attention)
    per_image = flops_per_image(setup)
    available = [rate for loop, rate in rates.items() if loop != "xax" and rate is not None]
    best_other = max(available) if available else None
    xax_rate = rates.get("xax")
    rows = []
    for loop, rate in rates.items():
        if rate is None:
            rows.append({"loop": loop, "images_per_s": "failed", "step_ms": "", "mfu": "", "xax_over_this": ""})
            continue
        rows.append(
            {
                "loop": loop,
                "images_per_s": rate * setup.batch,
                "step_ms": 1000.0 / rate,
                "mfu": rate * setup.batch * per_image / PEAK_FLOPS,
                "xax_over_this": "" if xax_rate is None else xax_rate / rate,
            }
        )
    versus = (
        ""
        if xax_rate is None or best_other is None
        else f" xax over the better alternative: {xax_rate / best_other:.3f}x."
    )
    cfg = setup.model
    notes = (
        f"DiT ({cfg.num_layers} blocks, width "
        f"{cfg.d_model}, patch {cfg.patch_size}) on {cfg.input_size}x{cfg.input_size}x{cfg.in_channels} latents, "
        f"batch {setup.batch}, bf16 compute, AdamW (lr {setup.learning_rate}, weight decay {setup.weight_decay}); "
        "eps prediction, linear "
        f"{setup.schedule_steps}-step schedule, label drop {LABEL_DROP}; JAX attention '{args.jax_attention}', "
        f"PyTorch attention '{args.torch_sdpa}'. "
        f"Steps {args.warmup}..{args.steps} timed, each loop in its own process. MFU: {per_image / 1e9:.1f} GFLOP "
        f"per image over {PEAK_FLOPS / 1e12:.0f} TFLOP/s.{versus} Targets: xax at least 2,900 images/s and at "
        "least 1.1x the better alternative."
    )
    write_results(args.out, "dit_throughput", rows, notes, tiny=args.tiny)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DiT-B/2 training throughput: xax, JAX and PyTorch")
    add_common_args(parser, steps=300, warmup=50)
    args = parser.parse_args(argv)
    loops = resolve_common_args(args, steps=300, warmup=50)
    if args.child is not None:
        rate = RUNNERS[args.child](args)
        args.result_file.write_text(json.dumps({"steps_per_s": rate}))
        return
    # The table is rewritten after each loop, so a run cut short keeps the loops that finished.
    rates: dict[str, float | None] = {}
    for loop in loops:
        rates.update(run_children("benchmarks.dit_throughput", [loop], common_child_args(args)))
        report(args, rates)


if __name__ == "__main__":
    main()
