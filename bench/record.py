"""Where the benchmark scripts write their figures: JSON lines appended to
bench/results/<name>.json (gitignored), one object per measurement."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_path(name: str) -> str:
    return os.path.join(DIR, f"{name}.json")


def append(path: str, records: Iterable[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def report(path: str, rec: dict[str, Any], line: str) -> dict[str, Any]:
    """Print a measurement's one-line summary and append it to `path`."""
    print(line)
    append(path, [rec])
    return rec
