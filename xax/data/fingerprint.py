"""Fingerprints of datasets: what a run records to tell whether two runs read the same data.

A fingerprint is cheap (no pass over the data) and the same in every process that builds the same
dataset:

- a ``datasets.Dataset``: Hugging Face's own ``_fingerprint`` (a hash of its table and of every
  transform applied to it), its row count and features;
- a ``grain.MapDataset``: its length and a sha256 of a few rows read at fixed indices;
- a streamed ``datasets.IterableDataset``: what its info says (builder, config, version, split
  sizes, shards); its content is not read, so it is reported as unknown;
- a dict of splits: each split's fingerprint, by name.

Examples:
    >>> import datasets
    >>> import numpy as np
    >>> from xax.data.fingerprint import dataset_fingerprint
    >>> a = datasets.Dataset.from_dict({"x": np.arange(4, dtype=np.int32)})
    >>> b = datasets.Dataset.from_dict({"x": np.arange(4, dtype=np.int32) + 1})
    >>> dataset_fingerprint(a)["rows"]
    4
    >>> dataset_fingerprint(a) == dataset_fingerprint(a), dataset_fingerprint(a) == dataset_fingerprint(b)
    (True, False)
"""

import hashlib
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from xax.data.grain import is_grain_map_dataset

# Rows read from a dataset without a fingerprint of its own, evenly spaced from the first to the last.
SAMPLED_ROWS = 8

UNKNOWN_CONTENT = "unknown (a stream is not read to fingerprint it)"


def dataset_fingerprint(dataset: object) -> dict[str, Any]:
    """A JSON-ready fingerprint of a dataset as ``get_dataset`` returns it (see the module's docstring).

    Args:
        dataset: A ``datasets.Dataset``, ``IterableDataset``, a dict of splits or a ``grain.MapDataset``.

    Returns:
        Its kind and fingerprint; ``{"splits": {name: fingerprint}}`` for a dict of splits.
    """
    if isinstance(dataset, Mapping):
        return {"splits": {str(name): dataset_fingerprint(split) for name, split in dataset.items()}}
    if isinstance(dataset, datasets.Dataset):
        return {
            "kind": "datasets.Dataset",
            "fingerprint": dataset._fingerprint,
            "rows": len(dataset),
            "features": {name: str(feature) for name, feature in dataset.features.items()},
        }
    if isinstance(dataset, datasets.IterableDataset):
        return _stream_fingerprint(dataset)
    if is_grain_map_dataset(dataset):
        return _sampled_fingerprint("grain.MapDataset", dataset)
    return {"kind": f"{type(dataset).__module__}.{type(dataset).__qualname__}", "content": "unknown"}


def _stream_fingerprint(dataset: datasets.IterableDataset) -> dict[str, Any]:
    info = dataset.info
    splits = {name: split.num_examples for name, split in (info.splits or {}).items()}
    features = {} if dataset.features is None else {name: str(f) for name, f in dataset.features.items()}
    return {
        "kind": "datasets.IterableDataset",
        "content": UNKNOWN_CONTENT,
        "builder": info.builder_name,
        "config": info.config_name,
        "version": None if info.version is None else str(info.version),
        "split_rows": splits,
        "shards": dataset.num_shards,
        "features": features,
    }


def _sampled_fingerprint(kind: str, dataset: Any) -> dict[str, Any]:
    """The length and a sha256 of the rows at ``SAMPLED_ROWS`` fixed indices of a map-style dataset."""
    rows = len(dataset)
    indices = sorted({int(i) for i in np.linspace(0, rows - 1, SAMPLED_ROWS).round()}) if rows else []
    digest = hashlib.sha256()
    for index in indices:
        digest.update(f"row {index}\n".encode())
        _hash_value(digest, dataset[index])
    return {"kind": kind, "rows": rows, "sampled_rows": indices, "sample_sha256": digest.hexdigest()}


def _hash_value(digest: Any, value: object) -> None:
    """Feeds a row (nested dicts, lists and arrays) into ``digest``, dtypes and shapes included."""
    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(f"key {key}\n".encode())
            _hash_value(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"seq {len(value)}\n".encode())
        for item in value:
            _hash_value(digest, item)
    elif isinstance(value, str | bytes):
        digest.update(value.encode() if isinstance(value, str) else value)
    else:
        array = np.asarray(value)
        digest.update(f"array {array.dtype.str} {array.shape}\n".encode())
        digest.update(repr(array.tolist()).encode() if array.dtype == object else np.ascontiguousarray(array).tobytes())
