"""Layered resolution of a config dataclass, and configs as dicts and YAML (with OmegaConf).

A value is resolved from four layers, each overriding the one before: the dataclass defaults, the
instance passed to ``launch``, YAML files given with ``--config`` (in order), and ``key=value`` /
``a.b=value`` overrides on the command line (in order). Mistakes end in a :class:`ConfigError` whose
message is one line naming the key at fault and the nearest valid key.
"""

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xax.core.config import (
    _all_keys,
    _did_you_mean,
    _entries,
    _fields,
    _format_value,
    _group_type,
    _nearest,
    _type_hints,
    _type_name,
    check_choices,
    register_config,
)
from xax.core.errors import ConfigError
from xax.core.help import format_help

C = TypeVar("C")

# A key segment is a field name or a list index.
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_CLI = "on the command line"
_BASE = "in the config passed to launch"


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """Splits arguments into YAML files, overrides and the help asked for ("--help", "--help-all" or None)."""
    files: list[str] = []
    overrides: list[str] = []
    wants_help: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = wants_help or "--help"
        elif arg == "--help-all":
            wants_help = "--help-all"
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
            raise ConfigError(
                f"unknown option '{arg}'; the options are --config FILE.yaml, --help, --help-all and key=value"
            )
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
    check_choices(config)
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
        SystemExit: 0 after printing the help (``--help``, ``--help-all``), 2 after printing
            ``error: <message>`` on stderr.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _, _, wants_help = _split_argv(args)
        if wants_help is not None:
            _print_help(config_class, base, args, show_all=wants_help == "--help-all")
        return load_config(config_class, base, args)
    except ConfigError as e:
        message = " ".join(str(e).split("\n"))
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None


def _print_help(config_class: type[C], base: C | None, args: list[str], *, show_all: bool) -> None:
    """Prints the help with the values the command would run with, then exits with 0; where the
    other arguments have a mistake, with those of the config passed to ``launch``, and says why."""
    note = ""
    try:
        shown: Any = load_config(config_class, base, args)
    except ConfigError as e:
        shown = base
        note = f"\n(the values shown leave out the command line, which has a mistake: {e})\n"
    sys.stdout.write(format_help(config_class, shown, show_all=show_all) + note)
    raise SystemExit(0)


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
