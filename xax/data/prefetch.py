"""A background worker that keeps a few batches of a source already placed on the devices."""

import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import jax

from xax.core.errors import ConfigError
from xax.data.columns import Batch
from xax.data.cursor import Cursor
from xax.data.sources import BatchSource

_POLL_S = 0.05  # how often a blocked worker or consumer checks whether it should stop
_JOIN_TIMEOUT_S = 5.0

_BATCH, _END, _ERROR = "batch", "end", "error"


def _put(out: queue.Queue, item: tuple[str, Any, Cursor | None], stop: threading.Event) -> bool:
    """Puts an item, giving up (False) once ``stop`` is set, so a full queue never blocks close()."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(source: BatchSource, place: Callable[[Batch], Any], out: queue.Queue, stop: threading.Event) -> None:
    """The worker: places each batch on the devices and queues it with the cursor that follows it.

    It holds no reference to the prefetcher, so a prefetcher that is dropped without close() can
    still be collected (its finalizer sets ``stop``).
    """
    try:
        for batch in source:
            if not _put(out, (_BATCH, place(batch), source.cursor), stop):
                return
        _put(out, (_END, None, None), stop)
    except BaseException as error:  # the consumer re-raises it
        _put(out, (_ERROR, error, None), stop)


class DevicePrefetcher:
    """Iterates a batch source in a background thread, keeping batches placed on the devices.

    Args:
        source: Where the host batches come from; it is iterated from its current cursor.
        sharding: The sharding each batch is placed with (``jax.device_put(batch, sharding)``), e.g.
            ``NamedSharding(mesh, PartitionSpec("data"))`` to split the batch axis over the data axis;
            or a function that places a host batch itself and returns the device batch (e.g. with
            ``jax.make_array_from_process_local_data`` on several hosts).
        depth: Batches kept ready in the queue.
    """

    def __init__(
        self,
        source: BatchSource,
        sharding: jax.sharding.Sharding | Callable[[Batch], Any],
        depth: int = 2,
    ) -> None:
        if depth < 1:
            raise ConfigError(f"data.prefetch={depth} must be at least 1")
        if isinstance(sharding, jax.sharding.Sharding):
            target = sharding

            def place(batch: Batch) -> Any:
                return jax.device_put(batch, target)

        else:
            place = sharding
        self.wait_time_s = 0.0
        self._cursor = source.cursor
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._closed = False
        self._thread = threading.Thread(
            target=_produce, args=(source, place, self._queue, self._stop), name="xax-data-prefetch", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    @property
    def cursor(self) -> Cursor:
        """Source position of the next batch this iterator returns (not of the worker, which runs ahead)."""
        return self._cursor

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._closed:
            raise RuntimeError("the DevicePrefetcher was closed; make a new one to read more batches")
        if self._finished:
            raise StopIteration
        start = time.perf_counter()
        while True:
            try:
                kind, value, cursor = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data worker stopped without a result") from None
        self.wait_time_s += time.perf_counter() - start
        if kind == _ERROR:
            self.close()
            raise value
        if kind == _END:
            self._finished = True
            raise StopIteration
        self._cursor = cursor
        return value

    def close(self) -> None:
        """Stops the worker and frees the queued batches; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=_JOIN_TIMEOUT_S)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> "DevicePrefetcher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
