"""Metrics: small pytrees that leave a jitted step as arrays and become loggable values on the host.

A step returns ``dict[str, Metric]``. The arrays inside stay on the device until a logger is due;
only then does the host fetch them (one transfer for the whole dict) and call ``to_log()``, which
turns each metric into a plain host value (``LogScalar``, ``LogHistogram``, ``LogImage``,
``LogText``, ``LogAudio``, ``LogVideo``) that loggers write.
"""

import io
import math
import wave
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Float, Shaped
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

# Metrics are built inside jit (tracers, jax arrays) and on the host (numpy arrays).
_AnyArray = jax.Array | np.ndarray

# Pixels between tiles of an image grid, and around a label.
_GRID_PAD = 2


@dataclass(frozen=True)
class LogScalar:
    """A scalar ready to log."""

    value: float


@dataclass(frozen=True, eq=False)
class LogHistogram:
    """Values to summarize as a histogram, flattened to one dimension (float32)."""

    values: np.ndarray


@dataclass(frozen=True, eq=False)
class LogImage:
    """An image ready to log: uint8 pixels of shape (H, W, C), C = 3 (RGB) or 4 (RGBA)."""

    pixels: np.ndarray


@dataclass(frozen=True)
class LogText:
    """Text ready to log."""

    text: str


