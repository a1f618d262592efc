"""Data for training, usable without a Task: datasets to fixed-shape numpy batches in a resumable
order, a background prefetcher, and the placement of global batches on a device mesh.

- ``sources``: ``MapBatchSource`` (``datasets.Dataset``), ``IterableBatchSource`` (streamed).
- ``grain``: ``GrainBatchSource`` (a ``grain.MapDataset``; Grain is an optional extra).
- ``loader``: ``make_batch_source``, the source of a phase from any of those or a dict of splits.
- ``records``: ``write_records`` / ``read_records``, fixed-shape records in ArrayRecord shards with a
  checked manifest, read back through Grain's ``ArrayRecordDataSource``.
- ``hub``: ``load_hub_dataset``, a Hugging Face hub dataset by name, failing at once without network.
- ``cursor``: ``Cursor``, the position a checkpoint saves; ``shuffle_order``, an epoch's order.
- ``prefetch``: ``DevicePrefetcher``, batches placed on the devices ahead of the loop.
- ``feeds``: what a training loop pulls each step (prefetched batches, or indices into resident data).
- ``placement``: each process's rows of a global batch, and how a batch is sharded.

Examples:
    >>> import datasets
    >>> import numpy as np
    >>> from xax.data import Cursor, MapBatchSource
    >>> dataset = datasets.Dataset.from_dict({"x": np.arange(10, dtype=np.int32)})
    >>> source = MapBatchSource(dataset, 4, seed=0)
    >>> first = next(iter(source))
    >>> source.cursor
    Cursor(epoch=0, index=1)
    >>> again = MapBatchSource(dataset, 4, seed=0)
    >>> again.restore(Cursor(0, 0))
    >>> bool((next(iter(again))["x"] == first["x"]).all())
    True
"""

from xax.data.columns import Batch as Batch
from xax.data.columns import check_columns as check_columns
from xax.data.columns import column_to_numpy as column_to_numpy
from xax.data.columns import table_to_batch as table_to_batch
from xax.data.cursor import Cursor as Cursor
from xax.data.cursor import shuffle_order as shuffle_order
from xax.data.feeds import Feed as Feed
from xax.data.feeds import PrefetchFeed as PrefetchFeed
from xax.data.feeds import ResidentFeed as ResidentFeed
from xax.data.feeds import gather_batch as gather_batch
from xax.data.feeds import resident_bytes as resident_bytes
from xax.data.grain import GrainBatchSource as GrainBatchSource
from xax.data.grain import is_grain_map_dataset as is_grain_map_dataset
from xax.data.hub import load_hub_dataset as load_hub_dataset
from xax.data.loader import VALID_SPLITS as VALID_SPLITS
from xax.data.loader import AnyDataset as AnyDataset
from xax.data.loader import make_batch_source as make_batch_source
from xax.data.loader import split_for as split_for
from xax.data.placement import ProcessRows as ProcessRows
from xax.data.placement import batch_sharding as batch_sharding
from xax.data.placement import place_global_batch as place_global_batch
from xax.data.placement import place_rows as place_rows
from xax.data.placement import process_rows as process_rows
from xax.data.prefetch import DevicePrefetcher as DevicePrefetcher
from xax.data.records import read_manifest as read_manifest
from xax.data.records import read_records as read_records
from xax.data.records import write_records as write_records
from xax.data.sources import BatchSource as BatchSource
from xax.data.sources import IterableBatchSource as IterableBatchSource
from xax.data.sources import MapBatchSource as MapBatchSource
from xax.data.sources import check_batching as check_batching
