"""The MNIST diffusion example: short real runs of the UNet and the DiT, sampling from a checkpoint, and the
Fréchet distance of the quality benchmark."""

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageSequence
from typing_extensions import override

import xax
from benchmarks.mnist_diffusion_quality import frechet_distance, gaussian_statistics
from examples.mnist_diffusion import Config, MnistDiffusion
from tests.task.loggers.test_tensorboard import read_events, tag_values
from tests.task.toy import read_jsonl

NUM_PER_CLASS = 2
TILE = 28 + 2  # a 28-pixel digit and the grid's 2-pixel gap
# Small enough to compile and learn something in a few dozen CPU steps.
TINY = (
    "batch_size=16",
    "valid_batch_size=64",
    "max_steps=30",
    "valid_every_n_steps=30",
    "optim.lr=2e-3",
    "optim.warmup_steps=5",
    "ema.decay=0.8",
    "precision.compute_dtype=float32",
    "sampling_steps=4",
    f"num_per_class={NUM_PER_CLASS}",
    "log.every_n_steps=10",
    "log.every_n_seconds=null",
    "log.heavy_every_n_seconds=null",  # media at the step cadence only, however slow the machine
    "log.heavy_every_n_steps=30",
    # One device: the launchers have their own tests, and a replicated checkpoint on four simulated CPU
    # devices costs seconds of per-shard slicing.
    "launcher.kind=single_device",
)
TINY_UNET = (
    "unet.base_channels=8",
    "unet.channel_mults=[1,2]",
    "unet.num_res_blocks=1",
    "unet.attention_levels=[]",  # the middle block still attends
    "unet.num_heads=2",
    "unet.norm_groups=4",
)
TINY_DIT = (
    "model=dit",
    "dit.patch_size=4",
    "dit.d_model=32",
    "dit.num_layers=2",
    "dit.num_heads=2",
    "optim.lr=5e-3",
)


class SmallMnistDiffusion(MnistDiffusion):
    """The example on the first 512 training and 64 test digits."""

    @override
    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        return super().get_dataset(phase).select(range(512 if phase == "train" else 64))


def launch(run_dir: Path, *overrides: str) -> xax.State:
    return SmallMnistDiffusion.launch(
        Config(), argv=[f"artifacts.run_dir={run_dir}", "log.stdout=false", *TINY, *overrides]
    )


def _check_run(run_dir: Path) -> np.ndarray:
    """Asserts the loss fell and a 10-row grid was logged; returns the grid's pixels."""
    records = read_jsonl(run_dir / "log.jsonl")
    train = [r["scalars"]["loss"] for r in records if r["phase"] == "train"]
    valid = [r["scalars"]["loss"] for r in records if r["phase"] == "valid" and "loss" in r["scalars"]]
    # A fresh network predicts eps = 0 (its output layer starts at zero): a mean squared error of 1.
    assert train[0] > 0.7 and train[-1] < 0.6 * train[0]
    assert len(valid) == 1 and valid[0] < 0.6
    png = np.asarray(PILImage.open(run_dir / "samples" / "step_30.png"))
    height, width, _ = png.shape
    assert width == NUM_PER_CLASS * TILE + 2
    # Ten rows of the same height (a digit, the label strip and the gap) and a 2-pixel border.
    assert (height - 2) % 10 == 0 and (height - 2) // 10 > TILE
    ((step, value),) = tag_values(read_events(run_dir / "tensorboard" / "valid"))["samples"]
    assert step == 30 and (value.image.height, value.image.width) == (height, width)
    logged = np.asarray(PILImage.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(logged, png[..., :3])
    # The denoising video: one frame per sampling step (4), a row of one sample of each digit.
    ((step, video),) = tag_values(read_events(run_dir / "tensorboard" / "valid"))["denoising"]
    assert step == 30 and (video.image.height, video.image.width) == (TILE + 2, 10 * TILE + 2)
    gif = PILImage.open(io.BytesIO(video.image.encoded_image_string))
    frames = [np.asarray(frame.convert("L"), np.float64) for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == 4
    # The last frame holds the grid's first column (exactly: grey digits need fewer than GIF's 256 colours).
    firsts = np.concatenate([png[2 + row * (height - 2) // 10 :][:28, 2:30, 0] for row in range(10)], axis=1)
    lasts = np.concatenate([frames[-1][2:30, 2 + i * TILE : 2 + i * TILE + 28] for i in range(10)], axis=1)
    np.testing.assert_array_equal(lasts, firsts)
    return png


def test_unet_learns_logs_a_grid_and_samples_from_its_checkpoint(tmp_path: Path) -> None:
    launch(tmp_path / "train", *TINY_UNET)
    logged = _check_run(tmp_path / "train")
    # Model settings come from the checkpoint: no unet.* overrides here.
    out = tmp_path / "grid.png"
    launch(tmp_path / "sample", "mode=sample", f"resume={tmp_path / 'train'}", f"out={out}")
    # The EMA weights, key and settings of the last logged grid, float32 throughout: the same pixels.
    np.testing.assert_array_equal(np.asarray(PILImage.open(out)), logged)


def test_dit_learns_and_logs_a_grid(tmp_path: Path) -> None:
    launch(tmp_path, *TINY_DIT)
    _check_run(tmp_path)


def test_config_mistakes_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for item, message in (
        ("model=vae", "model='vae' is not one of ['dit', 'unet']"),
        ("sampling_steps=2000", "sampling_steps=2000 must lie in [1, diffusion_steps=1000]"),
        ("unet.num_classes=5", "unet.num_classes=5 must be 10"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            launch(tmp_path / item.split("=")[0], item)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch(tmp_path / "sample", "mode=sample")
    assert "mode=sample needs resume=" in capsys.readouterr().err


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form() -> None:
    # With diagonal covariances the matrices commute: d = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 4.0, size=16), rng.uniform(0.1, 4.0, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_of_full_covariances_matches_the_symmetric_form() -> None:
    # Tr sqrtm(S1 S2) = Tr sqrtm(S1^1/2 S2 S1^1/2), the latter symmetric: computed here by eigendecomposition.
    rng = np.random.default_rng(1)
    features1 = rng.normal(size=(4000, 8)) @ rng.normal(size=(8, 8))
    features2 = rng.normal(size=(3000, 8)) @ rng.normal(size=(8, 8)) + 0.5
    (mu1, s1), (mu2, s2) = gaussian_statistics(features1), gaussian_statistics(features2)
    np.testing.assert_allclose(mu1, features1.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s1, np.cov(features1, rowvar=False), rtol=1e-12)

    def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T

    root1 = sqrt_psd(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(root1 @ s2 @ root1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
