"""The data loader mixin: the task's dataset as the batch source of each phase (``xax.data``)."""

import functools
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import jax
from jax.sharding import Mesh
from typing_extensions import override

from xax.core.config import check_range, field
from xax.core.errors import ConfigError, HubError
from xax.core.state import Phase
from xax.data.hub import LOCAL_FIX
from xax.data.loader import AnyDataset, make_batch_source
from xax.data.placement import process_rows
from xax.data.sources import BatchSource
from xax.task.base import BaseConfig, BaseTask
from xax.utils.hub import OFFLINE_FIX


@dataclass
class DataOptions:
    prefetch: int = field(2, help="Batches prepared ahead by a background worker and kept on the devices")
    shuffle_buffer: int = field(10_000, help="Examples in the shuffle buffer when streaming an IterableDataset")
    in_memory_max_mb: int = field(4096, help="Load map-style datasets up to this size (MB) into numpy arrays")
    device_resident_max_mb: int = field(
        1024,
        help="Keep an in-memory training set up to this size (MB) on each device and gather every batch inside "
        "the jitted step, so only the batch's indices cross to the device (0 turns it off)",
    )


@dataclass
class DataLoaderConfig(BaseConfig):
    batch_size: int = field(128, help="Samples per optimizer step, over all devices")
    valid_batch_size: int | None = field(None, help="Samples per validation step; None uses batch_size")
    data: DataOptions = field(DataOptions(), help="Data loading options")


Config = TypeVar("Config", bound=DataLoaderConfig)


class DataLoaderMixin(BaseTask[Config], Generic[Config]):
    """Builds the batch source of each phase from the task's dataset.

    In a run of several processes, each process's sources read only the rows of each global batch
    that its devices hold on ``mesh`` (set by the launcher).
    """

    mesh: Mesh | None = None

    def __init__(self, config: Config) -> None:
        super().__init__(config)

    @override
    def validate_config(self) -> None:
        super().validate_config()
        config = self.config
        check_range("batch_size", config.batch_size, minimum=1)
        check_range("valid_batch_size", config.valid_batch_size, minimum=1, unset="batch_size")
        check_range("data.prefetch", config.data.prefetch, minimum=1)
        check_range("data.shuffle_buffer", config.data.shuffle_buffer, minimum=1)
        check_range("data.in_memory_max_mb", config.data.in_memory_max_mb, minimum=0)
        check_range("data.device_resident_max_mb", config.data.device_resident_max_mb, minimum=0)

    @abstractmethod
    def get_dataset(self, phase: Phase) -> AnyDataset:
        """The dataset of a phase: a Dataset, an IterableDataset, or a dict of splits.

        A dict of splits gives "train" for training and the first of "validation", "valid", "test"
        for validation.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement get_dataset(phase)")

    def batch_columns(self) -> Sequence[str] | None:
        """The columns batches hold; None loads every column."""
        return None

    def _dataset_of(self, phase: Phase) -> object:
        """``get_dataset(phase)``, where a dataset that needs the network and cannot reach it is one line."""
        try:
            return self.get_dataset(phase)
        except ConnectionError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise HubError(
                f"get_dataset({phase!r}): {reason}; connect to the network, {OFFLINE_FIX}, {LOCAL_FIX} "
                "(xax.data.load_hub_dataset fails at once without network)"
            ) from None

    def get_batch_source(self, phase: Phase, *, seed: int) -> BatchSource:
        """The batch source of a phase (see ``xax.data.make_batch_source``).

        Training shuffles, drops the last partial batch and repeats forever; validation makes one
        pass in order and keeps the last partial batch.

        Args:
            phase: "train" or "valid".
            seed: The shuffle seed.

        Returns:
            A source at cursor (0, 0).
        """
        config = self.config
        train = phase == "train"
        batch_size = config.batch_size if train or config.valid_batch_size is None else config.valid_batch_size
        key = "batch_size" if train or config.valid_batch_size is None else "valid_batch_size"
        if batch_size < 1:
            raise ConfigError(f"{key}={batch_size} must be at least 1")
        dataset = self._dataset_of(phase)
        self.on_dataset(phase, dataset)
        source = make_batch_source(
            dataset,
            phase,
            batch_size,
            seed=seed,
            columns=self.batch_columns(),
            shuffle_buffer=config.data.shuffle_buffer,
            in_memory_max_mb=config.data.in_memory_max_mb,
            origin=f"get_dataset({phase!r})",
        )
        if self.mesh is not None and jax.process_count() > 1:
            source.keep_rows(functools.partial(process_rows, self.mesh))
        return source
