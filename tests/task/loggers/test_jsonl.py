"""Tests for the JSON-lines logger."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.core.metric import Audio, Histogram, Images, LogImage, Metric, Scalar, Text, Tokens, Video
from xax.task.loggers.base import LogRecord
from xax.task.loggers.jsonl import JsonlLogger


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_one_object_per_record(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "log.jsonl"
    logger = JsonlLogger(path)
    logger.write(
        LogRecord(
            step=5,
            num_samples=2**40,
            elapsed_time_s=1.5,
            phase="train",
            scalars={"loss": 0.25},
            texts={"sample": "hi"},
            images={"image": LogImage(np.zeros((2, 2, 3), dtype=np.uint8))},
            histograms={"weights": np.ones(3, dtype=np.float32)},
        )
    )
    logger.write(LogRecord(step=6, num_samples=10, elapsed_time_s=2.0, phase="valid"))
    # Histograms alone (kept by the other loggers) write no line.
    histogram = {"weights": np.ones(3, dtype=np.float32)}
    logger.write(LogRecord(step=7, num_samples=12, elapsed_time_s=2.5, phase="train", histograms=histogram))
    # An image alone writes its line: the mark of a media pass (benchmarks/long_run.py counts them).
    image = {"grid": LogImage(np.zeros((2, 2, 3), dtype=np.uint8))}
    logger.write(LogRecord(step=8, num_samples=14, elapsed_time_s=3.0, phase="valid", images=image))
    # Line-buffered: the first record is on disk before flush() or close().
    assert _read(path)[0]["step"] == 5
    logger.close()
    rows = _read(path)
    assert rows == [
        {
            "step": 5,
            "num_samples": 2**40,
            "elapsed_time_s": 1.5,
            "phase": "train",
            "scalars": {"loss": 0.25},
            "texts": {"sample": "hi"},
        },
        {"step": 6, "num_samples": 10, "elapsed_time_s": 2.0, "phase": "valid", "scalars": {}, "texts": {}},
        {"step": 8, "num_samples": 14, "elapsed_time_s": 3.0, "phase": "valid", "scalars": {}, "texts": {}},
    ]


def test_non_finite_scalars_are_strings(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    logger = JsonlLogger(path)
    scalars = {"a": float("nan"), "b": float("inf"), "c": float("-inf"), "d": 1.0}
    logger.write(LogRecord(step=1, num_samples=1, elapsed_time_s=0.0, phase="train", scalars=scalars))
    logger.close()
    text = path.read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    # Strict JSON parsing rejects bare NaN/Infinity constants.
    row = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert row["scalars"] == {"a": "nan", "b": "inf", "c": "-inf", "d": 1.0}
    assert math.isnan(float(row["scalars"]["a"]))
    assert float(row["scalars"]["c"]) == float("-inf")


def test_resumed_run_appends(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    for step in (1, 2):
        logger = JsonlLogger(path)
        logger.write(LogRecord(step=step, num_samples=step, elapsed_time_s=0.0, phase="train"))
        logger.flush()
        logger.close()
    assert [row["step"] for row in _read(path)] == [1, 2]


def test_record_from_jitted_metrics(tmp_path: Path) -> None:
    @jax.jit
    def step(x: jax.Array) -> dict[str, Metric]:
        return {
            "loss": Scalar(jnp.mean(x)),
            "weights": Histogram(x),
            "grid": Images(x.reshape(1, 2, 2), labels=("a",)),
            "sample": Text("to be"),
            "tokens": Tokens(jnp.argsort(x)[::-1], lambda ids: "".join("wxyz"[i] for i in ids)),
            "sound": Audio(x, sample_rate=4),
            "clip": Video(x.reshape(4, 1, 1), fps=2),
        }

    metrics = step(jnp.array([0.0, 0.25, 0.5, 1.0]))
    record = LogRecord.from_metrics(
        metrics, step=4, num_samples=128, elapsed_time_s=2.0, phase="valid", scalars={"lr": 0.1}
    )
    assert record.scalars == {"lr": 0.1, "loss": pytest.approx(0.4375)}
    assert record.texts == {"sample": "to be", "tokens": "zyxw"}
    assert set(record.images) == {"grid"}
    np.testing.assert_array_equal(record.audio["sound"].samples[:, 0], [0.0, 0.25, 0.5, 1.0])
    assert record.audio["sound"].sample_rate == 4
    assert record.videos["clip"].frames.shape == (4, 1, 1, 3) and record.videos["clip"].fps == 2.0
    assert record.images["grid"].pixels.dtype == np.uint8
    np.testing.assert_array_equal(record.histograms["weights"], [0.0, 0.25, 0.5, 1.0])

    logger = JsonlLogger(tmp_path / "log.jsonl")
    logger.write(record)
    logger.close()
    (row,) = _read(tmp_path / "log.jsonl")
    assert row["phase"] == "valid"
    assert row["scalars"]["loss"] == pytest.approx(0.4375)
    assert row["texts"] == {"sample": "to be", "tokens": "zyxw"}  # audio and video are left to the media loggers
