"""What get_dataset may return: datasets and dicts of splits are read; anything else is refused in
one line that names the datasets constructor making a dataset of it."""

import re

import datasets
import numpy as np
import pandas as pd
import pytest

from xax.core.errors import DataError
from xax.data import make_batch_source

ORIGIN = "get_dataset('train')"


def _rows():
    yield {"x": np.zeros(2, np.float32)}


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (
            {"x": np.zeros((4, 2)), "y": [0, 1, 0, 1]},
            r"returned a dict with keys \['x', 'y'\]; wrap the columns: datasets\.Dataset\.from_dict\(columns\)",
        ),
        (_rows(), r"returned a generator; wrap the function that makes it: datasets\.IterableDataset\.from_generator"),
        (iter([1, 2]), r"returned a list_iterator; .*IterableDataset\.from_generator\(make_rows\)"),
        (np.zeros((4, 2)), r"returned a numpy\.ndarray; name the columns: datasets\.Dataset\.from_dict\("),
        ([[0.0, 1.0]], r"returned a list; name the columns: datasets\.Dataset\.from_dict\("),
        (pd.DataFrame({"x": [1.0]}), r"returned a pandas\.DataFrame; convert it: datasets\.Dataset\.from_pandas"),
        ("ylecun/mnist", r"returned the string 'ylecun/mnist'; load it first: xax\.data\.load_hub_dataset\(name"),
        (None, r"returned None; return a datasets\.Dataset, IterableDataset, DatasetDict or grain\.MapDataset$"),
    ],
    ids=["dict", "generator", "iterator", "array", "list", "dataframe", "hub-name", "none"],
)
def test_what_is_not_a_dataset_is_refused_with_its_constructor(returned: object, message: str) -> None:
    with pytest.raises(DataError, match=rf"^{re.escape(ORIGIN)} {message}") as error:
        make_batch_source(returned, "train", 2, seed=0, origin=ORIGIN)
    assert "\n" not in str(error.value)


def test_a_plain_dict_of_splits_is_read_like_a_dataset_dict() -> None:
    train = datasets.Dataset.from_dict({"x": np.arange(8, dtype=np.int32)})
    test = datasets.Dataset.from_dict({"x": np.arange(100, 103, dtype=np.int32)})
    source = make_batch_source({"train": train, "test": test}, "valid", 2, seed=0)
    values = np.concatenate([batch["x"] for batch in source])
    np.testing.assert_array_equal(values, [100, 101, 102])
    with pytest.raises(DataError, match=r"returned splits \['test'\], none of 'train'"):
        make_batch_source({"test": test}, "train", 2, seed=0, origin=ORIGIN)
