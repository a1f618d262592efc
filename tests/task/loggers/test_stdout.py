"""Tests for the terminal logger: what a pipe receives, and what a terminal shows (through a
terminal emulator, which applies the carriage returns and erasures the way a screen does)."""

import io
import threading
import time

import pyte
import pytest

from xax.core.state import Phase
from xax.task.loggers.base import LogRecord
from xax.task.loggers.console import Console
from xax.task.loggers.stdout import StdoutLogger

SYSTEM = {"samples_per_second": 320.0, "steps_per_second": 10.0, "cpu_percent": 55.0, "flops_per_step": 1e9}


def _record(step: int, elapsed: float, phase: Phase = "train", system: bool = False, **scalars: float) -> LogRecord:
    extra = SYSTEM if system else {}
    return LogRecord(
        step=step,
        num_samples=step * 32,
        elapsed_time_s=elapsed,
        phase=phase,
        scalars={**scalars, **extra},
        system=frozenset(extra),
    )


def screen_of(text: str, columns: int = 100) -> list[str]:
    """The non-empty lines a terminal of ``columns`` shows after receiving ``text``."""
    screen = pyte.Screen(columns, 20)
    pyte.Stream(screen).feed(text.replace("\n", "\r\n"))
    return [line.rstrip() for line in screen.display if line.strip()]


def test_piped_lines_lead_with_step_fraction_eta_and_loss() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=100, is_tty=False)
    logger.write(_record(10, 1.0, system=True, accuracy=0.25, loss=0.5))
    logger.write(_record(30, 2.0, system=True, loss=0.25, accuracy=0.5))
    logger.write(_record(30, 2.5, phase="valid", loss=0.75, accuracy=0.4))
    logger.close()
    assert stream.getvalue().splitlines() == [
        "step 10/100 (10%)  loss 0.5  accuracy 0.25  320 samples/s",
        # 20 steps in 1 s: 70 steps left take 3.5 s.
        "step 30/100 (30%)  ETA 0:00:04  loss 0.25  accuracy 0.5  320 samples/s",
        "valid at step 30: loss 0.75  accuracy 0.4",
    ]


def test_system_metrics_stay_off_the_console() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, is_tty=False)
    logger.write(_record(1, 0.5, system=True, loss=1.0))
    assert "cpu" not in stream.getvalue() and "flops" not in stream.getvalue()
    # A record of system measurements alone prints nothing.
    logger.write(
        LogRecord(step=2, num_samples=64, elapsed_time_s=1.0, phase="train", scalars=SYSTEM, system=frozenset(SYSTEM))
    )
    assert stream.getvalue() == "step 1  loss 1  320 samples/s\n"


def test_tokens_per_second_shown_when_measured() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, is_tty=False)
    logger.write(_record(1, 0.5, system=True, loss=1.0, tokens_per_second=81920.0))
    assert "81.9k tokens/s" in stream.getvalue()


def test_eta_of_a_run_limited_by_time() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, is_tty=False, max_seconds=100.0)
    logger.write(_record(10, 25.0, loss=1.0))
    assert stream.getvalue() == "step 10 (25%)  ETA 0:01:15  loss 1\n"


def test_total_steps_known_later_from_a_function() -> None:
    total: list[int | None] = [None]
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=lambda: total[0], is_tty=False)
    logger.write(_record(5, 1.0, loss=1.0))
    total[0] = 20  # an epoch's length, known once the data is open
    logger.write(_record(10, 2.0, loss=1.0))
    assert stream.getvalue().splitlines() == ["step 5  loss 1", "step 10/20 (50%)  ETA 0:00:02  loss 1"]


def test_dumb_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "dumb")
    assert not Console(out=FakeTerminal()).is_tty
    monkeypatch.setenv("TERM", "xterm-256color")
    assert Console(out=FakeTerminal()).is_tty


def test_progress_bar_on_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=100, is_tty=True)
    logger.write(_record(10, 1.0, system=True, loss=0.5))
    logger.write(_record(50, 5.0, system=True, loss=0.125))
    assert "\n" not in stream.getvalue()
    (line,) = screen_of(stream.getvalue(), columns=200)
    # 40 steps in 4 s: 10 step/s, 50 steps left: 5 s.
    assert line == (
        "step 50/100 [##########----------]  50% | loss 0.125 | 320 samples/s | ETA 0:00:05 | elapsed 0:00:05"
    )


def test_progress_bar_fits_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, total_steps=100, is_tty=True)
    logger.write(_record(10, 1.0, loss=0.5))
    logger.write(_record(20, 2.0, loss=0.5))
    # A wrapped line would break the in-place redraw: the screen shows one line, the newest bar.
    (line,) = screen_of(stream.getvalue(), columns=40)
    assert line.startswith("step 20/100 [####")


def test_final_bar_stays_above_nothing_it_erased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    stream = io.StringIO()
    console = Console(out=stream, err=stream, is_tty=True)
    logger = StdoutLogger(total_steps=20, console=console)
    logger.write(_record(10, 1.0, loss=0.5))
    logger.write(_record(20, 2.0, loss=0.25))
    console.activity("validating 3/4")
    assert screen_of(stream.getvalue())[-1].startswith("validating 3/4 | step 20/20")
    console.activity("")
    logger.write(_record(20, 2.5, phase="valid", loss=0.75))
    console.print("a message", err=True)
    logger.close()
    console.print("after the run")
    assert screen_of(stream.getvalue()) == [
        "valid at step 20: loss 0.75",
        "a message",
        "step 20/20 [####################] 100% | loss 0.25 | 10 step/s | elapsed 0:00:02",
        "after the run",
    ]


def test_texts_are_printed() -> None:
    stream = io.StringIO()
    logger = StdoutLogger(stream=stream, is_tty=False)
    logger.write(LogRecord(step=3, num_samples=3, elapsed_time_s=1.0, phase="valid", texts={"sample": "to be"}))
    assert "valid/sample:\nto be\n" in stream.getvalue()


def test_activity_off_a_terminal_is_printed_only_after_a_quiet_spell() -> None:
    stream = io.StringIO()
    console = Console(out=stream, is_tty=False)
    console.activity("validating 1/79")
    console.finish()
    assert stream.getvalue() == ""  # just started: the progress lines are recent enough
    quiet = Console(out=stream, is_tty=False, quiet_s=0.0)
    quiet.activity("validating 40/79")
    quiet.activity("")
    quiet.finish()
    assert stream.getvalue() == "validating 40/79\n"


def test_a_long_activity_keeps_saying_so_while_it_lasts() -> None:
    stream = io.StringIO()
    console = Console(out=stream, is_tty=False, quiet_s=0.05, tick_s=0.01)
    console.activity("making media (log_media)")  # one call, then a long wait inside the task's code
    deadline = time.monotonic() + 10
    while stream.getvalue().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    console.activity("")
    console.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3 and set(lines) == {"making media (log_media)"}
    assert not any(thread.name == "xax-console" for thread in threading.enumerate())


def test_activity_on_a_terminal_shows_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    stream = io.StringIO()
    console = Console(out=stream, is_tty=True, tick_s=3600.0)
    console.status("step 20/20")
    console.activity("validating 1/79")
    clock[0] += 12.0
    console.activity("validating 40/79")  # the time counts from the first batch
    assert screen_of(stream.getvalue()) == ["validating 40/79 (12 s) | step 20/20"]
    console.activity("")
    console.finish()
    assert screen_of(stream.getvalue()) == ["step 20/20"]
