"""Logs to the terminal: a progress bar on a TTY, one short line per record otherwise (files, CI, SLURM logs)."""

import datetime
import math
from collections.abc import Callable

from typing_extensions import override

from xax.task.loggers.base import Logger, LogRecord
from xax.task.loggers.console import Console, TextStream

# Width of the progress bar in characters.
_BAR_WIDTH = 20


def _format_value(value: float) -> str:
    return f"{value:.4g}"


def _format_rate(value: float) -> str:
    """``1234.5`` as ``1.23k``: rates span from a few to millions per second."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class StdoutLogger(Logger):
    """Writes training progress and validation results to the terminal.

    On a terminal, training records redraw one progress-bar line in place (step, fraction, loss,
    throughput, ETA) and each validation record prints a full line above it; the last bar stays on
    screen. Elsewhere each training record prints one line leading with the step, the fraction done,
    the ETA and the loss, then the task's own metrics and the throughput. System measurements (CPU
    and GPU statistics, timers, memory, FLOPs) are left to the JSONL and TensorBoard logs. Images
    and histograms are ignored.

    Args:
        stream: Where to write when no ``console`` is given; standard output if None.
        total_steps: The step training stops at (or a function giving it, for limits known only once
            the data is open, such as ``max_epochs``), for the bar and the ETA; unknown if None.
        is_tty: Whether to draw the progress bar; detected from the stream if None.
        max_seconds: The training time limit, for the ETA of runs limited by time.
        console: The run's console, shared with the log messages; made over ``stream`` if None.
    """

    def __init__(
        self,
        stream: TextStream | None = None,
        total_steps: int | Callable[[], int | None] | None = None,
        is_tty: bool | None = None,
        *,
        max_seconds: float | None = None,
        console: Console | None = None,
    ) -> None:
        self._console = Console(out=stream, err=stream, is_tty=is_tty) if console is None else console
        self._total_steps = total_steps
        self._max_seconds = max_seconds
        # The previous (step, elapsed time) of training, for the step rate.
        self._last: tuple[int, float] | None = None
        self._rate: float | None = None

    def total_steps(self) -> int | None:
        total = self._total_steps
        if total is None or isinstance(total, int):
            return total
        return total()

    def _update_rate(self, record: LogRecord) -> float | None:
        last, self._last = self._last, (record.step, record.elapsed_time_s)
        if last is not None:
            steps, seconds = record.step - last[0], record.elapsed_time_s - last[1]
            if steps > 0 and seconds > 0:
                self._rate = steps / seconds
        return self._rate

    def _progress(self, record: LogRecord, rate: float | None) -> tuple[float | None, float | None]:
        """The fraction of training done and the seconds left, by whichever limit ends it first."""
        fractions: list[float] = []
        etas: list[float] = []
        total = self.total_steps()
        if total is not None and total > 0:
            fractions.append(record.step / total)
            if rate is not None:
                etas.append(max(total - record.step, 0) / rate)
        if self._max_seconds is not None and self._max_seconds > 0:
            fractions.append(record.elapsed_time_s / self._max_seconds)
            etas.append(max(self._max_seconds - record.elapsed_time_s, 0.0))
        fraction = min(max(fractions), 1.0) if fractions else None
        return fraction, min(etas) if etas else None

    def _step(self, record: LogRecord) -> str:
        total = self.total_steps()
        return f"step {record.step}" + (f"/{total}" if total is not None else "")

    def _metrics(self, record: LogRecord) -> list[str]:
        """The record's own metrics (not system measurements), the loss first."""
        names = [name for name in record.scalars if name not in record.system]
        names.sort(key=lambda name: name != "loss")
        return [f"{name} {_format_value(record.scalars[name])}" for name in names]

    def _throughput(self, record: LogRecord) -> list[str]:
        parts = []
        for key, unit in (("samples_per_second", "samples/s"), ("tokens_per_second", "tokens/s")):
            if key in record.scalars:
                parts.append(f"{_format_rate(record.scalars[key])} {unit}")
        return parts

    def _line(self, record: LogRecord, rate: float | None) -> str:
        if record.phase != "train":
            return f"{record.phase} at step {record.step}: " + "  ".join(self._metrics(record))
        fraction, eta = self._progress(record, rate)
        head = self._step(record)
        if fraction is not None:
            head += f" ({fraction:.0%})"
        parts = [head]
        if eta is not None:
            parts.append(f"ETA {_format_duration(eta)}")
        parts += self._metrics(record) + self._throughput(record)
        return "  ".join(parts)

    def _bar(self, record: LogRecord, rate: float | None) -> str:
        fraction, eta = self._progress(record, rate)
        head = self._step(record)
        if fraction is not None:
            filled = math.floor(fraction * _BAR_WIDTH)
            head += f" [{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {fraction:4.0%}"
        parts = [head]
        # The loss comes first: on a narrow terminal the end of the line is cut off.
        if "loss" in record.scalars:
            parts.append(f"loss {_format_value(record.scalars['loss'])}")
        parts += self._throughput(record)
        if "samples_per_second" not in record.scalars and rate is not None:
            parts.append(f"{rate:.3g} step/s")
        if eta is not None and (fraction is None or fraction < 1.0):
            parts.append(f"ETA {_format_duration(eta)}")
        parts.append(f"elapsed {_format_duration(record.elapsed_time_s)}")
        return " | ".join(parts)

    def _texts(self, record: LogRecord) -> str:
        return "\n".join(f"{record.phase}/{key}:\n{text}" for key, text in sorted(record.texts.items()))

    @override
    def write(self, record: LogRecord) -> None:
        has_metrics = any(name not in record.system for name in record.scalars)
        if not has_metrics and not record.texts:
            return  # media only: nothing to print
        rate = self._update_rate(record) if record.phase == "train" else None
        console = self._console
        if record.phase == "train" and console.is_tty:
            console.status(self._bar(record, rate))
        elif has_metrics:
            console.print(self._line(record, rate))
        if record.texts:
            console.print(self._texts(record))

    @override
    def flush(self) -> None:
        self._console.out.flush()

    @override
    def close(self) -> None:
        # Leaves the last bar on screen, with the cursor on a fresh line below it.
        self._console.finish()
