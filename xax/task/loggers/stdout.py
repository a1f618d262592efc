"""Logs to the terminal: a progress bar on a TTY, plain lines otherwise (files, CI, SLURM logs)."""

import datetime
import math
import shutil
import sys
from typing import Protocol, runtime_checkable

from typing_extensions import override

from xax.task.loggers.base import Logger, LogRecord

# Width of the progress bar in characters.
_BAR_WIDTH = 20


@runtime_checkable
class TextStream(Protocol):
    """What the logger writes to: ``sys.stdout``, an open text file, an ``io.StringIO``."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def _format_value(value: float) -> str:
    return f"{value:.4g}"


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class StdoutLogger(Logger):
    """Writes records to a text stream, by default standard output.

    On a terminal, training records redraw one progress-bar line in place (phase, step, rate,
    ETA, loss) and each validation record prints a full line above it. Elsewhere every record
    prints one line of ``key=value`` pairs. Images and histograms are ignored.

    Args:
        stream: Where to write; standard output if None.
        total_steps: The step training stops at, for the bar and the ETA; unknown if None.
        is_tty: Whether to draw the progress bar; detected from the stream if None.
    """

    def __init__(
        self, stream: TextStream | None = None, total_steps: int | None = None, is_tty: bool | None = None
    ) -> None:
        self._stream = sys.stdout if stream is None else stream
        self._total_steps = total_steps
        if is_tty is None:
            isatty = getattr(self._stream, "isatty", None)
            is_tty = bool(isatty()) if callable(isatty) else False
        self._is_tty = is_tty
        # The previous (step, elapsed time) per phase, for the rate.
        self._last: dict[str, tuple[int, float]] = {}
        self._rate: dict[str, float] = {}
        # Width of the bar currently drawn, 0 when the cursor is at the start of an empty line.
        self._bar_len = 0

    def _update_rate(self, record: LogRecord) -> float | None:
        last = self._last.get(record.phase)
        self._last[record.phase] = (record.step, record.elapsed_time_s)
        if last is not None:
            steps, seconds = record.step - last[0], record.elapsed_time_s - last[1]
            if steps > 0 and seconds > 0:
                self._rate[record.phase] = steps / seconds
        return self._rate.get(record.phase)

    def _line(self, record: LogRecord, rate: float | None) -> str:
        parts = [record.phase, f"step={record.step}", f"samples={record.num_samples}"]
        if rate is not None:
            parts.append(f"rate={rate:.3g}/s")
        parts += [f"{key}={_format_value(value)}" for key, value in sorted(record.scalars.items())]
        return " ".join(parts)

    def _bar(self, record: LogRecord, rate: float | None) -> str:
        parts = [f"{record.phase} step {record.step}"]
        total = self._total_steps
        if total is not None and total > 0:
            fraction = min(max(record.step / total, 0.0), 1.0)
            filled = math.floor(fraction * _BAR_WIDTH)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            parts[0] += f"/{total} [{bar}] {fraction:4.0%}"
        # The loss comes first: on a narrow terminal the end of the line is cut off.
        if "loss" in record.scalars:
            parts.append(f"loss {_format_value(record.scalars['loss'])}")
        if rate is not None:
            parts.append(f"{rate:.3g} step/s")
            if total is not None and record.step < total:
                parts.append(f"ETA {_format_duration((total - record.step) / rate)}")
        parts.append(f"elapsed {_format_duration(record.elapsed_time_s)}")
        return " | ".join(parts)

    def _clear_bar(self) -> str:
        """Returns what moves the cursor to the start of an empty line."""
        if self._bar_len == 0:
            return ""
        cleared = "\r" + " " * self._bar_len + "\r"
        self._bar_len = 0
        return cleared

    def _texts(self, record: LogRecord) -> str:
        return "".join(f"{record.phase}/{key}:\n{text}\n" for key, text in sorted(record.texts.items()))

    @override
    def write(self, record: LogRecord) -> None:
        if not record.scalars and not record.texts:
            return  # media only: nothing to print
        rate = self._update_rate(record) if record.phase == "train" else None
        if not self._is_tty:
            # Flushed per record so that a log file read while the run goes on is current.
            self._stream.write(self._line(record, rate) + "\n" + self._texts(record))
        elif record.phase == "train" and not record.texts:
            # A line longer than the terminal wraps, and '\r' then redraws only its last part.
            bar = self._bar(record, rate)[: max(shutil.get_terminal_size().columns - 1, 1)]
            # Spaces erase what is left of a longer previous bar.
            self._stream.write("\r" + bar.ljust(self._bar_len))
            self._bar_len = len(bar)
        else:
            # Full lines go above the bar, which the next training record redraws.
            self._stream.write(self._clear_bar() + self._line(record, rate) + "\n" + self._texts(record))
        self._stream.flush()

    @override
    def flush(self) -> None:
        self._stream.flush()

    @override
    def close(self) -> None:
        # Leaves the cursor on a fresh line, so what is printed next does not overwrite the bar.
        if self._bar_len:
            self._stream.write("\n")
            self._bar_len = 0
        self.flush()
