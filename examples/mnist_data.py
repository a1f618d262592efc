"""MNIST as a ``datasets.Dataset`` of uint8 28x28 images and integer labels.

The four IDX files ship with the examples (``examples/data/mnist``), so the examples run offline;
``source="hub"`` loads the same data from the Hugging Face hub instead.
"""

from pathlib import Path
from typing import Literal, cast

import datasets
import numpy as np
import pyarrow as pa
from datasets.features.features import Array2DExtensionType
from datasets.table import InMemoryTable
from jaxtyping import Integer, UInt8

from xax import DataError, read_idx
from xax.data import load_hub_dataset

DATA_DIR = Path(__file__).resolve().parent / "data" / "mnist"
HUB_NAME = "ylecun/mnist"
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

# (file name, MD5 of the decompressed bytes) of the images and the labels of each split.
FILES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "train": (
        ("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
        ("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
        ("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
    ),
}

FEATURES = datasets.Features(
    {
        "image": datasets.Array2D(IMAGE_SHAPE, "uint8"),
        "label": datasets.ClassLabel(names=[str(digit) for digit in range(NUM_CLASSES)]),
    }
)


def _array2d_column(images: UInt8[np.ndarray, "n h w"]) -> pa.ExtensionArray:
    """An Array2D Arrow column over the images' bytes, built without a Python loop."""
    num, height, width = images.shape
    values = pa.array(np.ascontiguousarray(images).reshape(-1))
    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, num * height * width + 1, width, dtype=np.int32)), values)
    grid = pa.ListArray.from_arrays(pa.array(np.arange(0, num * height + 1, height, dtype=np.int32)), rows)
    return pa.ExtensionArray.from_storage(Array2DExtensionType((height, width), "uint8"), grid)


def mnist_dataset(images: UInt8[np.ndarray, "n 28 28"], labels: Integer[np.ndarray, " n"]) -> datasets.Dataset:
    """Wraps image and label arrays as a Dataset with MNIST's features.

    Args:
        images: The digits, uint8, 28x28.
        labels: The classes, 0 to 9.

    Returns:
        A Dataset with columns "image" (Array2D uint8) and "label" (ClassLabel, stored as int64).

    Raises:
        DataError: If the arrays do not have MNIST's shapes, dtypes or label range.
    """
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"MNIST images must be uint8 of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise DataError(f"MNIST has {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"MNIST labels must lie in [0, 9], found [{labels.min()}, {labels.max()}]")
    table = pa.table({"image": _array2d_column(images), "label": pa.array(labels.astype(np.int64))})
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=FEATURES))


def from_image_dataset(dataset: datasets.Dataset) -> datasets.Dataset:
    """Converts MNIST with PIL image values (as the hub serves it) to the uint8 array format.

    Args:
        dataset: A Dataset with an "image" column of grayscale 28x28 images and a "label" column.

    Returns:
        The same samples in the format of :func:`mnist_dataset`.
    """
    # Each PNG must be decoded anyway; the numpy formatter does it and stacks the results.
    images = dataset.with_format("numpy", columns=["image"], dtype=np.uint8)[:]["image"]
    labels = dataset.with_format("numpy", columns=["label"])[:]["label"]
    if images.ndim == 4 and images.shape[-1] == 1:  # (N, H, W, 1) from single-channel images
        images = images[..., 0]
    return mnist_dataset(images, labels)


def load_mnist(split: Literal["train", "test"], source: Literal["local", "hub"] = "local") -> datasets.Dataset:
    """Loads one MNIST split.

    Args:
        split: "train" (60,000 samples) or "test" (10,000 samples).
        source: "local" reads the IDX files shipped in ``examples/data/mnist`` and checks their MD5s;
            "hub" downloads ``ylecun/mnist`` (needs a network).

    Returns:
        A Dataset with columns "image" (uint8 28x28, Array2D) and "label" (ClassLabel, int64).

    Raises:
        DataError: If the split or source is unknown, or a local file is missing or corrupt.
    """
    if split not in FILES:
        raise DataError(f"MNIST split {split!r} does not exist; use 'train' or 'test'")
    if source == "hub":
        # One split of a map-style dataset; without network (and not cached) this is one line at once.
        return from_image_dataset(cast(datasets.Dataset, load_hub_dataset(HUB_NAME, split=split)))
    if source != "local":
        raise DataError(f"MNIST source {source!r} is unknown; use 'local' or 'hub'")
    (images_name, images_md5), (labels_name, labels_md5) = FILES[split]
    for name in (images_name, labels_name):
        if not (DATA_DIR / name).is_file():
            raise DataError(f"{DATA_DIR / name} is missing; restore it or load with source='hub'")
    images = read_idx(DATA_DIR / images_name, md5=images_md5)
    labels = read_idx(DATA_DIR / labels_name, md5=labels_md5)
    return mnist_dataset(images, labels)
