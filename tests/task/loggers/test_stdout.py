"""Tests for the terminal logger."""

import io

import pytest

from xax.core.state import Phase
from xax.task.loggers.base import LogRecord
from xax.task.loggers.stdout import StdoutLogger


def _record(step: int, elapsed: float, phase: Phase = "train", **scalars: float) -> LogRecord:
    return LogRecord(step=step, num_samples=step * 32, elapsed_time_s=elapsed, phase=phase, scalars=scalars)


def test_plain_lines_when_not_a_tty() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=100, is_tty=False)
    logger.write(_record(10, 1.0, loss=0.5, accuracy=0.25))
    logger.write(_record(30, 2.0, loss=0.25))
    logger.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "train step=10 samples=320 accuracy=0.25 loss=0.5",
        "train step=30 samples=960 rate=20/s loss=0.25",
    ]
    assert "\r" not in stream.getvalue()


def test_detects_non_tty_stream() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream)
    logger.write(_record(1, 0.5, loss=1.0))
    assert stream.getvalue() == "train step=1 samples=32 loss=1\n"


def test_progress_bar_on_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=100, is_tty=True)
    logger.write(_record(10, 1.0, loss=0.5))
    logger.write(_record(50, 5.0, loss=0.125))
    out = stream.getvalue()
    assert "\n" not in out
    frames = out.split("\r")[1:]
    assert len(frames) == 2
    last = frames[-1]
    # 40 steps in 4 s: 10 step/s, 50 steps left: 5 s.
    assert "step 50/100" in last
    assert "50%" in last
    assert "10 step/s" in last
    assert "ETA 0:00:05" in last
    assert "loss 0.125" in last
    assert "elapsed 0:00:05" in last


def test_progress_bar_fits_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=100, is_tty=True)
    logger.write(_record(10, 1.0, loss=0.5))
    logger.write(_record(20, 2.0, loss=0.5))
    frames = stream.getvalue().split("\r")[1:]
    # A wrapped line would break the in-place redraw.
    assert all(len(frame) <= 39 for frame in frames)


def test_valid_record_prints_full_line_above_bar() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=100, is_tty=True)
    logger.write(_record(10, 1.0, loss=0.5))
    logger.write(_record(10, 1.5, phase="valid", loss=0.75))
    logger.write(_record(20, 2.0, loss=0.25))
    logger.close()
    out = stream.getvalue()
    lines = out.split("\n")
    # The valid line is complete, the bar is redrawn after it, and close() ends the bar's line.
    assert lines[0].endswith("valid step=10 samples=320 loss=0.75")
    assert "step 20/100" in lines[1]
    assert out.endswith("\n")


def test_texts_are_printed() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, is_tty=False)
    logger.write(LogRecord(step=3, num_samples=3, elapsed_time_s=1.0, phase="valid", texts={"sample": "to be"}))
    assert "valid/sample:\nto be\n" in stream.getvalue()
