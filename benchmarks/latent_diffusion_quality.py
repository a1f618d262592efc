"""Quality of examples/latent_diffusion.py: do its samples show the digit their caption names?

Trains stage 1 (the VAE, then the latents of MNIST in ArrayRecord shards) and stage 2 (the text-conditioned
mmDiT on them) at the sizes below, then the CNN classifier of examples/mnist.py (about 99.3% test accuracy),
then draws ``--samples-per-class`` samples of every digit from the mmDiT's EMA weights, their captions
cycling over the templates ("a handwritten seven", "the digit seven", ...), decoded by the VAE, at the
config's guidance scale and at each of ``--guidance-scales``, and reports for each:

- the fraction of samples that the classifier assigns to the digit of their caption (target >= 90%);
- the Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate features of the
  samples and of the MNIST test set (as benchmarks/mnist_diffusion_quality.py, whose code this reuses),
  next to two references: 10,000 training digits (samples as good as real data) and the VAE's
  reconstructions of the test set (the best the latents allow);
- the sampling time; the notes give the training times.

    python -m benchmarks.latent_diffusion_quality --out benchmarks/results   # about 5 minutes on one H100
    python -m benchmarks.latent_diffusion_quality --tiny --out /tmp/ld       # a CPU check of the whole path
"""

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from typing_extensions import override

import xax
from benchmarks.common import write_results
from benchmarks.mnist_diffusion_quality import (
    classify,
    frechet_distance,
    gaussian_statistics,
    log_records,
    test_reference,
)
from examples.latent_diffusion import Config, LatentDiffusion, TextToImage, reconstruct
from examples.latent_text import DIGIT_WORDS, TEMPLATES
from examples.mnist import CNN, MnistClassification
from examples.mnist import Config as ClassifierConfig
from examples.mnist_data import NUM_CLASSES
from xax.checkpoint import resolve_checkpoint, restore_weights
from xax.nn import cast_floating

# Stage 1: 3,000 steps at batch 128 (6.4 epochs); stage 2: 8,000 steps at batch 256 (34 epochs of latents).
STAGE1 = ("stage=1", "max_steps=3000", "valid_every_n_steps=1000", "log.heavy_every_n_steps=1000", "warmup_steps=200")
STAGE2 = ("stage=2", "batch_size=256", "max_steps=8000", "valid_every_n_steps=2000", "log.heavy_every_n_steps=4000")
# The configuration `python -m examples.mnist` runs: 4 epochs at batch 128.
CLASSIFIER = ClassifierConfig(batch_size=128, max_steps=1875, valid_every_n_steps=625)
# The CPU check: tiny models on the first digits, a few steps each.
TINY_COMMON = (
    "precision.compute_dtype=float32", "batch_size=32", "valid_batch_size=64", "warmup_steps=2",
    "launcher.kind=single_device",
)  # fmt: skip
TINY_STAGE1 = (
    "stage=1",
    "max_steps=6",
    "valid_every_n_steps=6",
    "autoencoder.base_channels=8",
    "autoencoder.norm_groups=4",
)
TINY_STAGE2 = (
    "stage=2", "max_steps=6", "valid_every_n_steps=6", "mmdit.d_model=32", "mmdit.num_layers=2", "mmdit.num_heads=2",
    "text_width=16", "sampling_steps=3", "num_per_class=2",
)  # fmt: skip
TINY_CLASSIFIER = ClassifierConfig(batch_size=64, max_steps=20, valid_every_n_steps=20, channels=4, hidden=16)
TINY_DIGITS = (512, 128)
SAMPLE_BATCH = 1000  # samples per sampler call (the guided batch is twice that)


class Benchmarked(LatentDiffusion):
    """The example, keeping each launched task (and, for --tiny, training on the first digits only)."""

    launched: list[LatentDiffusion] = []  # noqa: RUF012  (the tasks of this process, in order)
    digits: tuple[int, int] | None = None

    @override
    def get_dataset(self, phase: xax.Phase) -> Any:
        dataset = super().get_dataset(phase)
        if self.config.stage == 1 and self.digits is not None:
            return dataset.select(range(self.digits[0] if phase == "train" else self.digits[1]))
        return dataset

    @override
    def on_run_start(self) -> None:
        Benchmarked.launched.append(self)
        super().on_run_start()


