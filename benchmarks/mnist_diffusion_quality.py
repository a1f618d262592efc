"""Quality of examples/mnist_diffusion.py: do its samples look like the digits they were asked for?

Trains the diffusion example (its default config, with any ``key=value`` overrides given after the
options), then the CNN classifier of examples/mnist.py (the configuration ``python -m examples.mnist``
runs, about 99.3% test accuracy), then draws ``--samples-per-class`` guided DDIM samples of every digit
from the diffusion model's EMA weights, at the config's guidance scale and at each of
``--guidance-scales``, and reports for each:

- the fraction of samples that the classifier assigns to the digit they were asked for (target >= 95%);
- the Fréchet distance between Gaussians fitted to the classifier's 128-d penultimate features (the
  hidden layer after its ReLU) of the samples and of the MNIST test set, ``|mu1 - mu2|^2 +
  Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule",
  with this classifier in place of Inception), next to the same distance between 10,000 training digits
  and the test set: the value of samples as good as real data;
- the sampling time; the notes give the training times.

    python -m benchmarks.mnist_diffusion_quality --samples-per-class 1000 --out benchmarks/results
    python -m benchmarks.mnist_diffusion_quality --out /tmp/results model=dit  # the DiT
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
import scipy.linalg
from jaxtyping import Array, Float, UInt8

import xax
from benchmarks.common import write_results
from examples.mnist import CNN, PIXEL_MEAN, PIXEL_STD, MnistClassification
from examples.mnist import Config as ClassifierConfig
from examples.mnist_data import NUM_CLASSES, load_mnist
from examples.mnist_diffusion import (
    Config,
    Denoiser,
    MnistDiffusion,
    generate,
    load_trained,
    noise_schedule,
)
from xax.checkpoint import resolve_checkpoint, restore_weights
from xax.nn import COMPUTE_DTYPES

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
    # A feature constant in both sets (a ReLU unit that never fires) adds only its mean difference; leaving it
    # out of the covariances keeps their product from being exactly singular.
    active = (np.diagonal(sigma1) > 0) | (np.diagonal(sigma2) > 0)
    sigma1 = np.asarray(sigma1, np.float64)[np.ix_(active, active)]
    sigma2 = np.asarray(sigma2, np.float64)[np.ix_(active, active)]
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
    from xax import read_history

    records = read_history(run_dir)
    train = [r for r in records if r["phase"] == "train"]
    valid = [r for r in records if r["phase"] == "valid" and "loss" in r["scalars"]]
    return train, valid


def test_reference(
    classifier: CNN, classifier_accuracy: float
) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray], float]:
    """The MNIST test set, its feature statistics, and the Fréchet distance of as many training digits
    to them (the floor a generator can reach), after checking that the feature path classifies the
    test set as the trained classifier did."""
    test = load_mnist("test").with_format("numpy")[:]
    test_features, test_predictions = classify(classifier, test["image"])
    check = float(np.mean(test_predictions == test["label"]))
    if abs(check - classifier_accuracy) > 1e-3:  # the feature path must be the classifier itself
        raise RuntimeError(f"feature path accuracy {check:.4f} != logged test accuracy {classifier_accuracy:.4f}")
    test_stats = gaussian_statistics(test_features)
    train = load_mnist("train").with_format("numpy")[: len(test_features)]["image"]
    fd_train = frechet_distance(*gaussian_statistics(classify(classifier, train)[0]), *test_stats)
    return test, test_stats, fd_train


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


def draw_samples(
    model: Denoiser, config: Config, per_class: int, guidance: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """``per_class`` guided samples of every digit; returns the uint8 images, their requested labels and the
    sampling seconds (compilation excluded)."""
    dtype = jnp.dtype(COMPUTE_DTYPES[config.precision.compute_dtype])
    schedule = noise_schedule(config)
    scale = jnp.asarray(guidance, jnp.float32)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
    size = min(SAMPLE_BATCH, len(labels))
    padded = np.concatenate([labels, labels[: -len(labels) % size]])  # whole batches: one compilation

    def call(batch: np.ndarray, index: int) -> Array:
        key = jax.random.fold_in(jax.random.key(config.seed + 1), index)
        return generate(model, schedule, jnp.asarray(batch), key, scale, config.sampling_steps, dtype)

    jax.block_until_ready(call(padded[:size], 0))  # compiles
    start = time.perf_counter()
    images = [call(padded[i : i + size], i // size) for i in range(0, len(padded), size)]
    images = np.concatenate([np.asarray(batch) for batch in images])[: len(labels)]
    return images, labels, time.perf_counter() - start


def sample_quality(
    model: Denoiser,
    config: Config,
    classifier: CNN,
    test_stats: tuple[np.ndarray, np.ndarray],
    per_class: int,
    guidance: float,
) -> dict[str, Any]:
    """Class accuracy, worst class and Fréchet distance to the test set of samples at one guidance scale."""
    images, labels, seconds = draw_samples(model, config, per_class, guidance)
    features, predictions = classify(classifier, images)
    per_digit = [float(np.mean(predictions[labels == c] == c)) for c in range(NUM_CLASSES)]
    return {
        "guidance": guidance,
        "classified as asked (>= 0.95)": float(np.mean(predictions == labels)),
        "worst digit": f"{min(per_digit):.4f} ({int(np.argmin(per_digit))})",
        "Fréchet distance to test": frechet_distance(*gaussian_statistics(features), *test_stats),
        "sampling s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples-per-class", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs-dir", type=Path, default=None, help="Keep the two runs here (default: a temp dir)")
    parser.add_argument(
        "--guidance-scales",
        type=float,
        nargs="*",
        default=[1.0, 1.5, 2.0, 3.0],
        help="Guidance scales evaluated besides the config's (about 11 s each on an H100)",
    )
    args, overrides = parser.parse_known_args()
    config = xax.load_config(Config, Config(), overrides)
    with tempfile.TemporaryDirectory() as temp:
        runs = args.runs_dir or Path(temp)
        diffusion_dir = runs / "mnist_diffusion"
        start = time.perf_counter()
        MnistDiffusion.launch(config, argv=[f"artifacts.run_dir={diffusion_dir}"])
        diffusion_seconds = time.perf_counter() - start
        train, valid = log_records(diffusion_dir)
        classifier, classifier_accuracy, classifier_seconds = train_classifier(runs / "mnist_classifier")
        model, config = load_trained(diffusion_dir, config)

    test, test_stats, fd_reference = test_reference(classifier, classifier_accuracy)
    scales = [config.guidance_scale, *(s for s in args.guidance_scales if s != config.guidance_scale)]
    rows = [sample_quality(model, config, classifier, test_stats, args.samples_per_class, s) for s in scales]
    first = train[0]["scalars"]["time_to_first_step_s"]
    notes = (
        f"{args.samples_per_class} samples per digit, {config.sampling_steps}-step DDIM from the EMA weights; the "
        f"first row is the config's guidance scale. Fréchet distance on the 128-d penultimate features of "
        f"examples/mnist.py's CNN (test accuracy {classifier_accuracy:.4f}); {len(test['image'])} training digits "
        f"against the test set give {fd_reference:.2f}, the value of samples as good as real data.\n\n"
        f"Diffusion run: model={config.model}, batch {config.batch_size}, {train[-1]['step']} steps, "
        f"{config.precision.compute_dtype}, EMA {config.ema.decay}; overrides: {' '.join(overrides) or 'none'}. "
        f"Training took {diffusion_seconds:.0f} s from launch to exit ({first:.0f} s to the first step, with "
        f"compilation; final validation loss {valid[-1]['scalars']['loss']:.4f}); the classifier "
        f"{classifier_seconds:.0f} s."
    )
    write_results(args.out, "mnist_diffusion_quality", rows, notes)


if __name__ == "__main__":
    main()
