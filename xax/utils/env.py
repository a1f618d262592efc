"""The one place environment variables are read, each validated with its legal values."""

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """The user's cache folder for xax: ``$XDG_CACHE_HOME/xax``, else ``~/.cache/xax``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "xax"


def is_interactive_terminal(stream_isatty: bool) -> bool:
    """Whether progress bars may redraw in place: a TTY and not a dumb terminal."""
    return stream_isatty and os.environ.get("TERM", "") != "dumb"
