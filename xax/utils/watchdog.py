"""A hang watchdog: a daemon thread that calls back when no progress is reported in time.

The watched code reports progress (``Watchdog.progress``); the thread keeps the time of the last
report and, when the allowance runs out, hands a ``Stall`` to its callback once and ends. It needs
no signal and works whichever thread the watched code runs on.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# The longest ``stop`` waits for the thread; it only ever waits on an event, so it ends at once
# unless its callback is running.
_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Stall:
    """What the watchdog saw when it fired.

    Attributes:
        limit_s: The allowance that ran out, in seconds.
        limit_key: The name of that allowance (e.g. the config key that sets it).
        last_progress: The last progress reported, or None when none was (still starting up).
        waited_s: Seconds since that report (or since the start).
    """

    limit_s: float
    limit_key: str
    last_progress: str | None
    waited_s: float


@dataclass(frozen=True)
class _Mark:
    """The last report: when, what, and how long until the next one is due. Replaced whole, so
    the watchdog thread never sees half of one."""

    at: float
    limit_s: float
    limit_key: str
    what: str | None


class Watchdog:
    """Calls ``on_stall`` when no progress is reported for too long.

    Until the first report, ``startup_s`` is allowed (building, compiling, the first batch);
    after each report, ``step_s`` is, or ``startup_s`` again for a report made with
    ``compiles=True`` (the work that follows compiles a new program).

    Args:
        startup_s: Seconds allowed from ``start`` to the first report, and after a report that
            announces a compilation.
        step_s: Seconds allowed between two reports.
        on_stall: Called on the watchdog thread when an allowance runs out; the thread ends
            after it returns.
        startup_key: The name of ``startup_s`` given in the ``Stall``.
        step_key: The name of ``step_s`` given in the ``Stall``.
        name: The thread's name.
    """

    def __init__(
        self,
        startup_s: float,
        step_s: float,
        on_stall: Callable[[Stall], None],
        *,
        startup_key: str = "startup_s",
        step_key: str = "step_s",
        name: str = "xax-watchdog",
    ) -> None:
        self._startup = (startup_s, startup_key)
        self._step = (step_s, step_key)
        self._on_stall = on_stall
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mark = _Mark(time.monotonic(), startup_s, startup_key, None)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts the thread, allowing ``startup_s`` from now until the first report."""
        if self.is_running:
            return
        self._stop.clear()
        self._mark = _Mark(time.monotonic(), *self._startup, None)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def progress(self, what: str, *, compiles: bool = False) -> None:
        """Reports progress: the next report is due within ``step_s`` (``startup_s`` when
        ``compiles``). Cheap enough to call at every step (one small object, no lock).

        Args:
            what: What was just done, for the report of a stall ("training step 12").
            compiles: Whether the work up to the next report compiles a new program.
        """
        limit = self._startup if compiles else self._step
        self._mark = _Mark(time.monotonic(), *limit, what)

    def stop(self) -> None:
        """Stops the thread and waits for it (a moment; longer only while ``on_stall`` runs)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
            self._thread = None

    def _run(self) -> None:
        # A report made while the thread waits can bring the deadline forward (start-up's allowance
        # replaced by a shorter one), but never to less than the shortest allowance from now: waits
        # no longer than that end before any deadline set during them.
        shortest = min(self._startup[0], self._step[0])
        while not self._stop.is_set():
            mark = self._mark
            remaining = mark.at + mark.limit_s - time.monotonic()
            if remaining > 0:
                self._stop.wait(min(remaining, shortest))
                continue
            self._on_stall(Stall(mark.limit_s, mark.limit_key, mark.what, time.monotonic() - mark.at))
            return
