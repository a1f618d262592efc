"""Tests for the MNIST loader and the data shipped with the examples."""

import time
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub
import numpy as np
import PIL.Image
import pytest

from examples.mnist_data import from_image_dataset, load_mnist
from xax.core.errors import DataError, HubError
from xax.data import MapBatchSource

CLASS_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


@pytest.mark.parametrize("split", ["train", "test"])
def test_local_split_shapes_dtypes_and_class_counts(split: str) -> None:
    start = time.perf_counter()
    dataset = load_mnist(split)  # ty: ignore[invalid-argument-type]
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0
    size = sum(CLASS_COUNTS[split])
    assert len(dataset) == size
    arrays = dataset.with_format("numpy", dtype=np.uint8)[:]
    assert arrays["image"].shape == (size, 28, 28)
    assert arrays["image"].dtype == np.uint8
    assert dataset.features["label"].num_classes == 10
    batch = next(iter(MapBatchSource(dataset, size, shuffle=False, drop_last=False, repeat=False)))
    assert batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int64
    assert np.bincount(batch["label"], minlength=10).tolist() == CLASS_COUNTS[split]
    if split == "train":
        pixels = batch["image"].astype(np.float64) / 255.0
        assert abs(pixels.mean() - 0.1307) < 1e-4
        assert abs(pixels.std() - 0.3081) < 1e-4


def test_unknown_split_is_refused() -> None:
    with pytest.raises(DataError, match="'valid' does not exist"):
        load_mnist("valid")  # ty: ignore[invalid-argument-type]


def test_hub_format_converts_to_the_same_arrays() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5]
    # The hub serves PNG-encoded grayscale images decoded to PIL by the Image feature.
    pil_images = [PIL.Image.fromarray(image, mode="L") for image in images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    hub_like = datasets.Dataset.from_dict({"image": pil_images, "label": labels}, features=features)
    assert isinstance(hub_like[0]["image"], PIL.Image.Image)
    converted = from_image_dataset(hub_like)
    batch = next(iter(MapBatchSource(converted, 5, shuffle=False, drop_last=False, repeat=False)))
    assert batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"], images)
    assert batch["label"].tolist() == labels
    assert converted.features == load_mnist("test").features


def test_the_hub_source_without_network_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    # An empty cache, whatever this machine has downloaded before.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    message = r"^dataset 'ylecun/mnist' is not in the Hugging Face cache .* data_files=\.\.\.\)$"
    with pytest.raises(HubError, match=message) as error:
        load_mnist("test", source="hub")
    assert str(tmp_path / "datasets") in str(error.value)
