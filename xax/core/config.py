"""Config fields, pytree registration and layered resolution of a config dataclass.

A value is resolved from four layers, each overriding the one before: the dataclass defaults, the
instance passed to ``launch``, YAML files given with ``--config`` (in order), and ``key=value`` /
``a.b=value`` overrides on the command line (in order). Mistakes end in a :class:`ConfigError` whose
message is one line naming the key at fault and the nearest valid key.
"""

import copy
import dataclasses
import difflib
import enum
import functools
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import yaml
from omegaconf import MISSING as MISSING
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xax.core.errors import ConfigError

C = TypeVar("C")
T = TypeVar("T", bound=type)

USAGE = "usage: [--config FILE.yaml]... [key=value]... [a.b=value]..."

# A key segment is a field name or a list index.
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_CLI = "on the command line"
_BASE = "in the config passed to launch"

_REGISTERED: set[type] = set()


def field(default: Any = MISSING, *, help: str = "") -> Any:
    """A dataclass field with a default and a help text shown by ``--help``.

    Args:
        default: The default value; leave it out (``MISSING``) to make the field required. Mutable
            values (lists, dicts, dataclass instances) are deep-copied for every instance.
        help: One line describing the option.

    Returns:
        A ``dataclasses.field`` carrying the help text in ``metadata["help"]``.
    """
    metadata = {"help": help}
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
        yield _Entry(key, tp, default, f.metadata.get("help", ""), group)
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


def format_help(config_class: type) -> str:
    """The ``--help`` text: every option with its type, default and help.

    Args:
        config_class: The config dataclass.

    Returns:
        A multi-line string ending in a newline.
    """
    rows = [
        (e.key, _type_name(e.type), "(group)" if e.group else _format_value(e.default), e.help)
        for e in _entries(config_class)
    ]
    header = ("option", "type", "default", "help")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        USAGE,
        "",
        f"Options of {config_class.__name__} (later layers win: defaults, --config files in order, key=value):",
    ]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """Splits arguments into YAML files, overrides and whether help was asked for."""
    files: list[str] = []
    overrides: list[str] = []
    wants_help = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = True
        elif arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-") or not argv[i + 1]:
                raise ConfigError("--config needs a YAML file: write --config FILE.yaml")
            files.append(argv[i + 1])
            i += 1
        elif arg.startswith("--config="):
            if not arg.removeprefix("--config="):
                raise ConfigError("--config= needs a YAML file: write --config=FILE.yaml")
            files.append(arg.removeprefix("--config="))
        elif arg.startswith("-") and "=" not in arg:
            raise ConfigError(f"unknown option '{arg}'; the options are --config FILE.yaml, --help and key=value")
        else:
            overrides.append(arg)
        i += 1
    return files, overrides, wants_help


def _check_override(item: str, cls: type) -> None:
    """Raises if an override is not ``key=value`` with a dotted key."""
    key, eq, _ = item.partition("=")
    if not eq:
        nearest = _nearest(item.lstrip("-"), cls)
        hint = f"; did you mean '{nearest}=VALUE'?" if nearest is not None else ""
        raise ConfigError(f"malformed override '{item}': expected key=value{hint}")
    if not key:
        example = _all_keys(cls)[:1]
        hint = f", e.g. {example[0]}=..." if example else ""
        raise ConfigError(f"malformed override '{item}': the key before '=' is empty; write key=value{hint}")
    if not all(_SEGMENT.fullmatch(part) for part in key.split(".")):
        cleaned = ".".join(p for p in key.lstrip("-").split(".") if p)
        raise ConfigError(
            f"malformed override '{item}': '{key}' is not a dotted key like a.b{_did_you_mean(cleaned, cls)}"
        )


def _check_keys(layer: Mapping[Any, Any], cls: type, root: type, source: str, prefix: str = "") -> None:
    """Raises on a key the config does not have, or a group of options given a single value."""
    hints = _type_hints(cls)
    names = {f.name for f in _fields(cls)}
    for name, value in layer.items():
        key = f"{prefix}{name}"
        if isinstance(name, str) and "." in name:
            head, _, rest = name.partition(".")
            raise ConfigError(
                f"config key '{key}' {source} is written with a dot; nest it instead ({head}: {{{rest}: ...}})"
            )
        if name not in names:
            # A single chain below the unknown key (as from a.b=value) is named in full.
            while isinstance(value, Mapping) and len(value) == 1:
                child, value = next(iter(value.items()))
                key = f"{key}.{child}"
            raise ConfigError(f"unknown config key '{key}' {source}{_did_you_mean(key, root)}")
        group = _group_type(hints.get(name))
        if group is None:
            continue  # Below a plain field (a list, a dict) OmegaConf checks the value.
        optional = group is not hints.get(name)
        if isinstance(value, Mapping):
            _check_keys(value, group, root, source, key + ".")
        elif not (value is None and optional):
            first = next((f.name for f in _fields(group)), "...")
            raise ConfigError(
                f"config key '{key}' {source} is a group of options ({group.__name__}), not a single value; "
                f"set its fields instead, e.g. {key}.{first}=..."
            )


def _lookup(layer: Any, key: str) -> Any:
    """The value at a dotted key (``a.b``, ``xs[1]``) of a plain container, or None."""
    for part in re.split(r"\.|\[|\]\.?", key):
        if part == "":
            continue
        if isinstance(layer, Mapping):
            layer = layer.get(part)
        elif isinstance(layer, list) and part.isdigit() and int(part) < len(layer):
            layer = layer[int(part)]
        else:
            return None
    return layer


