"""Logs records as JSON lines, one object per record, appended to a file."""

import json
import math
from pathlib import Path
from typing import Any

from etils import epath
from typing_extensions import override

from xax.task.loggers.base import LogEvent, Logger, LogRecord
from xax.utils.storage import storage_path

# Events after which training went back to an earlier step: the records already written for that
# step and later belong to an abandoned trajectory.
RESTART_EVENTS = ("resume", "rewind")


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
    the run it continues. Images and histograms are ignored (a record of other media writes its line, the
    mark of a media pass; one of histograms alone writes none).

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
        others = record.scalars or record.texts or record.images or record.audio or record.videos
        if record.histograms and not others:
            return  # histograms alone (log.layer_stats): nothing this file keeps
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
    def write_event(self, event: LogEvent) -> None:
        line = {"event": event.kind, "step": int(event.step), **event.detail}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")

    @override
    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    @override
    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_history(path: epath.PathLike, phase: str | None = None) -> list[dict[str, Any]]:
    """A run's logged records as its history finally stands.

    After a crash and resume (or a rewind past a non-finite step) ``log.jsonl`` holds the records of
    the abandoned steps too, followed by a ``{"event": "resume", "step": N}`` marker and the steps
    from N + 1 again. This drops every record of a step after N written before such a marker, so
    each step appears once, in order, as the run that continued computed it.

    Args:
        path: A run directory or its ``log.jsonl`` (a local path, or a ``gs://``/``s3://`` URL).
        phase: Only records of this phase ("train" or "valid"); all records when None.

    Returns:
        The records (the JSON objects ``JsonlLogger`` wrote), without the markers.
    """
    path = storage_path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as file:
        for line in file:
            if not line.endswith("\n"):
                break  # a line cut short by a crash
            entry = json.loads(line)
            if entry.get("event") in RESTART_EVENTS:
                records = [record for record in records if record["step"] <= entry["step"]]
            elif "event" not in entry:
                records.append(entry)
    return [record for record in records if phase is None or record["phase"] == phase]
