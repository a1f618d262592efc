"""Datasets of the Hugging Face hub by name, failing at once, in one line, where the hub cannot be
reached and the dataset is not in the local cache."""

from typing import Any

import datasets
import datasets.config

from xax.core.errors import HubError
from xax.utils.hub import OFFLINE_FIX, hub_endpoint, hub_unreachable

LOCAL_FIX = "or load local files: datasets.load_dataset('parquet' or 'csv', data_files=...)"


def load_hub_dataset(
    path: str,
    name: str | None = None,
    *,
    split: str | None = None,
    probe_timeout: float = 10.0,
    **kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset | datasets.IterableDatasetDict:
    """``datasets.load_dataset(path, name, split=split, **kwargs)`` of a hub dataset, failing fast offline.

    With ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) the dataset is read from the local cache.
    Otherwise the hub is asked once, with ``probe_timeout``, before ``datasets`` starts its retries.

    Args:
        path: The dataset's hub name ("ylecun/mnist").
        name: The configuration, for datasets that have several.
        split: A split ("train", "test[:10%]"); None gives a ``DatasetDict`` of every split.
        probe_timeout: Seconds to wait for the hub's first answer.
        **kwargs: Passed on to ``datasets.load_dataset`` (``streaming=True``, ``revision``, ...).

    Returns:
        What ``datasets.load_dataset`` returns.

    Raises:
        HubError: The hub cannot be reached (or offline mode is on) and the dataset is not cached.
    """
    offline = datasets.config.HF_HUB_OFFLINE
    if not offline and (reason := hub_unreachable(probe_timeout)) is not None:
        raise HubError(f"dataset {path!r}: {reason}; connect to the network, {OFFLINE_FIX}, {LOCAL_FIX}")
    try:
        return datasets.load_dataset(path, name, split=split, **kwargs)
    except ConnectionError as error:
        if offline:
            cache_dir = kwargs.get("cache_dir") or datasets.config.HF_DATASETS_CACHE
            raise HubError(
                f"dataset {path!r} is not in the Hugging Face cache ({cache_dir}) and "
                f"offline mode is on (HF_HUB_OFFLINE); load it once with network access, {LOCAL_FIX}"
            ) from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubError(f"dataset {path!r} from {hub_endpoint()}: {reason}; {OFFLINE_FIX}, {LOCAL_FIX}") from None