def _value_error(e: OmegaConfBaseException, source: str, root: type, layer: Any) -> ConfigError:
    """A one-line error for a value OmegaConf rejected."""
    key = e.full_key or ""
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    if not key:
        return ConfigError(f"invalid config {source}: {reason}")
    field_key = re.sub(r"\[[0-9]+\]", "", key)
    entry = next((en for en in _entries(root) if en.key == field_key), None)
    if entry is None:
        return ConfigError(f"invalid value for config key '{key}' {source}: {reason}")
    value = _lookup(layer, key)
    if value is None:
        value = getattr(e, "value", None)
    shown = repr(value) if isinstance(value, str) else _format_value(value)
    where = f" (an item of {field_key})" if key != field_key else ""
    return ConfigError(
        f"invalid value for config key '{key}' {source}: expected {_type_name(entry.type)}{where}, got {shown}"
    )


def _load_yaml(path: str) -> dict[Any, Any]:
    """The contents of a YAML config file as a plain dict."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}; check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"cannot parse config file '{path}'{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' holds a {type(data).__name__}; it must map option names to values")
    return data


def _check_not_empty(item: str, root: type) -> None:
    """Raises for ``key=`` with nothing after it, unless the key is a string: YAML reads an empty
    value as null, which would quietly mean "no limit" for a key such as ``max_steps``."""
    key, _, value = item.partition("=")
    if value.strip():
        return
    types = {entry.key: entry.type for entry in _entries(root)}
    if types.get(key) is str:
        return
    raise ConfigError(f"config key '{key}' has an empty value {_CLI}; give a value, or write {key}=null to unset it")


def _override_layer(item: str, root: type) -> dict[Any, Any]:
    _check_override(item, root)
    _check_not_empty(item, root)
    try:
        layer = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except (yaml.YAMLError, OmegaConfBaseException):
        key, _, value = item.partition("=")
        raise ConfigError(
            f"cannot parse the value '{value}' of config key '{key}' {_CLI}: it is not valid YAML (a list is [1,2])"
        ) from None
    assert isinstance(layer, dict)
    return layer


def _merge(cfg: DictConfig, layer: dict[Any, Any], root: type, source: str) -> DictConfig:
    _check_keys(layer, root, root, source)
    try:
        merged = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        raise _value_error(e, source, root, layer) from None
    assert isinstance(merged, DictConfig)
    return merged


def _missing_error(cfg: DictConfig, root: type) -> ConfigError | None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing:
        return None
    types = {e.key: _type_name(e.type) for e in _entries(root)}
    listed = ", ".join(f"'{k}' ({types.get(k, 'value')})" for k in missing)
    noun, pronoun = ("a required config value", "it") if len(missing) == 1 else ("required config values", "them")
    return ConfigError(f"missing {noun} {listed}; set {pronoun} with {missing[0]}=VALUE or in a --config file")


def load_config(config_class: type[C], base: C | None, argv: Sequence[str]) -> C:
    """Resolves a config: defaults < ``base`` < ``--config`` files < ``key=value`` overrides.

    Args:
        config_class: The config dataclass.
        base: An instance overriding the defaults (what is passed to ``launch``), or None.
        argv: Command-line arguments without the program name; ``--help`` is ignored here.

    Returns:
        An instance of ``config_class`` (of ``type(base)`` when given), nested groups as instances.

    Raises:
        ConfigError: On an unknown key, a wrong type, a malformed override, an unreadable file or a
            required value left unset, with a one-line message naming the key.
    """
    if base is not None and not isinstance(base, config_class):
        raise ConfigError(f"the config passed to launch is a {type(base).__name__}; pass a {config_class.__name__}")
    root = type(base) if base is not None else config_class
    register_config(root)
    files, overrides, _ = _split_argv(argv)
    try:
        cfg = OmegaConf.structured(base if base is not None else config_class)
    except OmegaConfBaseException as e:
        raise _value_error(e, _BASE, root, None) from None
    assert isinstance(cfg, DictConfig)
    for path in files:
        cfg = _merge(cfg, _load_yaml(path), root, f"in {path}")
    for item in overrides:
        cfg = _merge(cfg, _override_layer(item, root), root, _CLI)
    error = _missing_error(cfg, root)
    if error is not None:
        raise error
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _value_error(e, "after merging", root, None) from None
    assert isinstance(config, config_class)
    return config


def parse_cli(config_class: type[C], base: C | None = None, argv: Sequence[str] | None = None) -> C:
    """Resolves a config from the command line, exiting on ``--help`` or a mistake.

    Args:
        config_class: The config dataclass.
        base: An instance overriding the defaults, or None.
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The resolved config.

    Raises:
        SystemExit: 0 after printing the help, 2 after printing ``error: <message>`` on stderr.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _, _, wants_help = _split_argv(args)
        if wants_help:
            sys.stdout.write(format_help(config_class))
            raise SystemExit(0)
        return load_config(config_class, base, args)
    except ConfigError as e:
        message = " ".join(str(e).split("\n"))
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain dicts, lists and scalars (enums by name, paths as strings).

    Args:
        config: A config dataclass instance.

    Returns:
        A nested dict that ``yaml.safe_dump`` and ``json.dumps`` accept.
    """
    try:
        container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)
    except OmegaConfBaseException as e:
        raise _value_error(e, "in the config being saved", type(config), None) from None
    return _plain(container)


def config_to_yaml(config: Any) -> str:
    """A config as YAML that ``--config`` reads back to an equal config.

    Args:
        config: A config dataclass instance.

    Returns:
        The YAML text, fields in declaration order.
    """
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


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