def train_classifier(run_dir: Path, config: ClassifierConfig) -> tuple[CNN, float, float]:
    """Trains examples/mnist.py's classifier; returns it (final checkpoint), its test accuracy and seconds."""
    start = time.perf_counter()
    MnistClassification.launch(config, argv=[f"artifacts.run_dir={run_dir}", "log.stdout=false"])
    seconds = time.perf_counter() - start
    template = CNN(config.channels, config.hidden, config.dropout, key=jax.random.key(0))
    directory, steps = resolve_checkpoint(run_dir)
    model = eqx.nn.inference_mode(restore_weights(template, directory, steps[0]))
    return model, float(log_records(run_dir)[1][-1]["scalars"]["accuracy"]), seconds


def trained_model(task: LatentDiffusion) -> TextToImage:
    """The stage-2 model of a finished run: its EMA weights, in its compute dtype."""
    directory, steps = resolve_checkpoint(task.run_dir)
    template = task.get_model(xax.InitParams(key=jax.random.key(0)))
    model = restore_weights(template, directory, steps[0])
    assert isinstance(model, TextToImage)
    arrays, static = eqx.partition(eqx.nn.inference_mode(cast_floating(model, task.compute_dtype)), eqx.is_array)
    # On the devices of the run's mesh, as the VAE that decodes its samples.
    return eqx.combine(jax.device_put(arrays, task.replicated_sharding()), static)


def caption_ids(per_class: int) -> np.ndarray:
    """``per_class`` caption ids of every digit, the templates taking turns."""
    digits = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
    templates = np.tile(np.arange(per_class, dtype=np.int32) % len(TEMPLATES), NUM_CLASSES)
    return templates * len(DIGIT_WORDS) + digits


def draw_samples(
    task: LatentDiffusion, model: TextToImage, ids: np.ndarray, guidance: float
) -> tuple[np.ndarray, float]:
    """uint8 samples of caption ids in whole batches (one compilation); returns them and the seconds
    sampling took, compilation excluded."""
    size = min(SAMPLE_BATCH, len(ids))
    padded = np.concatenate([ids, ids[: -len(ids) % size]])

    def call(index: int) -> np.ndarray:
        key = jax.random.fold_in(jax.random.key(task.config.seed + 1), index)
        return task.sample(model, padded[index : index + size], key, guidance, keep=size)[0]

    call(0)  # compiles
    start = time.perf_counter()
    images = np.concatenate([call(i) for i in range(0, len(padded), size)])[: len(ids)]
    return images, time.perf_counter() - start


def sample_quality(
    task: LatentDiffusion, model: TextToImage, classifier: CNN, test_stats: tuple, per_class: int, guidance: float
) -> dict[str, Any]:
    """Caption accuracy, worst digit and Fréchet distance to the test set at one guidance scale."""
    ids = caption_ids(per_class)
    images, seconds = draw_samples(task, model, ids, guidance)
    features, predictions = classify(classifier, images)
    digits = ids % len(DIGIT_WORDS)
    per_digit = [float(np.mean(predictions[digits == c] == c)) for c in range(NUM_CLASSES)]
    return {
        "guidance": guidance,
        "classified as captioned (>= 0.90)": float(np.mean(predictions == digits)),
        "worst digit": f"{min(per_digit):.4f} ({int(np.argmin(per_digit))})",
        "Fréchet distance to test": frechet_distance(*gaussian_statistics(features), *test_stats),
        "sampling s": seconds,
    }


def launch_stage(run_dir: Path, config: Config, *overrides: str) -> tuple[LatentDiffusion, float]:
    start = time.perf_counter()
    Benchmarked.launch(config, argv=[f"artifacts.run_dir={run_dir}", "log.stdout=false", *overrides])
    return Benchmarked.launched[-1], time.perf_counter() - start


