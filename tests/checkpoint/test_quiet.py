"""The asyncio reports dropped while a checkpoint is read or written: only those of orbax's and
tensorstore's own abandoned reads and writes, whether asyncio calls them futures or tasks."""

import logging

import pytest

from xax.checkpoint.quiet import _AbandonedIoErrors

WRITE_TASK = (
    "Task exception was never retrieved\nfuture: <Task finished name='Task-9' coro=<async_serialize_shards() "
    "done, defined at .../orbax/checkpoint/_src/serialization/serialization.py:188> exception=ValueError("
    '\'RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file "/run/checkpoints/40"\')>'
)


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        (WRITE_TASK, False),
        ("Future exception was never retrieved\nfuture: <Future finished exception=tensorstore read>", False),
        ("Task exception was never retrieved\nfuture: <Task finished coro=<my_code()> exception=KeyError()>", True),
        ("Unclosed client session (orbax)", True),
    ],
)
def test_only_orbax_and_tensorstore_unretrieved_reports_are_dropped(message: str, kept: bool) -> None:
    assert _AbandonedIoErrors().filter(record(message)) is kept
