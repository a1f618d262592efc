"""Small datasets shared by the data tests."""

from collections.abc import Iterator
from typing import TypeVar

import datasets
import numpy as np

from xax.data import Batch

NUM_SAMPLES = 103
T = TypeVar("T")


def make_dataset(num_samples: int = NUM_SAMPLES) -> datasets.Dataset:
    """Samples whose "id" column is their index, with a uint8 image and a float32 vector."""
    ids = np.arange(num_samples)
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "image": datasets.Array2D((4, 3), "uint8"),
            "vector": datasets.List(datasets.Value("float32")),
            "flag": datasets.Value("bool"),
        }
    )
    columns = {
        "id": ids,
        "image": (ids[:, None, None] + np.zeros((1, 4, 3), np.int64)).astype(np.uint8),
        "vector": [[float(i), float(-i)] for i in ids],
        "flag": ids % 2 == 0,
    }
    return datasets.Dataset.from_dict(columns, features=features)


def take(iterator: Iterator[T], count: int) -> list[T]:
    return [next(iterator) for _ in range(count)]


def ids_of(batches: list[Batch]) -> list[list[int]]:
    return [batch["id"].tolist() for batch in batches]