def references(task: LatentDiffusion, classifier: CNN, classifier_accuracy: float) -> tuple[tuple, float, float]:
    """The test set's feature statistics, and the Fréchet distances of training digits and of the VAE's
    reconstructions of the test set to it."""
    test, test_stats, fd_train = test_reference(classifier, classifier_accuracy)
    vae = task.stage1_vae()
    recon = np.concatenate(
        [
            np.asarray(reconstruct(vae, jnp.asarray(test["image"][i : i + SAMPLE_BATCH])))
            for i in range(0, len(test["image"]), SAMPLE_BATCH)
        ]
    )
    fd_recon = frechet_distance(*gaussian_statistics(classify(classifier, recon)[0]), *test_stats)
    return test_stats, fd_train, fd_recon


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--samples-per-class", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs-dir", type=Path, default=None, help="Keep the three runs here (default: a temp dir)")
    parser.add_argument("--guidance-scales", type=float, nargs="*", default=[1.0, 3.0, 4.0])
    parser.add_argument("--tiny", action="store_true", help="A CPU check: tiny models, a few steps, few samples")
    args, overrides = parser.parse_known_args(argv)
    stage1, stage2, classifier_config = STAGE1, STAGE2, CLASSIFIER
    per_class = args.samples_per_class
    if args.tiny:
        Benchmarked.digits = TINY_DIGITS
        stage1, stage2 = (*TINY_COMMON, *TINY_STAGE1), (*TINY_COMMON, *TINY_STAGE2)
        classifier_config, per_class = TINY_CLASSIFIER, min(per_class, 4)
    with tempfile.TemporaryDirectory() as temp:
        runs = args.runs_dir or Path(temp)
        vae_task, vae_seconds = launch_stage(runs / "vae", Config(), *stage1, *overrides)
        task, mmdit_seconds = launch_stage(
            runs / "mmdit", Config(), *stage2, f"latents={runs / 'vae' / 'latents'}", *overrides
        )
        train, valid = log_records(runs / "mmdit")
        vae_valid = log_records(runs / "vae")[1]
        classifier, classifier_accuracy, classifier_seconds = train_classifier(runs / "classifier", classifier_config)
        model = trained_model(task)
        test_stats, fd_train, fd_recon = references(task, classifier, classifier_accuracy)
        config = task.config
        scales = [config.guidance_scale, *(s for s in args.guidance_scales if s != config.guidance_scale)]
        rows = [sample_quality(task, model, classifier, test_stats, per_class, s) for s in scales]
    first = train[0]["scalars"]["time_to_first_step_s"]
    vae = vae_task.config.autoencoder
    notes = (
        f"{per_class} samples per digit, captions cycling over the {len(TEMPLATES)} templates, "
        f"{config.sampling_steps}-step {config.sampler} sampling of the flow from the EMA weights, decoded by the "
        f"stage-1 VAE; the first row is the config's guidance scale. Fréchet distance on the "
        f"{classifier_config.hidden}-d penultimate "
        f"features of examples/mnist.py's CNN (test accuracy {classifier_accuracy:.4f}): 10000 training digits "
        f"against the test set give {fd_train:.2f} (samples as good as real data), the VAE's reconstructions of "
        f"the test set {fd_recon:.2f} (the best its latents allow).\n\n"
        f"Stage 1 (VAE {vae.channel_mults}, {vae.base_channels} channels, KL weight {vae_task.config.kl_weight}): "
        f"{' '.join(stage1)}; {vae_seconds:.0f} s from launch to exit, latents written "
        f"(final reconstruction error {vae_valid[-1]['scalars']['reconstruction']:.2f} per digit on the test set). "
        f"Stage 2 (mmDiT {config.mmdit.d_model} wide, {config.mmdit.num_layers} blocks, {config.mmdit.num_heads} "
        f"heads; the default frozen text encoder): {' '.join(stage2)}, {train[-1]['step']} steps, "
        f"{config.precision.compute_dtype}, EMA {config.ema.decay}; {mmdit_seconds:.0f} s from launch to exit "
        f"({first:.0f} s to the first step, with compilation; final validation loss "
        f"{valid[-1]['scalars']['loss']:.4f}); the classifier {classifier_seconds:.0f} s. Overrides: "
        f"{' '.join(overrides) or 'none'}."
    )
    write_results(args.out, "latent_diffusion_quality", rows, notes, tiny=args.tiny)


if __name__ == "__main__":
    main()