@dataclass(frozen=True, eq=False)
class LogAudio:
    """Audio ready to log: float32 samples in [-1, 1] of shape (T, C), C = 1 or 2, at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    def wav_bytes(self) -> bytes:
        """The audio as a 16-bit PCM WAV file."""
        pcm = np.round(self.samples * 32767.0).astype("<i2")
        with io.BytesIO() as buffer:
            with wave.open(buffer, "wb") as out:
                out.setnchannels(self.samples.shape[1])
                out.setsampwidth(2)
                out.setframerate(self.sample_rate)
                out.writeframes(pcm.tobytes())
            return buffer.getvalue()


@dataclass(frozen=True, eq=False)
class LogVideo:
    """Frames ready to log: uint8 of shape (T, H, W, C), C = 3 or 4, shown at ``fps`` frames per second."""

    frames: np.ndarray
    fps: float

    def gif_bytes(self) -> bytes:
        """The frames as an animated GIF that loops forever (GIF holds 256 colours a frame)."""
        mode = "RGBA" if self.frames.shape[-1] == 4 else "RGB"
        images = [PILImage.fromarray(frame, mode=mode) for frame in self.frames]
        with io.BytesIO() as buffer:
            # GIF frame durations are whole milliseconds.
            duration = max(1, round(1000.0 / self.fps))
            images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
            return buffer.getvalue()


LogValue = LogScalar | LogHistogram | LogImage | LogText | LogAudio | LogVideo


class Scalar(eqx.Module):
    """A scalar metric, such as a loss or an accuracy.

    A value with more than one element (for example stacked over gradient-accumulation
    micro-batches) is averaged when it is logged.

    Examples:
        >>> import jax.numpy as jnp
        >>> Scalar(jnp.array([1.0, 2.0])).to_log()  # two micro-batches, averaged on the host
        LogScalar(value=1.5)

    Attributes:
        value: The value, a number or an array of any shape.
    """

    value: Shaped[_AnyArray, "..."] | float | int

    def to_log(self) -> LogScalar:
        return LogScalar(float(np.mean(np.asarray(self.value, dtype=np.float64))))


class Histogram(eqx.Module):
    """Values summarized as a histogram, such as weights or activations.

    Attributes:
        values: The values, an array of any shape (flattened when logged).
    """

    values: Shaped[_AnyArray, "..."]

    def to_log(self) -> LogHistogram:
        return LogHistogram(np.asarray(self.values, dtype=np.float32).reshape(-1))


class Image(eqx.Module):
    """One image.

    Attributes:
        pixels: An array of shape (H, W) or (H, W, C) with C in {1, 3, 4}; either float with values
            in [0, 1] (values outside are clipped) or uint8 with values in [0, 255].
    """

    pixels: Shaped[_AnyArray, "height width *channels"]

    def __check_init__(self) -> None:
        _check_pixels(self.pixels, leading=0, name="Image")

    def to_log(self) -> LogImage:
        return LogImage(_to_uint8_hwc(np.asarray(self.pixels)))


class Images(eqx.Module):
    """A batch of images shown as a grid, each optionally labelled underneath.

    Attributes:
        pixels: An array of shape (N, H, W) or (N, H, W, C), with the dtypes and ranges of
            ``Image``.
        labels: One label per image (for example a predicted class), drawn under its tile.
        max_per_row: The number of tiles in one row of the grid.
    """

    pixels: Shaped[_AnyArray, "num height width *channels"]
    labels: tuple[str, ...] | None = eqx.field(default=None, static=True)
    max_per_row: int = eqx.field(default=8, static=True)

    def __check_init__(self) -> None:
        _check_pixels(self.pixels, leading=1, name="Images")
        if self.max_per_row < 1:
            raise ValueError(f"Images.max_per_row must be at least 1, got {self.max_per_row}")
        if self.labels is not None and len(self.labels) != self.pixels.shape[0]:
            raise ValueError(
                f"Images got {self.pixels.shape[0]} images but {len(self.labels)} labels; pass one label per image"
            )

    def to_log(self) -> LogImage:
        tiles = [_to_uint8_hwc(tile) for tile in np.asarray(self.pixels)]
        return LogImage(_make_grid(tiles, self.labels, self.max_per_row))


class Text(eqx.Module):
    """A text metric, such as a generated sample.

    Attributes:
        text: The text. It is static (part of the tree structure, not a leaf).
    """

    text: str = eqx.field(static=True)

    def to_log(self) -> LogText:
        return LogText(self.text)


class Tokens(eqx.Module):
    """Token ids, decoded to text only on the host when logged (the step returns the ids).

    Attributes:
        ids: Integer ids of shape (L,), or (N, L) for N sequences, logged as N paragraphs.
        decode: Turns a list of ids into text, such as a tokenizer's ``decode``; static, so a jitted
            function can return the metric.
    """

    ids: Shaped[_AnyArray, "..."]  # checked in __check_init__, with a message naming the metric
    decode: Callable[[list[int]], str] = eqx.field(static=True)

    def __check_init__(self) -> None:
        if self.ids.ndim not in (1, 2) or not np.issubdtype(np.dtype(self.ids.dtype), np.integer):
            raise ValueError(
                f"Tokens ids must be integers of shape (L,) or (N, L); got {self.ids.dtype} of shape "
                f"{tuple(self.ids.shape)}"
            )

    def to_log(self) -> LogText:
        ids = np.asarray(self.ids)
        rows = ids[None] if ids.ndim == 1 else ids
        return LogText("\n\n".join(self.decode([int(i) for i in row]) for row in rows))


class Audio(eqx.Module):
    """A sound, such as a generated waveform.

    Attributes:
        samples: Float samples in [-1, 1] (values outside are clipped) of shape (T,) for mono or
            (T, C) with C = 1 or 2 channels.
        sample_rate: Samples per second.
    """

    samples: Float[_AnyArray, "..."]  # (T,) or (T, C)
    sample_rate: int = eqx.field(static=True)

    def __check_init__(self) -> None:
        shape = tuple(self.samples.shape)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] not in (1, 2)) or shape[0] == 0:
            raise ValueError(f"Audio samples must have shape (T,) or (T, C) with C in 1, 2 and T > 0; got {shape}")
        if self.sample_rate <= 0:
            raise ValueError(f"Audio sample_rate must be positive, got {self.sample_rate}")

    def to_log(self) -> LogAudio:
        samples = np.nan_to_num(np.asarray(self.samples, dtype=np.float32), nan=0.0)
        samples = np.clip(samples, -1.0, 1.0)
        return LogAudio(samples[:, None] if samples.ndim == 1 else samples, int(self.sample_rate))


class Video(eqx.Module):
    """A clip, such as a sampled trajectory or a denoising sequence.

    Attributes:
        frames: An array of shape (T, H, W) or (T, H, W, C), with the dtypes and ranges of ``Image``.
        fps: Frames per second when played.
    """

    frames: Shaped[_AnyArray, "..."]  # (T, H, W) or (T, H, W, C), checked in __check_init__
    fps: int | float = eqx.field(default=10.0, static=True)

    def __check_init__(self) -> None:
        _check_pixels(self.frames, leading=1, name="Video", leading_name="T")
        if self.frames.shape[0] == 0 or self.fps <= 0:
            raise ValueError(f"Video needs frames and a positive fps; got {self.frames.shape[0]} frames at {self.fps}")

    def to_log(self) -> LogVideo:
        return LogVideo(np.stack([_to_uint8_hwc(frame) for frame in np.asarray(self.frames)]), float(self.fps))


Metric = Scalar | Histogram | Image | Images | Text | Tokens | Audio | Video


def _check_pixels(pixels: _AnyArray, leading: int, name: str, leading_name: str = "N") -> None:
    """Raises a ValueError naming the metric if the pixel array has the wrong shape or dtype."""
    ndim = pixels.ndim - leading
    prefix = f"{leading_name}, " if leading else ""
    if ndim not in (2, 3) or (ndim == 3 and pixels.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"{name} pixels must have shape ({prefix}H, W) or ({prefix}H, W, C) with C in 1, 3, 4; "
            f"got shape {tuple(pixels.shape)}"
        )
    dtype = np.dtype(pixels.dtype)
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
        raise ValueError(
            f"{name} pixels must be float in [0, 1] or uint8 in [0, 255], got dtype {dtype}; "
            "scale them with `x / 255.0` or cast with `.astype(jnp.uint8)`"
        )


def _to_uint8_hwc(pixels: np.ndarray) -> np.ndarray:
    """Converts (H, W) or (H, W, C) float-in-[0, 1] or uint8 pixels to uint8 (H, W, 3 or 4)."""
    if pixels.dtype != np.uint8:
        # NaN becomes black; rounding maps 1.0 to 255 exactly.
        scaled = np.nan_to_num(np.asarray(pixels, dtype=np.float32), nan=0.0)
        pixels = np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels


def _make_grid(tiles: list[np.ndarray], labels: tuple[str, ...] | None, max_per_row: int) -> np.ndarray:
    """Lays uint8 (H, W, C) tiles out in rows on a black canvas, each label drawn under its tile."""
    channels = max(tile.shape[-1] for tile in tiles)
    tiles = [_with_channels(tile, channels) for tile in tiles]
    height, width = tiles[0].shape[:2]
    font = ImageFont.load_default()
    label_width, label_height = 0, 0
    if labels is not None:
        boxes = [font.getbbox(label) for label in labels]
        label_width = max(int(right) for _, _, right, _ in boxes)
        # Every strip has the same height so the tiles line up, whatever the letters.
        label_height = int(font.getbbox("Ag")[3]) + _GRID_PAD
    # A cell is wide enough for its label, so long labels are not cut off under small tiles.
    cell_w = max(width, label_width) + _GRID_PAD
    cell_h = height + label_height + _GRID_PAD
    cols = min(len(tiles), max_per_row)
    rows = math.ceil(len(tiles) / max_per_row)
    canvas = np.zeros((rows * cell_h + _GRID_PAD, cols * cell_w + _GRID_PAD, channels), dtype=np.uint8)
    if channels == 4:
        canvas[..., 3] = 255
    for i, tile in enumerate(tiles):
        top = (i // max_per_row) * cell_h + _GRID_PAD
        left = (i % max_per_row) * cell_w + _GRID_PAD + (cell_w - _GRID_PAD - width) // 2
        canvas[top : top + height, left : left + width] = tile
    if labels is None:
        return canvas
    image = PILImage.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    fill = (255,) * channels
    for i, label in enumerate(labels):
        top = (i // max_per_row) * cell_h + _GRID_PAD + height
        left = (i % max_per_row) * cell_w + _GRID_PAD
        draw.text((left, top), label, fill=fill, font=font)
    return np.asarray(image)


def _with_channels(tile: np.ndarray, channels: int) -> np.ndarray:
    """Adds an opaque alpha channel to an RGB tile when the grid is RGBA."""
    if tile.shape[-1] == channels:
        return tile
    alpha = np.full((*tile.shape[:2], 1), 255, dtype=np.uint8)
    return np.concatenate([tile, alpha], axis=-1)
