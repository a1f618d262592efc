"""Config fields, pytree registration, the option entries ``--help`` lists, and value checks.

Every option is a dataclass field made with :func:`field` (a default and a help line). Resolving a
config from defaults, YAML files and ``key=value`` overrides (with OmegaConf) is in
:mod:`xax.core.config_io`, so model configs can use :func:`field` without loading it.
"""

import copy
import dataclasses
import difflib
import enum
import functools
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import jax

from xax.core.errors import ConfigError

T = TypeVar("T", bound=type)

# OmegaConf's marker for a value that must be given (omegaconf.MISSING), kept here so that declaring
# a config does not import OmegaConf.
MISSING: Any = "???"

_REGISTERED: set[type] = set()


def field(default: Any = MISSING, *, help: str = "", choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default and a help text shown by ``--help``.

    Args:
        default: The default value; leave it out (``MISSING``) to make the field required. Mutable
            values (lists, dicts, dataclass instances) are deep-copied for every instance.
        help: One line describing the option.
        choices: The values the option accepts, listed by ``--help`` and checked when a config is
            loaded (None accepts any value of the field's type; None itself is always accepted
            for an optional field).

    Returns:
        A ``dataclasses.field`` carrying the help text in ``metadata["help"]`` and the choices in
        ``metadata["choices"]``.
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    # Dataclasses refuse unhashable defaults (lists, non-frozen dataclass instances), and a shared
    # mutable default would leak changes between instances, so each instance gets its own copy.
    if type(default).__hash__ is None or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(typing.cast(Any, cls))


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Field types of a dataclass with string annotations resolved."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        # Classes defined inside functions may refer to names get_type_hints cannot see.
        return {f.name: f.type for f in _fields(cls)}


def _dataclasses_in(tp: Any) -> Iterator[type]:
    """Every dataclass type named in a type annotation (``X``, ``X | None``, ``list[X]``...)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        yield tp
    for arg in typing.get_args(tp):
        yield from _dataclasses_in(arg)


def register_config(cls: T) -> T:
    """Registers a config dataclass, and those of its fields, as pytrees with no leaves.

    Every field becomes static metadata, so a config can pass through ``jax.jit``. Registering a
    class twice is a no-op, so this can be used as a decorator and called again by ``launch``.

    Args:
        cls: A dataclass type.

    Returns:
        The same class.
    """
    if cls in _REGISTERED:
        return cls
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_config expects a dataclass type, got {cls!r}; decorate it with @dataclass")
    # Added before recursing so that a class naming itself in a field type terminates.
    _REGISTERED.add(cls)
    fields = _fields(cls)
    try:
        jax.tree_util.register_dataclass(
            cls,
            data_fields=[],
            meta_fields=[f.name for f in fields if f.init],
            drop_fields=[f.name for f in fields if not f.init],
        )
    except ValueError as e:
        # Registered directly with jax elsewhere; that registration is as good as ours.
        if "Duplicate" not in str(e):
            raise
    for tp in _type_hints(cls).values():
        for nested in _dataclasses_in(tp):
            register_config(nested)
    return cls


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One option as ``--help`` lists it."""

    key: str
    type: Any
    default: Any
    help: str
    group: type | None
    choices: tuple[Any, ...] | None = None
    # The class that declared the field (its module tells the task's own options from the framework's).
    owner: type | None = None


def _group_type(tp: Any) -> type | None:
    """The dataclass type of a field grouping nested options (``X`` or ``X | None``), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and isinstance(rest[0], type) and dataclasses.is_dataclass(rest[0]):
            return rest[0]
    return None


def _default_of(f: dataclasses.Field, instance: Any) -> Any:
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _entries(cls: type, prefix: str = "", instance: Any = None) -> Iterator[_Entry]:
    """Every option of a config class, nested groups expanded with dotted keys."""
    hints = _type_hints(cls)
    for f in _fields(cls):
        tp = hints.get(f.name, f.type)
        default = _default_of(f, instance)
        group = _group_type(tp)
        key = prefix + f.name
        owner = next((k for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {})), cls)
        yield _Entry(key, tp, default, f.metadata.get("help", ""), group, f.metadata.get("choices"), owner)
        if group is not None:
            nested = default if isinstance(default, group) else None
            yield from _entries(group, key + ".", nested)


def _all_keys(cls: type) -> list[str]:
    return [e.key for e in _entries(cls)]


def _nearest(key: str, cls: type) -> str | None:
    """The valid key closest to ``key``, preferring the siblings of a valid parent group."""
    keys = _all_keys(cls)
    parent = key.rpartition(".")[0]
    candidates = [k for k in keys if k.rpartition(".")[0] == parent] if parent in keys else []
    matches = difflib.get_close_matches(key, candidates or keys, n=1, cutoff=0.0)
    return matches[0] if matches else None


def _did_you_mean(key: str, cls: type) -> str:
    nearest = _nearest(key, cls)
    return f"; did you mean '{nearest}'?" if nearest is not None else f"; {cls.__name__} has no options"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"{tp.__name__} (one of {', '.join(m.name for m in tp)})"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _format_value(value: Any) -> str:
    """A value the way it would be written on the command line."""
    if isinstance(value, str):
        return "required" if value == MISSING else (value if value.strip() == value and value else repr(value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return "(group)"
    return str(value)


def check_choices(config: Any) -> None:
    """Raises ``ConfigError`` naming the first option declared with ``choices`` whose value is not one of them.

    Args:
        config: A config dataclass instance.
    """
    for entry in _entries(type(config), instance=config):
        if entry.choices is not None and entry.default is not None and entry.default not in entry.choices:
            listed = ", ".join(_format_value(choice) for choice in entry.choices)
            raise ConfigError(f"{entry.key}={_format_value(entry.default)} is not one of: {listed}")


def check_range(
    key: str, value: int | float | None, *, minimum: int | float, inclusive: bool = True, unset: str = ""
) -> None:
    """Raises ``ConfigError`` unless ``value`` is None or at least (above, when not ``inclusive``)
    ``minimum``; ``unset`` says what None means, for the message."""
    if value is None or value > minimum or (inclusive and value == minimum):
        return
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    hint = f" (or null: {unset})" if unset else ""
    raise ConfigError(f"{key}={value} must be {bound}{hint}")
