"""Quality of examples/mnist_diffusion.py: do its samples look like the digits they were asked for?

Trains the diffusion example (its default config, with any ``key=value`` overrides given after the
options), then the CNN classifier of examples/mnist.py (the configuration ``python -m examples.mnist``
runs, about 99.3% test accuracy), then draws ``--samples-per-class`` guided DDIM samples of every digit
from the diffusion model's EMA weights and reports:

- the fraction of samples that the classifier assigns to the digit they were asked for (target >= 95%);
- the Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate features (the
  hidden layer after its ReLU) of the samples and of the MNIST test set, ``|mu1 - mu2|^2 +
  Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule",
  with this classifier in place of Inception), next to the same distance between 10,000 training digits
  and the test set: the value of samples as good as real data;
- the training and sampling times.

    python -m benchmarks.mnist_diffusion_quality --samples-per-class 1000 --out benchmarks/results
    python -m benchmarks.mnist_diffusion_quality --out /tmp/results model=dit  # the DiT
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jaxtyping import Array, Float, UInt8

from benchmarks.common import environment, write_results
from examples.mnist import CNN, PIXEL_MEAN, PIXEL_STD, MnistClassification
from examples.mnist import Config as ClassifierConfig
from examples.mnist_data import NUM_CLASSES, load_mnist
from examples.mnist_diffusion import (
    Config,
    MnistDiffusion,
    generate,
    load_trained,
    noise_schedule,
    restore_weights,
)
from xax.core.config import load_config
from xax.task.mixins.checkpointing import resolve_checkpoint
from xax.task.mixins.train_step import COMPUTE_DTYPES

# The configuration `python -m examples.mnist` runs: 4 epochs at batch 128.
CLASSIFIER_CONFIG = ClassifierConfig(batch_size=128, max_steps=1875, valid_every_n_steps=625)
# Images per forward pass when classifying, and samples per sampler call (the guided batch is twice that).
EVAL_BATCH, SAMPLE_BATCH = 2000, 1000


def gaussian_statistics(features: Float[np.ndarray, "n d"]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the (unbiased) covariance of feature rows, in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: Float[np.ndarray, " d"],
    sigma1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"],
    sigma2: Float[np.ndarray, "d d"],
) -> float:
    """The Fréchet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` (Dowson & Landau 1982), in float64
    with ``scipy.linalg.sqrtm``. As in the reference FID code, a product too close to singular for the
    square root gets ``1e-6`` added to both diagonals, and the round-off imaginary part is dropped.

    Returns:
        ``d^2``, the quantity FID reports.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = 1e-6 * np.eye(sigma1.shape[0])
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0.0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary part {np.abs(root.imag).max():.3g}; not covariances?")
        root = root.real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


@eqx.filter_jit
def features_and_logits(model: CNN, images: UInt8[Array, "b 28 28"]) -> tuple[Array, Array]:
    """The CNN of examples/mnist.py run up to its 128-d hidden layer (after the ReLU), and its logits from
    there (dropout is off at evaluation, so the head follows directly)."""
    x = (images.astype(jnp.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD

    def pool(h: Array) -> Array:
        c, height, width = h.shape
        return h.reshape(c, height // 2, 2, width // 2, 2).max(axis=(2, 4))

    def one(image: Float[Array, "28 28"]) -> Array:
        h = pool(jax.nn.relu(model.conv1(image[None])))  # (C, 14, 14)
        h = pool(jax.nn.relu(model.conv2(h)))  # (2C, 7, 7)
        return jax.nn.relu(model.hidden(h.reshape(-1)))  # (hidden,)

    features = jax.vmap(one)(x)
    return features, jax.vmap(model.head)(features)


def classify(model: CNN, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64) and predicted classes of uint8 images, in batches."""
    features, predictions = [], []
    for start in range(0, len(images), EVAL_BATCH):
        f, logits = features_and_logits(model, jnp.asarray(images[start : start + EVAL_BATCH]))
        features.append(np.asarray(f, np.float64))
        predictions.append(np.asarray(jnp.argmax(logits, axis=-1)))
    return np.concatenate(features), np.concatenate(predictions)


def log_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and the validation records of a run's log.jsonl."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    valid = [r for r in records if r["phase"] == "valid" and "loss" in r["scalars"]]
    return train, valid


def train_classifier(run_dir: Path) -> tuple[CNN, float, float]:
    """Trains examples/mnist.py's classifier; returns it (from its final checkpoint), its test accuracy and
    the seconds the launch took."""
    start = time.perf_counter()
    MnistClassification.launch(CLASSIFIER_CONFIG, argv=[f"artifacts.run_dir={run_dir}"])
    seconds = time.perf_counter() - start
    config = CLASSIFIER_CONFIG
    template = CNN(config.channels, config.hidden, config.dropout, key=jax.random.key(0))
    directory, steps = resolve_checkpoint(run_dir)
    model = eqx.nn.inference_mode(restore_weights(template, directory, steps[0]))
    _, valid = log_records(run_dir)
    return model, float(valid[-1]["scalars"]["accuracy"]), seconds


def draw_samples(run_dir: Path, config: Config, per_class: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``per_class`` samples of every digit from the EMA weights of the run's final checkpoint; returns the
    uint8 images, their requested labels and the sampling seconds (compilation excluded)."""
    model, config = load_trained(run_dir, config)
    dtype = jnp.dtype(COMPUTE_DTYPES[config.precision.compute_dtype])
    schedule = noise_schedule(config)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
    size = min(SAMPLE_BATCH, len(labels))
    padded = np.concatenate([labels, labels[: -len(labels) % size]])  # whole batches: one compilation

    def call(batch: np.ndarray, index: int) -> Array:
        key = jax.random.fold_in(jax.random.key(config.seed + 1), index)
        return generate(model, schedule, jnp.asarray(batch), key, config.guidance_scale, config.sampling_steps, dtype)

    jax.block_until_ready(call(padded[:size], 0))  # compiles
    start = time.perf_counter()
    images = [call(padded[i : i + size], i // size) for i in range(0, len(padded), size)]
    images = np.concatenate([np.asarray(batch) for batch in images])[: len(labels)]
    return images, labels, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples-per-class", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs-dir", type=Path, default=None, help="Keep the two runs here (default: a temp dir)")
    args, overrides = parser.parse_known_args()
    config = load_config(Config, Config(), overrides)
    with tempfile.TemporaryDirectory() as temp:
        runs = args.runs_dir or Path(temp)
        diffusion_dir = runs / "mnist_diffusion"
        start = time.perf_counter()
        MnistDiffusion.launch(config, argv=[f"artifacts.run_dir={diffusion_dir}"])
        diffusion_seconds = time.perf_counter() - start
        train, valid = log_records(diffusion_dir)
        classifier, classifier_accuracy, classifier_seconds = train_classifier(runs / "mnist_classifier")
        images, labels, sampling_seconds = draw_samples(diffusion_dir, config, args.samples_per_class)

    test = load_mnist("test").with_format("numpy")[:]
    test_features, test_predictions = classify(classifier, test["image"])
    check = float(np.mean(test_predictions == test["label"]))
    if abs(check - classifier_accuracy) > 1e-3:  # the feature path must be the classifier itself
        raise RuntimeError(f"feature path accuracy {check:.4f} != logged test accuracy {classifier_accuracy:.4f}")
    reference = load_mnist("train").with_format("numpy")[: len(test_features)]["image"]
    sample_features, predictions = classify(classifier, images)
    per_class = [float(np.mean(predictions[labels == c] == c)) for c in range(NUM_CLASSES)]
    test_stats = gaussian_statistics(test_features)
    fd = frechet_distance(*gaussian_statistics(sample_features), *test_stats)
    fd_reference = frechet_distance(*gaussian_statistics(classify(classifier, reference)[0]), *test_stats)
    rows: list[dict[str, Any]] = [
        {
            "metric": "samples classified as their class",
            "value": float(np.mean(predictions == labels)),
            "target": ">= 0.95",
        },
        {"metric": "worst class (digit)", "value": f"{min(per_class):.4f} ({int(np.argmin(per_class))})", "target": ""},
        {"metric": "Fréchet distance, samples vs test (classifier features)", "value": fd, "target": "low"},
        {
            "metric": f"Fréchet distance, {len(reference)} train digits vs test",
            "value": fd_reference,
            "target": "floor",
        },
        {"metric": "classifier test accuracy", "value": classifier_accuracy, "target": ">= 0.99"},
        {"metric": "diffusion final valid loss (EMA)", "value": float(valid[-1]["scalars"]["loss"]), "target": ""},
        {"metric": "diffusion training steps", "value": int(train[-1]["step"]), "target": ""},
        {"metric": "diffusion training time (s, launch to exit)", "value": diffusion_seconds, "target": ""},
        {
            "metric": "diffusion time to first step (s)",
            "value": train[0]["scalars"]["time_to_first_step_s"],
            "target": "",
        },
        {"metric": "classifier training time (s, launch to exit)", "value": classifier_seconds, "target": ""},
        {"metric": f"sampling time (s, {len(images)} samples)", "value": sampling_seconds, "target": ""},
    ]
    notes = (
        f"Diffusion config: model={config.model}, batch {config.batch_size}, {config.max_steps} steps, "
        f"{config.precision.compute_dtype}, EMA {config.ema.decay}, guidance {config.guidance_scale}, "
        f"{config.sampling_steps} DDIM steps; overrides: {' '.join(overrides) or 'none'}. "
        f"{args.samples_per_class} samples per class."
    )
    write_results(args.out, "mnist_diffusion_quality", environment(), rows, notes)


if __name__ == "__main__":
    main()
