"""Arrow columns to numpy batches: a dict of arrays with a leading batch axis, of fixed shapes.

Columns are read at the Arrow level, never row by row, and keep their stored dtypes (a uint8 image
stays uint8; the numpy formatter of ``datasets`` would widen every integer column to int64).
"""

from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa

from xax.core.errors import DataError

Batch = dict[str, np.ndarray]

_SCAN_ROWS = 65_536  # rows per Arrow batch when scanning a column for ragged values


def _ragged_error(name: str, lengths: object) -> DataError:
    return DataError(
        f"column {name!r} has variable-length values ({lengths}); batches need fixed shapes: pad or "
        "truncate it to one length in a map(), or leave it out of batch_columns()"
    )


def _flatten_lists(name: str, array: pa.Array) -> tuple[pa.Array, tuple[int, ...]]:
    """Strips list levels off an Arrow array, checking that each level has one length.

    Returns:
        The flat values and the shape of one row (without the row axis).
    """
    shape: list[int] = []
    while True:
        if isinstance(array.type, pa.ExtensionType):  # datasets' Array2D..Array5D
            array = array.storage
        kind = array.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            return array, tuple(shape)
        if array.null_count:
            raise DataError(f"column {name!r} has missing (null) values; fill or filter them in a map()")
        if pa.types.is_fixed_size_list(kind):
            shape.append(kind.list_size)
        elif len(array):
            lengths = array.value_lengths().to_numpy()
            low, high = int(lengths.min()), int(lengths.max())
            if low != high:
                raise _ragged_error(name, f"lengths from {low} to {high}")
            shape.append(low)
        else:
            shape.append(0)
        array = array.flatten()


def column_to_numpy(name: str, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Converts one Arrow column into a numpy array of shape (rows, *row_shape), keeping its dtype.

    Args:
        name: The column name, for error messages.
        column: The column's values.

    Returns:
        The values as one array.

    Raises:
        DataError: If the column holds nulls, variable-length lists or values that are not numbers.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    num_rows = len(array)
    values, row_shape = _flatten_lists(name, array)
    kind = values.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DataError(
            f"column {name!r} holds {kind} values, not numbers; convert it to numeric arrays in a map() "
            "(tokenize text, decode images) or leave it out of batch_columns()"
        )
    if values.null_count:
        raise DataError(f"column {name!r} has missing (null) values; fill or filter them in a map()")
    return values.to_numpy(zero_copy_only=False).reshape((num_rows, *row_shape))


def table_to_batch(table: pa.Table, columns: Sequence[str]) -> Batch:
    """Converts the named columns of an Arrow table to numpy arrays."""
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise _missing_error(missing[0], table.column_names)
    return {name: column_to_numpy(name, table.column(name)) for name in columns}


def _missing_error(name: str, available: Sequence[str]) -> DataError:
    return DataError(
        f"column {name!r} is not in the dataset; available columns: {', '.join(map(repr, available))}; "
        "fix batch_columns() or add the column in a map()"
    )


def _feature_kind(feature: object) -> str:
    """Whether a feature gives rows of one shape: 'fixed', 'variable' or 'unsupported'."""
    if isinstance(feature, datasets.ClassLabel):
        return "fixed"
    if isinstance(feature, datasets.Value):
        kind = feature.pa_type
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
        return "fixed" if numeric else "unsupported"
    if isinstance(feature, datasets.Array2D | datasets.Array3D | datasets.Array4D | datasets.Array5D):
        return "variable" if feature.shape[0] is None else "fixed"
    if isinstance(feature, datasets.List | datasets.LargeList):
        inner = _feature_kind(feature.feature)
        if inner == "unsupported":
            return inner
        fixed = isinstance(feature, datasets.List) and feature.length >= 0
        return inner if fixed else "variable"
    return "unsupported"


def _scan_ragged(dataset: datasets.Dataset, name: str) -> None:
    """Reads a variable-length column in Arrow batches and raises if its rows differ in shape."""
    shapes: set[tuple[int, ...]] = set()
    for table in dataset.select_columns([name]).with_format("arrow").iter(batch_size=_SCAN_ROWS):
        shapes.add(_flatten_lists(name, table.column(name).combine_chunks())[1])
        if len(shapes) > 1:
            raise _ragged_error(name, "row shapes " + " and ".join(map(str, sorted(shapes))))


def check_columns(dataset: datasets.Dataset | datasets.IterableDataset, columns: Sequence[str]) -> None:
    """Checks that the columns exist and that each holds numbers of one shape per row.

    A map-style dataset's variable-length list columns are scanned to confirm that every row has the
    same length; an IterableDataset's rows are checked batch by batch as they stream.

    Args:
        dataset: The dataset to check.
        columns: The columns batches will hold.

    Raises:
        DataError: Naming the first missing, non-numeric or ragged column.
    """
    available = dataset.column_names
    if available is None:  # a stream whose features are unknown until it is read
        return
    for name in columns:
        if name not in available:
            raise _missing_error(name, available)
    features = dataset.features or {}
    for name in columns:
        feature = features.get(name)
        kind = "variable" if feature is None else _feature_kind(feature)
        if kind == "unsupported":
            raise DataError(
                f"column {name!r} holds {feature}, not numbers; convert it to numeric arrays in a map() "
                "(tokenize text, decode images) or leave it out of batch_columns()"
            )
        if kind == "variable" and isinstance(dataset, datasets.Dataset):
            _scan_ragged(dataset, name)
