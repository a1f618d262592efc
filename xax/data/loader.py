"""The batch source of a phase, from whatever holds the data: a Hugging Face dataset (map-style or
streamed), a dict of splits, or a Grain ``MapDataset``."""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import datasets

from xax.core.errors import DataError
from xax.core.state import Phase
from xax.data.grain import GrainBatchSource, is_grain_map_dataset
from xax.data.sources import BatchSource, IterableBatchSource, MapBatchSource

AnyDataset = datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict

VALID_SPLITS = ("validation", "valid", "test")


def split_for(dataset: Mapping[Any, Any], phase: Phase, *, origin: str = "the dataset") -> str:
    """The split of a dict of splits that a phase reads.

    Args:
        dataset: The splits by name (a ``DatasetDict`` or ``IterableDatasetDict``).
        phase: "train" reads "train"; "valid" the first of "validation", "valid", "test".
        origin: What gave the dataset, as error messages name it (``get_dataset('train')``).

    Returns:
        The split's name.

    Raises:
        DataError: When no split has one of the phase's names.
    """
    # Typed as a Mapping: runtime type checkers cannot resolve DatasetDict's generic parameters.
    names = ("train",) if phase == "train" else VALID_SPLITS
    for name in names:
        if name in dataset:
            return name
    raise DataError(
        f"{origin} returned splits {sorted(dataset)}, none of {', '.join(map(repr, names))}; "
        f"rename the split or return the {phase} split itself"
    )


def make_batch_source(
    dataset: object,
    phase: Phase,
    batch_size: int,
    *,
    seed: int,
    columns: Sequence[str] | None = None,
    shuffle_buffer: int = 10_000,
    in_memory_max_mb: int = 4096,
    origin: str = "the dataset",
) -> BatchSource:
    """The batch source of a phase, at cursor (0, 0).

    Training shuffles, drops the last partial batch and repeats forever; validation makes one pass
    in order and keeps the last partial batch.

    Args:
        dataset: A ``datasets.Dataset``, ``IterableDataset``, a dict of splits (a ``DatasetDict``,
            ``IterableDatasetDict`` or plain dict of datasets; see ``split_for``) or a ``grain.MapDataset``.
        phase: "train" or "valid".
        batch_size: Rows per batch (over all processes).
        seed: The shuffle seed.
        columns: The columns batches hold; None keeps every column.
        shuffle_buffer: Examples in the shuffle buffer of a streamed dataset.
        in_memory_max_mb: Load a map-style dataset up to this size (MB) into numpy arrays.
        origin: What gave the dataset, as error messages name it (``get_dataset('train')``).

    Returns:
        The source.

    Raises:
        ConfigError: For a batch size below 1 or a negative seed.
        DataError: For a dataset of another type (naming the ``datasets`` constructor that makes one
            of it: ``Dataset.from_dict`` for columns, ``IterableDataset.from_generator`` for a generator),
            or a dict of splits without the phase's split.
    """
    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict) or _is_dict_of_splits(dataset):
        dataset = dataset[split_for(dataset, phase, origin=origin)]
    train = phase == "train"
    kwargs: dict[str, Any] = {"columns": columns, "seed": seed, "shuffle": train, "drop_last": train, "repeat": train}
    if isinstance(dataset, datasets.IterableDataset):
        return IterableBatchSource(dataset, batch_size, shuffle_buffer=shuffle_buffer, **kwargs)
    if isinstance(dataset, datasets.Dataset):
        return MapBatchSource(dataset, batch_size, in_memory_max_mb=in_memory_max_mb, **kwargs)
    if is_grain_map_dataset(dataset):
        return GrainBatchSource(dataset, batch_size, **kwargs)
    raise DataError(f"{origin} returned {_describe(dataset)}; {_fix_for(dataset)}")


def _is_dict_of_splits(dataset: object) -> TypeGuard[Mapping[Any, datasets.Dataset | datasets.IterableDataset]]:
    """A plain dict whose values are all datasets (a DatasetDict by another name)."""
    split_types = datasets.Dataset | datasets.IterableDataset
    return isinstance(dataset, Mapping) and bool(dataset) and all(isinstance(v, split_types) for v in dataset.values())


def _describe(dataset: object) -> str:
    if dataset is None:
        return "None"
    if isinstance(dataset, str):
        return f"the string {dataset!r}"
    if isinstance(dataset, Mapping):
        return f"a {type(dataset).__name__} with keys {sorted(map(str, dataset))[:8]}"
    module = type(dataset).__module__.split(".")[0]
    return f"a {type(dataset).__qualname__}" if module == "builtins" else f"a {module}.{type(dataset).__qualname__}"


def _fix_for(dataset: object) -> str:
    """What to return instead of an object that is not a dataset, by the kind of object it is."""
    accepted = "return a datasets.Dataset, IterableDataset, DatasetDict or grain.MapDataset"
    if isinstance(dataset, str):
        return (
            "load it first: xax.data.load_hub_dataset(name, split=...) for a Hugging Face hub name, "
            "datasets.load_dataset('csv' or 'parquet', data_files=path) for a local file"
        )
    if isinstance(dataset, Mapping):
        return (
            "wrap the columns: datasets.Dataset.from_dict(columns) (each column an array or a list of rows), "
            "or give a dict of splits whose values are datasets"
        )
    if isinstance(dataset, Iterator):
        return (
            "wrap the function that makes it: datasets.IterableDataset.from_generator(make_rows), "
            "so that every epoch and every resume can start it again"
        )
    if type(dataset).__name__ == "DataFrame":
        return "convert it: datasets.Dataset.from_pandas(frame) (or Dataset.from_polars)"
    if isinstance(dataset, Sequence) or hasattr(dataset, "__array__"):
        return "name the columns: datasets.Dataset.from_dict({'x': array, 'y': labels})"
    return accepted
