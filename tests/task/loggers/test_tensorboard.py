"""Tests for the TensorBoard logger, reading the event files back."""

import struct
from pathlib import Path
from typing import Any

import numpy as np
from tensorboardX.proto.event_pb2 import Event  # ty: ignore[missing-module-member]

from xax.core.metric import LogImage
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
