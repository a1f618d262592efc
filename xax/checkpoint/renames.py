"""Parameter renames: reading checkpoints written before a model renamed its parameters.

A model declares, beside itself, how its parameters were once named: a class attribute
``LEGACY_PARAM_NAMES`` of any module in its tree, a tuple of ``(old, new)`` or
``(old, new, "transpose")`` entries, where ``old`` is a regular expression matched against the whole
dotted name of a saved array (``params.blocks.mlp.fc1.weight``, or its Adam moment under
``opt_state``) and ``new`` the replacement (``re`` template) giving the name the array now has.
``legacy_renames`` collects them from a tree (this package never imports the models). A checkpoint
is read through them only when its names differ from the target's by declared renames alone;
any other difference is a mismatch as before.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import numpy as np

# The transforms a rename may apply to the saved array (the saved layout -> the current one).
TRANSFORMS = ("transpose",)


@dataclass(frozen=True)
class Rename:
    """One declared rename: a saved name that ``old`` matches whole is now ``new`` expanded with its groups.

    Examples:
        >>> rename = Rename(r"(.*\\.)?mlp\\.fc1\\.(weight|bias)", r"\\1mlp.up_proj.\\2")
        >>> rename.apply("params.blocks.mlp.fc1.weight")
        'params.blocks.mlp.up_proj.weight'
        >>> rename.apply("params.blocks.qkv.weight") is None
        True
    """

    old: str
    new: str
    transform: str | None = None

    def __post_init__(self) -> None:
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise ValueError(f"rename transform {self.transform!r} is unknown; expected one of {TRANSFORMS}")

    def apply(self, name: str) -> str | None:
        """The current name of the saved array ``name``, or None when this rename does not match it."""
        match = re.fullmatch(self.old, name)
        return None if match is None else match.expand(self.new)


def as_renames(entries: Iterable[Any]) -> tuple[Rename, ...]:
    """``Rename``s from declared entries: ``Rename``s or ``(old, new[, transform])`` tuples."""
    return tuple(entry if isinstance(entry, Rename) else Rename(*entry) for entry in entries)


def legacy_renames(tree: Any) -> tuple[Rename, ...]:
    """The renames declared (``LEGACY_PARAM_NAMES``) by the classes of the modules in ``tree``, in order, once each."""
    found: dict[Rename, None] = {}
    seen: set[type] = set()

    def visit(node: Any) -> None:
        if isinstance(node, eqx.Module) and type(node) not in seen:
            seen.add(type(node))
            found.update(dict.fromkeys(as_renames(getattr(type(node), "LEGACY_PARAM_NAMES", ()))))
        if isinstance(node, eqx.Module):
            children = [getattr(node, name, None) for name in node.__dataclass_fields__]
        elif isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            return
        for child in children:
            visit(child)

    visit(tree)
    return tuple(found)


@dataclass(frozen=True)
class RenamePlan:
    """How the saved arrays map onto the target's: the saved name of each target name, and the
    transform to apply on the way (None for none)."""

    saved_name: dict[str, str]
    transform: dict[str, str | None]


def plan_renames(wanted: dict[str, Any], found: dict[str, Any], renames: Sequence[Rename]) -> RenamePlan | None:
    """How to read ``found`` (saved arrays by name) as ``wanted`` (the target's, by name) through
    ``renames``, or None when the names differ in any way the renames do not account for (a
    saved name that is wanted keeps its name; every other saved name must be renamed onto a wanted
    name no other saved array gives; every wanted name must be given; shapes must agree)."""
    saved_name: dict[str, str] = {}
    transform: dict[str, str | None] = {}
    for name in found:
        if name in wanted:
            saved_name.setdefault(name, name)
            transform.setdefault(name, None)
            continue
        rename = next((rename for rename in renames if rename.apply(name) is not None), None)
        new = None if rename is None else rename.apply(name)
        if rename is None or new is None or new not in wanted or new in found or new in saved_name:
            return None
        saved_name[new], transform[new] = name, rename.transform
    if set(saved_name) != set(wanted) or not any(saved != new for new, saved in saved_name.items()):
        return None
    for new, saved in saved_name.items():
        shape = tuple(found[saved].shape)
        if transform[new] == "transpose":
            shape = shape[::-1]
        if shape != tuple(wanted[new].shape):
            return None
    return RenamePlan(saved_name, transform)


def rename_saved(wanted: dict[str, Any], found: dict[str, Any], renames: Sequence[Rename]) -> dict[str, Any]:
    """``found`` (saved arrays by name) with each array that ``wanted`` lacks, but holds under its
    declared new name, moved there (transformed, in the wanted leaf's dtype and sharding): for
    reading weights where the names need not all match (a backbone into a model with a new head)."""
    result = dict(found)
    for name, array in found.items():
        if name in wanted:
            continue
        for rename in renames:
            new = rename.apply(name)
            if new is not None and new in wanted and new not in result:
                result[new] = renamed_leaf(array, rename.transform, wanted[new])
                del result[name]
                break
    return result


def renamed_leaf(array: Any, transform: str | None, like: Any) -> Any:
    """A saved array as the target's leaf ``like`` holds it: transformed, in its dtype and sharding."""
    if transform is None:
        return array
    sharding = getattr(like, "sharding", None)
    flip = jax.jit(lambda value: value.T.astype(like.dtype), out_shardings=sharding)
    return flip(array)


def transposed_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """Where to read a saved array that is transposed on its way into a leaf placed with
    ``sharding``: the same devices, its partition reversed (replicated when it is not named)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[::-1]))
    devices = sorted(sharding.device_set, key=lambda device: device.id)
    if len(devices) == 1:
        return jax.sharding.SingleDeviceSharding(devices[0])
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
