"""Maps PyTorch state dicts onto Equinox models, and back, through a declared table of names.

A table is a list of ``Rule`` rows. Each row pairs a torch name template with one or more Equinox
leaf paths and an optional ``Transform``::

    table = [
        Rule("transformer.wte.weight", "embed_tokens.weight"),
        # GPT-2's Conv1D stores (in, out) and fuses q, k, v along the output axis.
        Rule(
            "transformer.h.{i}.attn.c_attn.weight",
            ("layers.self_attn.q_proj.weight[{i}]", "layers.self_attn.k_proj.weight[{i}]",
             "layers.self_attn.v_proj.weight[{i}]"),
            Chain(Transpose(), Split(3)),
        ),
        Rule("model.layers.{i}.self_attn.{p:q|k|v|o}_proj.weight", "layers.{i}.self_attn.{p}_proj.weight"),
        Rule("transformer.h.{i}.attn.masked_bias", None),  # a buffer, dropped on purpose
    ]

Templates: ``{name}`` matches digits and ``{name:regex}`` matches ``regex``; every placeholder of
the torch name appears in each Equinox path, so a row reads in both directions. An Equinox path is
a dotted leaf path (``xax.utils.pytree.path_name``, so tuple members are
``layers.0.…``); a trailing ``[{i}]`` addresses index ``i`` of the leaf's leading axis, which is
how per-layer tensors are stacked into the weights of scanned layers.

The converter refuses what the table does not explain: a state-dict key no row matches, a model
leaf (or layer index of a stacked leaf) no key fills, a shape that differs after the transform.
The first matching row wins. Files are read with safetensors only; nothing is unpickled.
"""

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from xax.core.errors import XaxError
from xax.utils.pytree import path_name

M = TypeVar("M")

# How many names an error lists before it says "and N more".
_MAX_NAMES_SHOWN = 8


class StateDictError(XaxError, ValueError):
    """A state dict and a model disagree: an unmapped key, a missing leaf or a wrong shape."""


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


# Transforms. Each maps the arrays of one row between the torch and the Equinox layouts.


