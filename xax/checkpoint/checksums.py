"""Checksums of a checkpoint's arrays: one per array, of its global value, so that it verifies
under any mesh; computed on the device, written beside the arrays, verified on every read."""

import asyncio
import concurrent.futures
import json
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax
from jaxtyping import Array, PyTree, UInt32
from typing_extensions import override

from xax.checkpoint.errors import CorruptCheckpointError
from xax.checkpoint.tree import named_leaves
from xax.core.errors import CheckpointError

CHECKSUM_ALGORITHM = "xax-fmix32-sum-v1"

_MIX_1, _MIX_2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3's 32-bit finalizer
_SEED, _GOLDEN = 0x243F6A88, 0x9E3779B1


def _fmix32(h: Array) -> Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_MIX_1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_MIX_2)
    return h ^ (h >> 16)


def _words(x: Array) -> Array:
    """The bits of ``x`` as uint32 words (narrower types widened, wider ones split)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_checksum(x: Array) -> Array:
    # Each element is mixed with its position in the global array (a bijection of its bits for a
    # given position) and the mixes are summed modulo 2**32: the sum does not depend on how the
    # array is split over devices or processes, and any single changed element changes it. The
    # second word weights each mix by an odd factor of its position (a swap changes it).
    words = _words(x)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    mixed = _fmix32((words ^ jnp.uint32(_SEED)) + position * jnp.uint32(_GOLDEN))
    weight = position * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32), jnp.sum(mixed * weight, dtype=jnp.uint32)])


@jax.jit
def _checksums_fn(leaves: list[Array]) -> UInt32[Array, "n 2"]:
    return jnp.stack([_array_checksum(leaf) for leaf in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


# Executables compiled ahead of a first save (``compile_checksums``), by the arrays' signature: a
# jitted function's own cache is not filled by compiling it ahead of time.
_COMPILED: dict[tuple[Any, ...], Any] = {}


def _signature(leaves: list[Any]) -> tuple[Any, ...]:
    return tuple((tuple(leaf.shape), str(leaf.dtype), getattr(leaf, "sharding", None)) for leaf in leaves)


def _array_leaves(tree: PyTree) -> tuple[list[str], list[Any]]:
    leaves = named_leaves(tree)
    names = [name for name, leaf in leaves.items() if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]
    return names, [leaves[name] for name in names]


def array_checksums(tree: PyTree) -> tuple[list[str], Array]:
    """The arrays' dotted names and their checksums, as a (names, 2) uint32 device array.

    Returns as soon as the computation is dispatched: the device computes the checksums while the
    caller goes on (reading the result waits for them). Every process of a multi-process job must
    call it together (it is one computation over the global arrays).
    """
    names, leaves = _array_leaves(tree)
    arrays = [jnp.asarray(leaf) for leaf in leaves]
    compiled = _COMPILED.get(_signature(arrays))
    return names, (compiled if compiled is not None else _checksums_fn)(arrays)


def compile_checksums(tree: PyTree) -> None:
    """Compiles :func:`array_checksums` for arrays shaped, typed and placed as ``tree``'s, reading none
    of them (they may be donated meanwhile), so that a first save of such arrays does not compile it."""
    _, leaves = _array_leaves(tree)
    signature = _signature(leaves)
    if signature not in _COMPILED:
        while len(_COMPILED) >= 8:  # one per train-state layout; several runs in one process at most
            _COMPILED.pop(next(iter(_COMPILED)))
        abstract = [
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None)) for leaf in leaves
        ]
        _COMPILED[signature] = _checksums_fn.lower(abstract).compile()


def host_checksums(names: list[str], checksums: Array) -> dict[str, str]:
    """``{name: 16 hex digits}`` from the device result (any process holds all of it: replicated)."""
    value = checksums if checksums.is_fully_addressable else checksums.addressable_data(0)
    rows = np.asarray(jax.device_get(value), dtype=np.uint32)
    return {name: f"{int(row[0]):08x}{int(row[1]):08x}" for name, row in zip(names, rows, strict=True)}


def verify_checksums(tree: PyTree, recorded: dict[str, Any], step_dir: epath.Path) -> None:
    """Raises ``CorruptCheckpointError`` naming the first array of ``tree`` whose checksum differs from
    the one recorded when the checkpoint was saved (arrays without a recorded checksum pass)."""
    if recorded.get("algorithm") != CHECKSUM_ALGORITHM:
        return
    saved = recorded.get("arrays", {})
    subset = {name: leaf for name, leaf in named_leaves(tree).items() if name in saved}
    names, checksums = array_checksums(subset)
    for name, value in host_checksums(names, checksums).items():
        if value != saved[name]:
            raise CorruptCheckpointError(
                f"checkpoint {step_dir} is corrupt: array {name} does not match its checksum "
                f"(its data under {step_dir / 'state'} changed after it was written)"
            )


def read_checksums(step_dir: epath.Path) -> dict[str, Any] | None:
    """The checksums recorded with a checkpoint, or None for a checkpoint saved without them."""
    path = step_dir / "checksums" / "metadata"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({type(error).__name__}: {error})") from error


@dataclass
class ChecksumSave(ocp.args.CheckpointArgs):
    """The checksums of a checkpoint's arrays: ``(names, device array)``, set once dispatched (which
    may be after orbax copied the arrays off the devices, so the two do not compete)."""

    checksums: concurrent.futures.Future[tuple[list[str], Array]]


class ChecksumHandler(ocp.handlers.JsonCheckpointHandler):
    """Writes ``checksums/metadata`` (JSON) in the background, once the device has computed them,
    before orbax finalizes the checkpoint; reads back as any JSON item."""

    async def _write(self, directory: epath.Path, args: ChecksumSave) -> None:
        names, checksums = await asyncio.wrap_future(args.checksums)
        arrays = await asyncio.to_thread(host_checksums, names, checksums)
        if ocp.utils.is_primary_host(self._primary_host):
            text = json.dumps({"algorithm": CHECKSUM_ALGORITHM, "arrays": arrays})
            await asyncio.to_thread((directory / "metadata").write_text, text)

    @override
    async def async_save(self, directory: epath.Path, item: Any = None, args: Any = None) -> list[Any] | None:
        if not isinstance(args, ChecksumSave):
            return await super().async_save(directory, item, args)
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(directory, args), name="xax_checksums")]

    @override
    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        async def run() -> None:
            for commit in await self.async_save(directory, item, args) or []:
                commit.result()

        asyncio.run(run())
