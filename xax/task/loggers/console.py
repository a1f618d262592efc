"""The terminal of a run: one status line redrawn in place, and full lines printed above it.

The progress bar (``StdoutLogger``, on the logging thread), the activity of the training thread
(validating, sampling media) and log messages (``ConsoleHandler``) all write through one
``Console``, so that a message never lands in the middle of the bar and the bar is redrawn below
it. Off a terminal (a file, a pipe, ``TERM=dumb``) nothing is redrawn: the status line is not shown
and every line is printed as it comes.
"""

import logging
import shutil
import sys
import threading
import time
from typing import Protocol, runtime_checkable

from xax.utils.env import is_interactive_terminal


@runtime_checkable
class TextStream(Protocol):
    """What a console writes to: ``sys.stdout``, an open text file, an ``io.StringIO``."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def stream_is_terminal(stream: TextStream) -> bool:
    """Whether ``stream`` is an interactive terminal that can redraw a line (``TERM=dumb`` is not)."""
    isatty = getattr(stream, "isatty", None)
    return is_interactive_terminal(bool(isatty()) if callable(isatty) else False)


def terminal_width() -> int:
    """The terminal's width in columns (``$COLUMNS`` first), 80 when unknown."""
    return shutil.get_terminal_size((80, 24)).columns


class Console:
    """Writes a run's lines to a terminal, keeping a status line (the progress bar) at the bottom.

    Args:
        out: Where the status line and ``print`` go; standard output if None.
        err: Where ``print(..., err=True)`` goes (log messages); standard error if None.
        is_tty: Whether to draw the status line; detected from ``out`` (and ``TERM``) if None.
        quiet_s: Off a terminal, an activity is printed as a line (with the time it has taken so
            far) whenever ``out`` has been quiet this long, so that a long validation or sampling
            pass in a log file is not minutes of silence.
        tick_s: How often a background thread, running while there is an activity, updates the
            time shown on the status line or checks for quiet output.
        progress: Whether to show the status line and activities at all (off in the processes
            other than 0 of a multi-process run, which print their warnings only).
    """

    def __init__(
        self,
        out: TextStream | None = None,
        err: TextStream | None = None,
        is_tty: bool | None = None,
        quiet_s: float = 30.0,
        tick_s: float = 1.0,
        progress: bool = True,
    ) -> None:
        self.out = sys.stdout if out is None else out
        self.err = sys.stderr if err is None else err
        self.is_tty = stream_is_terminal(self.out) if is_tty is None else is_tty
        self._lock = threading.RLock()
        self._status = ""
        self._activity = ""
        # Width of the line drawn now, 0 when the cursor is at the start of an empty line.
        self._drawn = 0
        self._quiet_s = quiet_s
        self._tick_s = tick_s
        self._last_line = time.monotonic()
        self._activity_since = 0.0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._progress = progress

    def _activity_text(self) -> str:
        """The activity with the seconds it has taken, once that is long enough to be worth saying."""
        elapsed = time.monotonic() - self._activity_since
        return f"{self._activity} ({elapsed:.0f} s)" if self._activity and elapsed >= 5 else self._activity

    def _render(self) -> str:
        activity = self._activity_text()
        text = f"{activity} | {self._status}" if activity and self._status else activity or self._status
        # A line longer than the terminal wraps, and '\r' would then redraw only its last part.
        return text[: max(terminal_width() - 1, 1)]

    def _erase(self) -> None:
        if self._drawn:
            self.out.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def _draw(self) -> None:
        line = self._render()
        if line or self._drawn:
            # Spaces erase what is left of a longer previous line.
            self.out.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        self.out.flush()

    def status(self, text: str) -> None:
        """Replaces the status line (the progress bar); ignored off a terminal."""
        if not (self.is_tty and self._progress):
            return
        with self._lock:
            self._status = text
            self._draw()

    def activity(self, text: str) -> None:
        """Shows what the run is busy with (``validating 3/10``) before the status line, and after
        a few seconds how long it has taken; "" clears it. Off a terminal, it is printed as a line
        whenever the output has been quiet for ``quiet_s``."""
        if not self._progress:
            return
        with self._lock:
            if text and not self._activity:
                self._activity_since = time.monotonic()
            self._activity = text
            if text and self._ticker is None:
                self._stop.clear()
                self._ticker = threading.Thread(target=self._tick, daemon=True, name="xax-console")
                self._ticker.start()
            self._show_activity()

    def _show_activity(self) -> None:
        if self.is_tty:
            self._draw()
        elif self._activity and time.monotonic() - self._last_line >= self._quiet_s:
            self.print(self._activity_text())

    def _tick(self) -> None:
        while not self._stop.wait(self._tick_s):
            with self._lock:
                if self._activity:
                    self._show_activity()

    def print(self, text: str, *, err: bool = False) -> None:
        """Prints ``text`` and a newline above the status line (on ``err`` with ``err``), then
        redraws the status line below it."""
        stream = self.err if err else self.out
        with self._lock:
            self._erase()
            if err:
                self.out.flush()
            stream.write(text + "\n")
            stream.flush()
            self._last_line = time.monotonic()
            if self.is_tty:
                self._draw()

    def finish(self) -> None:
        """Ends the status line where it stands, so the last progress bar stays on screen; what is
        printed next starts on a fresh line. Stops the background thread."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            self._stop.set()
            ticker.join()
        with self._lock:
            if self._drawn:
                self._activity = ""
                line = self._render()
                self.out.write("\r" + line.ljust(self._drawn) + "\n")
                self._drawn = 0
            self._status = self._activity = ""
            self.out.flush()


class ConsoleHandler(logging.Handler):
    """A logging handler printing each record on one line above the console's status line.

    Information goes to the console's ``out`` stream, in order with the progress it describes;
    warnings and errors go to ``err``, leading with ``warning:`` / ``error:``, so that standard
    error holds only what went wrong.

    Args:
        console: The console to print through.
        level: The lowest level printed.
    """

    def __init__(self, console: Console, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.console = console
        self.setFormatter(_ConsoleFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), err=record.levelno >= logging.WARNING)
        except Exception:
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        if record.levelno < logging.INFO:
            return f"debug: {text}"
        return text