class Transform(ABC):
    """A reversible change of layout between a torch tensor and Equinox leaves."""

    @abstractmethod
    def to_eqx(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Converts arrays in the torch layout to the Equinox layout."""

    @abstractmethod
    def to_torch(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Converts arrays in the Equinox layout back to the torch layout."""


@final
@dataclass(frozen=True)
class Transpose(Transform):
    """Permutes axes; by default swaps the last two (a Conv1D (in, out) weight to a Linear's (out, in)).

    Attributes:
        axes: The permutation applied on the way to Equinox; None swaps the last two axes.
    """

    axes: tuple[int, ...] | None = None

    def _permutation(self, ndim: int) -> tuple[int, ...]:
        if self.axes is None:
            if ndim < 2:
                raise ValueError(f"Transpose() needs at least 2 axes, got an array of {ndim}; drop it for biases")
            return (*range(ndim - 2), ndim - 1, ndim - 2)
        if sorted(self.axes) != list(range(ndim)):
            raise ValueError(f"Transpose(axes={self.axes}) is not a permutation of the {ndim} axes of the array")
        return self.axes

    def to_eqx(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return tuple(np.transpose(x, self._permutation(x.ndim)) for x in arrays)

    def to_torch(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return tuple(np.transpose(x, np.argsort(self._permutation(x.ndim))) for x in arrays)


@final
@dataclass(frozen=True)
class Reshape(Transform):
    """Reshapes between two fixed shapes (a per-head (H, D, d) table against a flat (H * D, d) one).

    Attributes:
        torch_shape: The shape on the torch side.
        eqx_shape: The shape on the Equinox side; same number of elements.
    """

    torch_shape: tuple[int, ...]
    eqx_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if int(np.prod(self.torch_shape)) != int(np.prod(self.eqx_shape)):
            raise ValueError(f"Reshape: {self.torch_shape} and {self.eqx_shape} hold different numbers of elements")

    @staticmethod
    def _reshape(arrays: tuple[np.ndarray, ...], source: tuple[int, ...], target: tuple[int, ...]) -> tuple:
        for x in arrays:
            if x.shape != source:
                raise ValueError(f"Reshape expected shape {source}, got {x.shape}")
        return tuple(x.reshape(target) for x in arrays)

    def to_eqx(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return self._reshape(arrays, self.torch_shape, self.eqx_shape)

    def to_torch(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return self._reshape(arrays, self.eqx_shape, self.torch_shape)


@final
@dataclass(frozen=True)
class Split(Transform):
    """Splits one fused tensor into several leaves (GPT-2's ``c_attn`` into q, k, v); concatenates back.

    Attributes:
        sizes: A number of equal parts, or the size of each part (grouped-query q, k, v differ).
        axis: The axis split on the Equinox side (after any earlier transform of a ``Chain``).
    """

    sizes: int | tuple[int, ...]
    axis: int = 0

    def to_eqx(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        if len(arrays) != 1:
            raise ValueError(f"Split takes one fused array, got {len(arrays)}")
        (x,) = arrays
        length = x.shape[self.axis]
        if isinstance(self.sizes, int):
            if length % self.sizes != 0:
                raise ValueError(f"Split({self.sizes}): axis {self.axis} of length {length} does not divide evenly")
            return tuple(np.split(x, self.sizes, axis=self.axis))
        if sum(self.sizes) != length:
            raise ValueError(f"Split{self.sizes}: the sizes sum to {sum(self.sizes)}, axis {self.axis} is {length}")
        return tuple(np.split(x, np.cumsum(self.sizes)[:-1], axis=self.axis))

    def to_torch(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return (np.concatenate(arrays, axis=self.axis),)


@final
class Chain(Transform):
    """Applies transforms in order on the way to Equinox, and their inverses in reverse order back."""

    def __init__(self, *steps: Transform) -> None:
        self.steps = steps

    def __repr__(self) -> str:
        return f"Chain({', '.join(repr(s) for s in self.steps)})"

    def to_eqx(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        for step in self.steps:
            arrays = step.to_eqx(arrays)
        return arrays

    def to_torch(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        for step in reversed(self.steps):
            arrays = step.to_torch(arrays)
        return arrays


# Name templates.

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)(?::([^{}]*(?:\{[^{}]*\}[^{}]*)*))?\}")
_INDEX_SUFFIX = re.compile(r"^(?P<base>.*)\[\{(?P<name>[A-Za-z_]\w*)\}\]$")


@dataclass(frozen=True)
class _Template:
    """A name with placeholders: matches names to bindings and formats bindings to names."""

    text: str
    regex: re.Pattern[str]
    regexes: tuple[tuple[str, str], ...]  # (placeholder, the regex it matches)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.regexes)

    def match(self, name: str) -> dict[str, str] | None:
        found = self.regex.fullmatch(name)
        return None if found is None else found.groupdict()

    def format(self, bindings: Mapping[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: bindings[m.group(1)], self.text)


@functools.cache
def _template(text: str, inherited: tuple[tuple[str, str], ...] = ()) -> _Template:
    """Compiles a template; a placeholder without its own regex takes the inherited one, else digits."""
    pattern, regexes, last = [], {}, 0
    for found in _PLACEHOLDER.finditer(text):
        name = found.group(1)
        regex = found.group(2) or dict(inherited).get(name, r"\d+")
        if name in regexes:
            raise ValueError(f"template {text!r} uses placeholder {{{name}}} twice; use it once")
        pattern += [re.escape(text[last : found.start()]), f"(?P<{name}>{regex})"]
        regexes[name] = regex
        last = found.end()
    pattern.append(re.escape(text[last:]))
    return _Template(text, re.compile("".join(pattern)), tuple(regexes.items()))


@dataclass(frozen=True)
class _Target:
    """An Equinox path template, optionally indexing the leading (layer) axis of the leaf."""

    leaf: _Template
    index: str | None

    @property
    def names(self) -> set[str]:
        return set(self.leaf.names) | ({self.index} if self.index else set())

    def resolve(self, bindings: Mapping[str, str]) -> tuple[str, int | None]:
        return self.leaf.format(bindings), None if self.index is None else int(bindings[self.index])


@functools.cache
def _target(text: str, inherited: tuple[tuple[str, str], ...]) -> _Target:
    found = _INDEX_SUFFIX.match(text)
    if found is None:
        return _Target(_template(text, inherited), None)
    return _Target(_template(found.group("base"), inherited), found.group("name"))


@dataclass(frozen=True)
class Rule:
    """One row of a name table.

    Attributes:
        torch: The torch name template, e.g. ``"model.layers.{i}.mlp.up_proj.weight"``.
        eqx: The Equinox leaf path template(s) the tensor fills (several when ``transform`` splits
            it), e.g. ``"layers.mlp.up_proj.weight[{i}]"``; None drops the tensor on purpose
            (buffers, tied copies).
        transform: The layout change between the two; None keeps the array as it is.
    """

    torch: str
    eqx: str | tuple[str, ...] | None
    transform: Transform | None = None

    def __post_init__(self) -> None:
        names = set(_template(self.torch).names)
        for target in self.targets:
            if target.names != names:
                raise ValueError(
                    f"Rule({self.torch!r}): Equinox path {target.leaf.text!r} has placeholders "
                    f"{sorted(target.names)}, the torch name has {sorted(names)}; they must be the same"
                )

    @property
    def targets(self) -> tuple[_Target, ...]:
        if self.eqx is None:
            return ()
        # Equinox placeholders match what the torch name's do, so export reads the same names back.
        inherited = _template(self.torch).regexes
        return tuple(_target(t, inherited) for t in ((self.eqx,) if isinstance(self.eqx, str) else self.eqx))

    def apply(self, arrays: tuple[np.ndarray, ...], forward: bool, key: str) -> tuple[np.ndarray, ...]:
        """Runs the transform, naming the key and the row when it fails."""
        if self.transform is None:
            return arrays
        try:
            return self.transform.to_eqx(arrays) if forward else self.transform.to_torch(arrays)
        except ValueError as error:
            raise StateDictError(f"{key!r}: {self.transform!r} of Rule({self.torch!r}) failed: {error}") from error


# The converter.


def _is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _model_leaves(model: Any) -> tuple[list[Any], Any, dict[str, int]]:
    """Returns ``(leaves, treedef, {dotted path: leaf position})`` for the array leaves of ``model``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(model)
    positions = {path_name(path): n for n, (path, leaf) in enumerate(flat) if _is_leaf_array(leaf)}
    return [leaf for _, leaf in flat], treedef, positions


def to_numpy(value: Any) -> np.ndarray:
    """Converts a torch tensor (any dtype, bfloat16 included), a JAX array or a numpy array to numpy."""
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value)
    import torch  # optional: only torch inputs need it

    if not isinstance(value, torch.Tensor):
        raise StateDictError(f"expected a torch.Tensor or numpy array, got {type(value).__name__}")
    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(jnp.bfloat16)
    return tensor.numpy()


def _match(rules: Sequence[Rule], key: str) -> tuple[Rule, dict[str, str]] | None:
    for rule in rules:
        bindings = _template(rule.torch).match(key)
        if bindings is not None:
            return rule, bindings
    return None


def _place(
    slots: dict[str, dict[int | None, np.ndarray]],
    leaves: list[Any],
    positions: dict[str, int],
    where: tuple[str, int | None],
    value: np.ndarray,
    key: str,
) -> None:
    """Records ``value`` for a leaf (or one index of it), checking that it exists and fits."""
    path, index = where
    if path not in positions:
        raise StateDictError(
            f"{key!r} maps to Equinox path {path!r}, which the model does not have; "
            f"its leaves are {_names(list(positions))}: fix the table row"
        )
    shape = tuple(leaves[positions[path]].shape)
    if index is not None:
        if not shape or not 0 <= index < shape[0]:
            raise StateDictError(f"{key!r} maps to {path}[{index}], but that leaf has shape {shape}")
        shape = shape[1:]
    if value.shape != shape:
        target = path if index is None else f"{path}[{index}]"
        raise StateDictError(f"{key!r} has shape {value.shape} after its transform, {target!r} needs {shape}")
    filled = slots.setdefault(path, {})
    if index in filled or (filled and (index is None) != (None in filled)):
        raise StateDictError(f"{key!r} fills {path!r} (index {index}), which another key already fills")
    slots[path][index] = value


def _assemble(path: str, parts: dict[int | None, np.ndarray], shape: tuple[int, ...]) -> np.ndarray | str:
    """Returns the full leaf from its parts, or a description of what is missing."""
    if None in parts:
        return parts[None]
    missing = [i for i in range(shape[0]) if i not in parts]
    if missing:
        return f"{path}[{', '.join(map(str, missing))}]"
    return np.stack([parts[i] for i in range(shape[0])])


def load_state_dict(model: M, state_dict: Mapping[str, Any], table: Sequence[Rule]) -> M:
    """Fills every array leaf of ``model`` from a PyTorch state dict through ``table``.

    Args:
        model: The model to fill; its leaves may be arrays or ``jax.ShapeDtypeStruct`` (from
            ``eqx.filter_eval_shape``, which skips the random initialization).
        state_dict: Torch name -> ``torch.Tensor`` or numpy array.
        table: The rows that map names; the first row whose torch template matches a key wins.

    Returns:
        The model with every array leaf replaced, cast to the leaf's dtype.

    Raises:
        StateDictError: A key that no row matches, a leaf (or layer index) no key fills, or a
            shape that does not fit; the message names the keys and paths.
    """
    leaves, treedef, positions = _model_leaves(model)
    slots: dict[str, dict[int | None, np.ndarray]] = {}
    unmapped = []
    for key, value in state_dict.items():
        found = _match(table, key)
        if found is None:
            unmapped.append(key)
            continue
        rule, bindings = found
        if not rule.targets:
            continue
        arrays = rule.apply((to_numpy(value),), forward=True, key=key)
        if len(arrays) != len(rule.targets):
            raise StateDictError(f"{key!r}: the transform gave {len(arrays)} arrays for {len(rule.targets)} paths")
        for target, array in zip(rule.targets, arrays):
            _place(slots, leaves, positions, target.resolve(bindings), array, key)
    if unmapped:
        raise StateDictError(
            f"state_dict keys {_names(unmapped)} match no row of the table; add a row for each "
            "(a row with eqx=None drops a key on purpose)"
        )
    missing = []
    for path, n in positions.items():
        full = _assemble(path, slots.get(path, {}), tuple(leaves[n].shape)) if path in slots else path
        if isinstance(full, str):
            missing.append(full)
            continue
        leaves[n] = jnp.asarray(full.astype(leaves[n].dtype))
    if missing:
        raise StateDictError(f"model leaves {_names(missing)} are filled by no state_dict key; add them or a row")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _export_row(rule: Rule, arrays: dict[str, np.ndarray], used: set[tuple[str, int | None]]) -> dict[str, np.ndarray]:
    """Produces every torch tensor that one row describes, from the model's leaves."""
    first, out = rule.targets[0], {}
    for path, leaf in arrays.items():
        bindings = first.leaf.match(path)
        if bindings is None:
            continue
        indices = [None] if first.index is None else [str(i) for i in range(leaf.shape[0])]
        for index in indices:
            full = bindings if index is None or first.index is None else {**bindings, first.index: index}
            parts = []
            for target in rule.targets:
                part_path, part_index = target.resolve(full)
                if part_path not in arrays:
                    raise StateDictError(f"Rule({rule.torch!r}) needs {part_path!r}, which the model does not have")
                value = arrays[part_path]
                parts.append(value if part_index is None else value[part_index])
                used.add((part_path, part_index))
            key = _template(rule.torch).format(full)
            (out[key],) = rule.apply(tuple(parts), forward=False, key=key)
    return out


def to_state_dict(model: Any, table: Sequence[Rule], *, dtype: Any = None) -> dict[str, np.ndarray]:
    """Exports the array leaves of ``model`` to torch names through ``table`` (the reverse of loading).

    Args:
        model: The model to export.
        table: The same rows that load it; rows with ``eqx=None`` produce nothing.
        dtype: If set, floating-point tensors are cast to it (e.g. ``jnp.bfloat16``).

    Returns:
        Torch name -> contiguous numpy array.

    Raises:
        StateDictError: A leaf (or layer index) that no row exports, or two rows giving one name.
    """
    leaves, _, positions = _model_leaves(model)
    arrays = {path: np.asarray(leaves[n]) for path, n in positions.items()}
    used: set[tuple[str, int | None]] = set()
    state_dict: dict[str, np.ndarray] = {}
    for rule in table:
        if not rule.targets:
            continue
        for key, value in _export_row(rule, arrays, used).items():
            if key in state_dict:
                raise StateDictError(f"two rows of the table export {key!r}; make the templates disjoint")
            if dtype is not None and np.issubdtype(value.dtype, np.floating):
                value = value.astype(dtype)
            state_dict[key] = np.ascontiguousarray(value)

    def covered(path: str, value: np.ndarray) -> bool:
        if (path, None) in used:
            return True
        return value.ndim > 0 and all((path, i) in used for i in range(value.shape[0]))

    missing = [path for path, value in arrays.items() if not covered(path, value)]
    if missing:
        raise StateDictError(f"model leaves {_names(missing)} are exported by no row of the table; add rows for them")
    return state_dict


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``); never unpickles."""
    from safetensors.numpy import load_file  # only file I/O needs safetensors

    return load_file(str(path))


def write_safetensors(state_dict: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Writes numpy arrays to a ``.safetensors`` file with the metadata ``transformers`` expects."""
    from safetensors.numpy import save_file

    save_file(dict(state_dict), str(path), metadata={"format": "pt"})
