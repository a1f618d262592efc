"""Reading what a benchmark wrote: its JSON rows, after checking the environment and Markdown beside them."""

import json
from pathlib import Path
from typing import Any


def read_results(out: Path, name: str) -> list[dict[str, Any]]:
    """The rows of ``out/name.json``; also checks that it records the device and versions and that
    ``name.md`` exists with its title."""
    data = json.loads((out / f"{name}.json").read_text())
    assert data["environment"]["device"] and data["environment"]["versions"]["jax"]
    assert (out / f"{name}.md").read_text().startswith(f"# {name}")
    return data["results"]
