"""Tests for the TensorBoard logger, reading the event files back."""

import io
import struct
import wave
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageSequence
from tensorboardX.proto.event_pb2 import Event  # ty: ignore[missing-module-member]

from xax.core.metric import LogAudio, LogImage, LogVideo
from xax.task.loggers.base import LogRecord
from xax.task.loggers.tensorboard import TensorBoardLogger


def read_events(directory: Path) -> list[Event]:
    """Reads every event of the event files in a directory (TFRecord framing)."""
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            # uint64 length, uint32 length CRC, payload, uint32 payload CRC.
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            assert len(payload) == length, f"truncated record in {path}"
            events.append(Event.FromString(payload))
            offset += 12 + length + 4
    return events


def tag_values(events: list[Event]) -> dict[str, list[tuple[int, Any]]]:
    """Summary values by tag, with their steps."""
    found: dict[str, list[tuple[int, Any]]] = {}
    for event in events:
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_writes_each_phase_to_its_own_directory(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path / "tb")
    image = np.zeros((6, 10, 3), dtype=np.uint8)
    image[:, :5] = 255
    logger.write(
        LogRecord(
            step=3,
            num_samples=96,
            elapsed_time_s=1.0,
            phase="train",
            scalars={"loss": 0.5},
            images={"samples": LogImage(image)},
            texts={"generated": "to be or not"},
            histograms={"weights": np.array([0.0, 1.0, 2.0, np.nan], dtype=np.float32)},
        )
    )
    logger.write(LogRecord(step=7, num_samples=224, elapsed_time_s=2.0, phase="train", scalars={"loss": 0.25}))
    logger.write(LogRecord(step=7, num_samples=224, elapsed_time_s=2.5, phase="valid", scalars={"loss": 0.75}))
    logger.close()

    train = tag_values(read_events(tmp_path / "tb" / "train"))
    assert [(step, value.simple_value) for step, value in train["loss"]] == [(3, 0.5), (7, 0.25)]
    ((step, img),) = train["samples"]
    assert step == 3
    assert (img.image.height, img.image.width) == (6, 10)
    text_tags = [tag for tag in train if tag.startswith("generated")]
    assert len(text_tags) == 1
    ((step, text),) = train[text_tags[0]]
    assert step == 3
    assert text.tensor.string_val == [b"to be or not"]
    ((step, hist),) = train["weights"]
    assert step == 3
    # The NaN is dropped before binning.
    assert hist.histo.num == 3
    assert (hist.histo.min, hist.histo.max) == (0.0, 2.0)

    valid = tag_values(read_events(tmp_path / "tb" / "valid"))
    assert [(step, value.simple_value) for step, value in valid["loss"]] == [(7, 0.75)]
    assert set(valid) == {"loss"}


def test_audio_and_video_are_encoded_without_extra_packages(tmp_path: Path) -> None:
    samples = np.linspace(-1.0, 1.0, 50, dtype=np.float32).reshape(25, 2)
    frames = np.zeros((2, 3, 4, 3), np.uint8)
    frames[1] = 255
    logger = TensorBoardLogger(tmp_path / "tb")
    record = LogRecord(
        step=5,
        num_samples=0,
        elapsed_time_s=0.0,
        phase="valid",
        audio={"speech": LogAudio(samples, 16000)},
        videos={"rollout": LogVideo(frames, fps=5.0)},
    )
    logger.write(record)
    logger.close()
    found = tag_values(read_events(tmp_path / "tb" / "valid"))
    ((step, sound),) = found["speech"]
    assert step == 5
    assert (sound.audio.sample_rate, sound.audio.num_channels, sound.audio.length_frames) == (16000, 2, 25)
    assert sound.audio.content_type == "audio/wav"
    with wave.open(io.BytesIO(sound.audio.encoded_audio_string)) as wav:
        pcm = np.frombuffer(wav.readframes(25), "<i2").reshape(25, 2)
    np.testing.assert_array_equal(pcm, np.round(samples * 32767).astype(np.int16))
    ((step, clip),) = found["rollout"]
    assert (step, clip.image.height, clip.image.width, clip.image.colorspace) == (5, 3, 4, 3)
    gif = PILImage.open(io.BytesIO(clip.image.encoded_image_string))
    decoded = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    np.testing.assert_array_equal(np.stack(decoded), frames)
