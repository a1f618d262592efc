"""Logs records as JSON lines, one object per record, appended to a file."""

import json
import math
from pathlib import Path

from typing_extensions import override

from xax.task.loggers.base import Logger, LogRecord


def _json_float(value: float) -> float | str:
    """Keeps finite floats; writes NaN and infinities as "nan", "inf", "-inf".

    Strict JSON has no NaN or Infinity, and null would lose which one it was; ``float(x)`` reads
    both numbers and these strings back.
    """
    if math.isfinite(value):
        return value
    return str(value)  # "nan", "inf" or "-inf"


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-write leaves half a line; appending after it would corrupt the next
    record too, so it is cut off (whole records before it are kept)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as file:
        data = file.read()
        if data.endswith(b"\n"):
            return
        file.truncate(data.rfind(b"\n") + 1)


class JsonlLogger(Logger):
    """Appends one JSON object per record to a file.

    Each line is ``{"step", "num_samples", "elapsed_time_s", "phase", "scalars": {...},
    "texts": {...}}``. Non-finite scalars are written as the strings "nan", "inf" and "-inf", so
    every line is valid JSON. The file is opened for appending: a resumed run adds to the lines of
    the run it continues. Images and histograms are ignored.

    Args:
        path: The file to append to; its parent directory is created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        # Line-buffered, so each record reaches the file as one whole line.
        self._file = self.path.open("a", buffering=1, encoding="utf-8")

    @override
    def write(self, record: LogRecord) -> None:
        line = {
            "step": int(record.step),
            "num_samples": int(record.num_samples),
            "elapsed_time_s": _json_float(float(record.elapsed_time_s)),
            "phase": record.phase,
            "scalars": {key: _json_float(float(value)) for key, value in record.scalars.items()},
            "texts": dict(record.texts),
        }
        self._file.write(json.dumps(line, allow_nan=False) + "\n")

    @override
    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    @override
    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
