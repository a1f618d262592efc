"""Quieting orbax: its routine notices, and the reports it leaves behind a failed read or write."""

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Generator
from typing import Any

import jax


@contextlib.contextmanager
def quiet_orbax() -> Generator[None]:
    """Raises the ``absl`` logger to ERROR for the duration: orbax reports read-only managers,
    checkpoints without its optional metadata file and similar non-events as absl warnings."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _orbax_coroutine(obj: object) -> bool:
    """Whether ``obj`` is a coroutine of orbax's own code (its array reads and writes)."""
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in code.co_filename


class ClosedLoopFilter:
    """An unraisable-exception hook that drops the reports of tensorstore reads finishing after a
    failed read: those that found orbax's event loop closed (``RuntimeError: Event loop is
    closed``), and orbax's own read coroutines that failed on the same damaged file after the
    first failure was raised (their error is collected with the coroutine, never raised). Every
    other report is passed on."""

    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed_loop or _orbax_coroutine(unraisable.object)):
            self.previous(unraisable)


class _AbandonedIoErrors(logging.Filter):
    """Drops asyncio's "Future (or Task) exception was never retrieved" reports of tensorstore reads
    and writes that failed alongside one that was already reported (a read's holds its whole JSON
    spec; a write's task names orbax's serialization and the OCDBT file it could not write)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        ours = any(word in message for word in ("tensorstore", "OCDBT", "orbax"))
        unretrieved = message.startswith(("Future exception was never retrieved", "Task exception was never retrieved"))
        return not (unretrieved and ours)


def drop_abandoned_io_reports() -> None:
    """Installs ``ClosedLoopFilter`` and ``_AbandonedIoErrors`` (once each), before a checkpoint
    is read or written: when one read or write fails, the others still in flight fail or finish
    after orbax's event loop closed (during or after the failure is raised), and would each print a
    traceback. Both drop only those reports."""
    if not isinstance(sys.unraisablehook, ClosedLoopFilter):
        sys.unraisablehook = ClosedLoopFilter(sys.unraisablehook)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(existing, _AbandonedIoErrors) for existing in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedIoErrors())


class OrbaxWriteErrors(logging.Filter):
    """Drops orbax's error reports (with tracebacks) about a failed background write: the
    checkpoint manager reports each failed write itself, once, as a ``CheckpointWriteError``."""

    def filter(self, record: logging.LogRecord) -> bool:
        in_orbax = f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in record.pathname
        return not (in_orbax and record.levelno >= logging.ERROR)


def root_cause(error: BaseException) -> BaseException:
    """The innermost error of ``error``'s chain (orbax wraps tensorstore's, which names the file)."""
    seen = [error]
    while (inner := seen[-1].__cause__ or seen[-1].__context__) is not None and inner not in seen:
        seen.append(inner)
    return next((inner for inner in reversed(seen) if str(inner).strip()), error)


def one_line(error: BaseException) -> str:
    """An error's message on one line, without the JSON spec tensorstore appends to read errors
    (the file and the reason come before it)."""
    text = " ".join(str(error).split())
    head, spec, _ = text.partition(" [tensorstore_spec")
    return head + ")" if spec and text.endswith(")") else head


def tell(message: str) -> None:
    """One line for the user on stderr (from process 0 only), whatever the logging setup."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
