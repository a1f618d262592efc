"""Tests for metric types and their conversion to host values."""

import io
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageSequence

from xax.core.metric import (
    Audio,
    Histogram,
    Image,
    Images,
    LogAudio,
    LogHistogram,
    LogImage,
    LogScalar,
    LogText,
    LogVideo,
    Scalar,
    Text,
    Tokens,
    Video,
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


ALPHABET = "abcdefgh"


def decode(ids: list[int]) -> str:
    return "".join(ALPHABET[i] for i in ids)


def test_tokens_are_decoded_on_the_host_one_paragraph_per_sequence() -> None:
    assert Tokens(jnp.array([0, 1, 2]), decode).to_log() == LogText("abc")
    assert Tokens(np.array([[7, 0], [3, 3]], np.int64), decode).to_log() == LogText("ha\n\ndd")

    @jax.jit
    def sample(x: jax.Array) -> Tokens:
        return Tokens(jnp.argsort(x), decode)  # ids made inside the step; decode stays static

    assert jax.device_get(sample(jnp.array([3.0, 1.0, 2.0]))).to_log() == LogText("bca")
    with pytest.raises(ValueError, match=r"Tokens ids must be integers of shape \(L,\) or \(N, L\); got float32"):
        Tokens(jnp.zeros(3), decode)


def read_wav(data: bytes) -> tuple[int, int, np.ndarray]:
    """(channels, sample rate, int16 samples (T, C)) of a WAV file, read with the standard library."""
    with wave.open(io.BytesIO(data), "rb") as wav:
        assert wav.getsampwidth() == 2
        frames = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
        return wav.getnchannels(), wav.getframerate(), frames.reshape(-1, wav.getnchannels())


def test_audio_becomes_clipped_float32_and_a_16_bit_wav() -> None:
    mono = Audio(jnp.array([0.0, 0.5, -0.5, 2.0, -3.0, jnp.nan]), sample_rate=8000).to_log()
    assert isinstance(mono, LogAudio) and mono.sample_rate == 8000
    np.testing.assert_array_equal(mono.samples[:, 0], np.array([0.0, 0.5, -0.5, 1.0, -1.0, 0.0], np.float32))
    channels, rate, pcm = read_wav(mono.wav_bytes())
    assert (channels, rate) == (1, 8000)
    np.testing.assert_array_equal(pcm[:, 0], [0, 16384, -16384, 32767, -32767, 0])  # round(x * 32767)

    t = np.arange(100) / 16000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.cos(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    channels, rate, pcm = read_wav(Audio(stereo, sample_rate=16000).to_log().wav_bytes())
    assert (channels, rate, pcm.shape) == (2, 16000, (100, 2))
    np.testing.assert_allclose(pcm / 32767.0, stereo, atol=0.5 / 32767 + 1e-7)  # one rounding


@pytest.mark.parametrize(
    ("samples", "rate", "message"),
    [
        (
            np.zeros((4, 3)),
            8000,
            r"Audio samples must have shape \(T,\) or \(T, C\) with C in 1, 2 and T > 0; got \(4, 3\)",
        ),
        (np.zeros(0), 8000, r"got \(0,\)"),
        (np.zeros(4), 0, "Audio sample_rate must be positive, got 0"),
    ],
)
def test_bad_audio_is_refused(samples: np.ndarray, rate: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Audio(samples, sample_rate=rate)


def test_video_becomes_uint8_frames_and_a_looping_gif() -> None:
    frames = np.zeros((3, 4, 5), np.float32)  # grayscale, float in [0, 1]
    for i in range(3):
        frames[i, :, i] = 1.0  # a white column moving right
    log = Video(jnp.asarray(frames), fps=4).to_log()
    assert isinstance(log, LogVideo) and log.fps == 4.0
    assert log.frames.dtype == np.uint8 and log.frames.shape == (3, 4, 5, 3)
    gif = PILImage.open(io.BytesIO(log.gif_bytes()))
    assert (gif.format, gif.size, gif.info["loop"]) == ("GIF", (5, 4), 0)
    decoded = [(np.asarray(frame.convert("RGB")), frame.info["duration"]) for frame in ImageSequence.Iterator(gif)]
    assert len(decoded) == 3
    for (pixels, duration), expected in zip(decoded, log.frames, strict=True):
        assert duration == 250
        np.testing.assert_array_equal(pixels, expected)  # two colours: exact
    with pytest.raises(ValueError, match=r"Video pixels must have shape \(T, H, W\) or \(T, H, W, C\)"):
        Video(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Video needs frames and a positive fps; got 2 frames at 0"):
        Video(np.zeros((2, 3, 3)), fps=0)
