"""The ``--help`` and ``--help-all`` text of a config: the task's own options first, with the values
the command would use, wrapped to the terminal."""

import os
import shutil
import sys
import textwrap
from collections.abc import Iterable
from typing import Any

from xax.core.config import MISSING, _entries, _Entry, _format_value, _type_name

# The narrowest help column; below it each help text goes on its own line under the option.
_MIN_HELP_WIDTH = 30
_NBSP = "\u00a0"
# The widest option column (``key=value``) before its help moves to the next line.
_MAX_KEY_WIDTH = 36


def program_name() -> str:
    """How this program was started, for ``usage:``: ``python -m examples.mnist``, ``python train.py``,
    or the name of an installed command."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    if argv0.endswith(".py"):
        return f"python {argv0}"
    return os.path.basename(argv0)


def _is_framework(entry: _Entry) -> bool:
    """Whether xax declared the option (the task's own config class did not)."""
    owner = entry.owner
    return owner is not None and owner.__module__.split(".")[0] == "xax"


def _shown_value(entry: _Entry) -> str:
    if isinstance(entry.default, str) and entry.default == MISSING:
        return "<required>"
    return _format_value(entry.default)


def _describe(entry: _Entry) -> str:
    text = entry.help.rstrip(".")
    kind = _type_name(entry.type)
    if entry.choices is not None:
        kind += ": one of " + ", ".join(_format_value(choice) for choice in entry.choices)
    # Non-breaking spaces keep the bracket on one line when the help is wrapped.
    kind = f"[{kind}]".replace(" ", _NBSP)
    return f"{text} {kind}" if text else kind


def _rows(entries: Iterable[_Entry], width: int) -> list[str]:
    """``key=value`` and its wrapped help, one option after another."""
    entries = list(entries)
    lefts = [f"{entry.key}={_shown_value(entry)}" for entry in entries]
    column = min(max((len(left) for left in lefts), default=0), _MAX_KEY_WIDTH) + 4
    help_width = width - column
    lines: list[str] = []
    for left, entry in zip(lefts, entries, strict=True):
        if help_width < _MIN_HELP_WIDTH:
            lines.append(f"  {left}")
            lines += textwrap.wrap(
                _describe(entry), max(width - 6, 20), initial_indent=" " * 6, subsequent_indent=" " * 6
            )
            continue
        wrapped = textwrap.wrap(_describe(entry), help_width) or [""]
        if len(left) + 4 > column:
            lines.append(f"  {left}")
            lines += [" " * column + part for part in wrapped]
        else:
            lines.append(f"  {left.ljust(column - 2)}{wrapped[0]}")
            lines += [" " * column + part for part in wrapped[1:]]
    return lines


def _groups(entries: list[_Entry]) -> list[tuple[_Entry, list[_Entry]]]:
    """The top-level option groups and every option below each."""
    groups = []
    for entry in entries:
        if entry.group is not None and "." not in entry.key:
            below = [e for e in entries if e.key.startswith(entry.key + ".") and e.group is None]
            groups.append((entry, below))
    return groups


def format_help(
    config_class: type, config: Any = None, *, prog: str | None = None, show_all: bool = False, width: int | None = None
) -> str:
    """The ``--help`` text: the task's own options, then the framework's top-level ones, then the
    framework's option groups (folded to one line each unless ``show_all``).

    Args:
        config_class: The config dataclass.
        config: The values to show (the config the command would run with); the defaults if None.
        prog: The program name for ``usage:``; how this process was started if None.
        show_all: List the options of every group (``--help-all``).
        width: Wrap to this many columns; the terminal's width if None.

    Returns:
        A multi-line string ending in a newline.
    """
    width = width or shutil.get_terminal_size((100, 24)).columns
    entries = list(_entries(type(config) if config is not None else config_class, instance=config))
    own = [e for e in entries if not _is_framework(e) and e.group is None]
    framework = [e for e in entries if _is_framework(e)]
    top = [e for e in framework if "." not in e.key and e.group is None]
    # The groups the task redefines (its own defaults for ema, optim, ...) first; then the framework's:
    # the config's bases run from the last group to the first, so listed the other way the training
    # groups (nan, ema, precision, log, checkpoint, data) come before the launcher's.
    every_group = _groups(entries)
    groups = [g for g in every_group if not _is_framework(g[0])]
    groups += reversed([g for g in every_group if _is_framework(g[0])])
    name = (type(config) if config is not None else config_class).__name__
    wrap = textwrap.TextWrapper(width=max(width - 1, 40))
    lines = [
        *wrap.wrap(f"usage: {prog or program_name()} [--config FILE.yaml]... [key=value]... [--help | --help-all]"),
        "",
        *wrap.wrap(
            f"Options of {name} with the values this command would use (later layers win: the defaults, the "
            "config passed to launch, --config files in order, key=value):"
        ),
    ]
    if own:
        lines += ["", *_rows(own, width)]
    if top:
        lines += ["", "Training options:", *_rows(top, width)]
    if show_all:
        for group, below in groups:
            lines += ["", *wrap.wrap(f"{group.key}: {group.help}"), *_rows(below, width)]
    elif groups:
        lines += ["", "Option groups (--help-all lists their options):"]
        folded = [(f"{g.key}.*", f"{g.help} ({len(below)} option{'s' * (len(below) != 1)})") for g, below in groups]
        column = max(len(key) for key, _ in folded) + 4
        for key, text in folded:
            parts = textwrap.wrap(text, max(width - column, _MIN_HELP_WIDTH)) or [""]
            lines.append(f"  {key.ljust(column - 2)}{parts[0]}")
            lines += [" " * column + part for part in parts[1:]]
    return "\n".join(line.rstrip().replace(_NBSP, " ") for line in lines) + "\n"
