"""Fixed-shape records in ArrayRecord files (the format Grain reads), with a manifest that checks them.

``write_records`` writes the rows of numpy columns as records of one structured dtype, spread over
``<name>-<i>-of-<n>.array_record`` shards, and a manifest ``<name>.json`` (the dtype, each shard's record
count and size in bytes, and any metadata of the caller's). ``read_records`` checks every shard against
the manifest, so a missing or truncated shard is a one-line ``DataError`` naming the file, and returns a
``grain.MapDataset`` over ``grain.sources.ArrayRecordDataSource`` whose elements are dicts of arrays:
``make_batch_source`` batches it (``GrainBatchSource``), its order and position being the cursor that
every checkpoint saves. Needs the ``grain`` extra (``array_record`` comes with it).

Examples:
    >>> import tempfile, numpy as np
    >>> from xax.data import read_records, write_records
    >>> columns = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "label": np.array([4, 5, 6])}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = write_records(folder, "train", columns, num_shards=2)
    ...     dataset = read_records(folder, "train")
    ...     len(dataset), dataset[1]["x"].tolist(), int(dataset[2]["label"])
    (3, [2.0, 3.0], 6)
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xax.core.errors import DataError

MANIFEST_VERSION = 1
# One record per chunk, uncompressed: random access (a shuffled epoch) reads only the record it needs, and
# arrays of floats hardly compress.
WRITER_OPTIONS = "group_size:1,uncompressed"


def shard_name(name: str, index: int, num_shards: int) -> str:
    """``<name>-<index>-of-<num_shards>.array_record``, zero-padded to five digits."""
    return f"{name}-{index:05d}-of-{num_shards:05d}.array_record"


def manifest_path(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"{name}.json"


def _record_dtype(columns: Mapping[str, np.ndarray]) -> np.dtype:
    return np.dtype([(key, value.dtype, value.shape[1:]) for key, value in columns.items()])


def write_records(
    directory: str | Path,
    name: str,
    columns: Mapping[str, np.ndarray],
    *,
    num_shards: int = 1,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the rows of ``columns`` as ArrayRecord shards and their manifest.

    Args:
        directory: The folder (made if missing).
        name: The shards' prefix and the manifest's stem.
        columns: Arrays of one length; row ``i`` of every column makes record ``i``.
        num_shards: Shards, of consecutive rows and near-equal sizes.
        metadata: JSON values stored in the manifest under ``metadata``.

    Returns:
        The manifest's path.
    """
    # A compiled module, which type checkers cannot read.
    from array_record.python.array_record_module import ArrayRecordWriter  # ty: ignore[import-not-found]

    lengths = {key: len(value) for key, value in columns.items()}
    if not columns or len(set(lengths.values())) != 1:
        raise DataError(f"write_records needs columns of one length, got {lengths}")
    (count,) = set(lengths.values())
    if not 1 <= num_shards <= max(count, 1):
        raise DataError(f"num_shards={num_shards} must lie in [1, {count}] (the number of records)")
    dtype = _record_dtype(columns)
    rows = np.empty(count, dtype)
    for key, value in columns.items():
        rows[key] = value
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, part in enumerate(np.array_split(rows, num_shards)):
        path = directory / shard_name(name, index, num_shards)
        writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
        for row in part:
            writer.write(row.tobytes())
        writer.close()
        shards.append({"file": path.name, "records": len(part), "bytes": path.stat().st_size})
    manifest = {
        "version": MANIFEST_VERSION,
        "dtype": np.lib.format.dtype_to_descr(dtype),
        "records": count,
        "shards": shards,
        "metadata": dict(metadata or {}),
    }
    path = manifest_path(directory, name)
    path.write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(directory: str | Path, name: str) -> dict[str, Any]:
    """The manifest ``write_records`` wrote, with every shard checked: present and of its written size.

    Raises:
        DataError: Naming the missing manifest, or the first missing or truncated shard.
    """
    path = manifest_path(directory, name)
    if not path.is_file():
        raise DataError(f"{path} does not exist; point at the folder write_records wrote (it holds {path.name})")
    try:
        manifest = json.loads(path.read_text())
        shards = [(Path(directory) / shard["file"], int(shard["bytes"])) for shard in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a record manifest ({error}); write the records again") from None
    for shard, size in shards:
        if not shard.is_file():
            raise DataError(
                f"ArrayRecord shard {shard} is missing (listed in {path}); restore it or write the records again"
            )
        found = shard.stat().st_size
        if found != size:
            raise DataError(
                f"ArrayRecord shard {shard} has {found} bytes, {size} when written (truncated or changed); "
                "restore it or write the records again"
            )
    return manifest


def read_records(directory: str | Path, name: str) -> Any:
    """The records ``write_records`` wrote, as a ``grain.MapDataset`` of dicts of numpy arrays.

    Args:
        directory: The folder of the shards and the manifest.
        name: The name they were written under.

    Returns:
        A ``grain.MapDataset`` read through ``grain.sources.ArrayRecordDataSource``.

    Raises:
        DataError: Naming the file, for a missing manifest or a missing, truncated or unreadable shard.
    """
    import grain

    manifest = read_manifest(directory, name)
    paths = [str(Path(directory) / shard["file"]) for shard in manifest["shards"]]
    dtype = np.lib.format.descr_to_dtype(_as_descr(manifest["dtype"]))
    try:
        source = grain.sources.ArrayRecordDataSource(paths)
    except RuntimeError as error:
        raise DataError(f"{_unreadable(paths)} cannot be read ({str(error).splitlines()[0]})") from None
    if len(source) != manifest["records"]:
        raise DataError(
            f"the shards of {manifest_path(directory, name)} hold {len(source)} records, {manifest['records']} "
            "when written; write the records again"
        )

    ends = np.cumsum([shard["records"] for shard in manifest["shards"]])
    return grain.MapDataset.source(_CheckedSource(source, paths, ends, dtype))


class _CheckedSource:
    """Grain's ``ArrayRecordDataSource`` whose records decode to dicts of arrays, and whose read errors
    (a shard damaged after it was opened) are ``DataError``s naming the shard."""

    def __init__(self, source: Any, paths: list[str], ends: np.ndarray, dtype: np.dtype) -> None:
        self._source, self._paths, self._ends, self._dtype = source, paths, ends, dtype

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._getitems([index])[0]

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The records at ``indices``, read together (Grain's batched read: the shards are read in parallel)."""
        try:
            records = self._source.__getitems__([int(i) for i in indices])
        except RuntimeError as error:
            shards = sorted({self._paths[int(np.searchsorted(self._ends, i, side="right"))] for i in indices})
            raise DataError(
                f"ArrayRecord shard {shards[0] if len(shards) == 1 else shards} cannot be read "
                f"({str(error).splitlines()[0]}); restore it or write the records again"
            ) from None
        for index, record in zip(indices, records, strict=True):
            if len(record) != self._dtype.itemsize:
                shard = self._paths[int(np.searchsorted(self._ends, index, side="right"))]
                raise DataError(f"record {index} of {shard} has {len(record)} bytes, not {self._dtype.itemsize}")
        rows = np.frombuffer(b"".join(records), self._dtype)
        columns = {key: rows[key] for key in self._dtype.names or ()}
        return [{key: values[i].copy() for key, values in columns.items()} for i in range(len(rows))]


def _as_descr(descr: Any) -> Any:
    """JSON lists back to the tuples of a structured dtype's description: ``(name, type[, shape])``."""
    return [tuple(tuple(part) if isinstance(part, list) else part for part in field) for field in descr]


def _unreadable(paths: list[str]) -> str:
    """The first shard that does not open on its own (all of them when each does)."""
    import grain

    for path in paths:
        try:
            grain.sources.ArrayRecordDataSource([path])
        except RuntimeError:
            return f"ArrayRecord shard {path}"
    return f"the ArrayRecord shards {paths}"
