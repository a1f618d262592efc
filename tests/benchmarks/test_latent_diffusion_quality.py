"""The latent diffusion quality benchmark's CPU check (``--tiny``): both stages, the classifier and the
sampling run end to end, and the table holds one row per guidance scale with its measures in range."""

from pathlib import Path

import numpy as np
import pytest

from benchmarks import latent_diffusion_quality
from benchmarks.latent_diffusion_quality import caption_ids
from examples.latent_text import DIGIT_WORDS, TEMPLATES
from tests.benchmarks.results import read_results


def test_caption_ids_ask_for_every_digit_equally_with_every_template() -> None:
    ids = caption_ids(8)
    digits, templates = ids % len(DIGIT_WORDS), ids // len(DIGIT_WORDS)
    assert np.bincount(digits).tolist() == [8] * 10
    assert np.bincount(templates).tolist() == [8 * 10 // len(TEMPLATES)] * len(TEMPLATES)


@pytest.mark.slow
# The tiny classifier's 16 features are nearly degenerate: scipy warns that their covariance product is
# singular, and frechet_distance then adds the reference code's 1e-6 to the diagonals.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_latent_diffusion_quality_tiny(tmp_path: Path) -> None:
    latent_diffusion_quality.main(
        ["--tiny", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), "--guidance-scales", "1", "3"]
    )
    rows = read_results(tmp_path / "out", "latent_diffusion_quality_tiny")
    assert [row["guidance"] for row in rows] == [2.0, 1.0, 3.0]  # the config's scale first
    for row in rows:
        assert 0.0 <= row["classified as captioned (>= 0.90)"] <= 1.0
        assert np.isfinite(row["Fréchet distance to test"]) and row["Fréchet distance to test"] >= 0
    assert (tmp_path / "runs" / "vae" / "latents" / "train.json").is_file()
    assert "TINY" in (tmp_path / "out" / "latent_diffusion_quality_tiny.md").read_text()
