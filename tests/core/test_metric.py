"""Tests for metric types and their conversion to host values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.core.metric import (
    Histogram,
    Image,
    Images,
    LogHistogram,
    LogImage,
    LogScalar,
    LogText,
    Scalar,
    Text,
)


def test_scalar_to_log_averages_elements() -> None:
    assert Scalar(jnp.float32(2.5)).to_log() == LogScalar(2.5)
    assert Scalar(jnp.array([1.0, 2.0, 6.0])).to_log() == LogScalar(3.0)
    assert Scalar(3).to_log().value == 3.0
    assert isinstance(Scalar(jnp.bfloat16(1.5)).to_log().value, float)


def test_histogram_to_log_flattens_to_float32() -> None:
    log = Histogram(jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)).to_log()
    assert isinstance(log, LogHistogram)
    assert log.values.dtype == np.float32
    np.testing.assert_array_equal(log.values, np.arange(6, dtype=np.float32))


def test_text_to_log() -> None:
    assert Text("hello").to_log() == LogText("hello")


def test_image_float_is_scaled_and_clipped_to_uint8_rgb() -> None:
    pixels = jnp.array([[0.0, 0.5], [1.0, 2.0]], dtype=jnp.float32)
    log = Image(pixels).to_log()
    assert isinstance(log, LogImage)
    assert log.pixels.dtype == np.uint8
    assert log.pixels.shape == (2, 2, 3)
    np.testing.assert_array_equal(log.pixels[..., 0], np.array([[0, 128], [255, 255]], dtype=np.uint8))
    # Grayscale is repeated over the three channels.
    np.testing.assert_array_equal(log.pixels[..., 0], log.pixels[..., 2])


def test_image_uint8_and_rgba_are_kept() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(Image(rgb).to_log().pixels, rgb)
    rgba = np.full((2, 2, 4), 7, dtype=np.uint8)
    np.testing.assert_array_equal(Image(rgba).to_log().pixels, rgba)
    assert Image(np.zeros((4, 5, 1), dtype=np.float32)).to_log().pixels.shape == (4, 5, 3)


def test_image_nan_becomes_black() -> None:
    log = Image(np.array([[np.nan, 1.0]], dtype=np.float32)).to_log()
    np.testing.assert_array_equal(log.pixels[0, :, 0], [0, 255])


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((2, 2, 2), dtype=np.uint8), "shape"),
        (np.zeros((2, 2), dtype=np.int32), "dtype int32"),
    ],
)
def test_image_rejects_bad_pixels(pixels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Image(pixels)


def test_image_rejects_wrong_rank() -> None:
    # Under the test suite's jaxtyping hook the annotation catches this first (a TypeError).
    with pytest.raises((ValueError, TypeError), match="pixels"):
        Image(np.zeros((5,), dtype=np.uint8))


def test_images_grid_shape_without_labels() -> None:
    # 5 tiles of 4x6 at 3 per row: 2 rows x 3 columns, 2 px padding around every cell.
    pixels = np.ones((5, 4, 6), dtype=np.float32)
    grid = Images(pixels, max_per_row=3).to_log().pixels
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    # Five white tiles on a black canvas.
    assert int((grid == 255).all(axis=-1).sum()) == 5 * 4 * 6
    # The sixth cell (row 1, column 2) is empty.
    assert not grid[8:12, 18:24].any()


def test_images_single_row_when_fewer_than_max_per_row() -> None:
    grid = Images(np.zeros((2, 3, 3, 3), dtype=np.uint8), max_per_row=8).to_log().pixels
    assert grid.shape == (3 + 4, 2 * (3 + 2) + 2, 3)


def test_images_labels_are_drawn_under_tiles() -> None:
    pixels = np.zeros((4, 8, 8), dtype=np.float32)
    plain = Images(pixels, max_per_row=2).to_log().pixels
    labelled = Images(pixels, labels=("0", "1", "2", "3"), max_per_row=2).to_log().pixels
    assert labelled.shape[0] > plain.shape[0]
    # Black tiles: every lit pixel is label text.
    assert labelled.any()
    other = Images(pixels, labels=("7", "7", "7", "7"), max_per_row=2).to_log().pixels
    assert not np.array_equal(labelled, other)


def test_images_cells_widen_for_long_labels() -> None:
    pixels = np.zeros((2, 4, 4), dtype=np.float32)
    narrow = Images(pixels, labels=("a", "b")).to_log().pixels
    wide = Images(pixels, labels=("a long label", "b")).to_log().pixels
    assert wide.shape[1] > narrow.shape[1]


def test_images_rejects_wrong_label_count() -> None:
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        Images(np.zeros((3, 4, 4), dtype=np.float32), labels=("a", "b"))


def test_metrics_pass_through_jit() -> None:
    @jax.jit
    def step(x: jax.Array) -> dict:
        return {
            "loss": Scalar(jnp.mean(x)),
            "hist": Histogram(x),
            "image": Image(x[0]),
            "grid": Images(x, labels=("a", "b"), max_per_row=1),
            "text": Text("sample"),
        }

    x = jnp.linspace(0.0, 1.0, 2 * 3 * 4).reshape(2, 3, 4)
    out = step(x)
    assert isinstance(out["loss"].value, jax.Array)
    assert out["grid"].labels == ("a", "b")
    assert out["grid"].max_per_row == 1
    host = jax.device_get(out)
    assert host["loss"].to_log().value == pytest.approx(0.5)
    assert host["image"].to_log().pixels.shape == (3, 4, 3)
    assert host["grid"].to_log().pixels.shape[0] > 2 * 3
    assert host["text"].to_log() == LogText("sample")
    np.testing.assert_allclose(host["hist"].to_log().values, np.asarray(x).reshape(-1), rtol=1e-6)
