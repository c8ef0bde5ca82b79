"""README.md's module map names every module of deconvnet/, pipeline/ and jobs/, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_module_map_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The modules", 1)[1].split("\n#", 1)[0]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", section, re.M):
        paths = re.findall(r"`([\w/]+\.py)`", cell)
        folder = paths[0].rsplit("/", 1)[0] if paths and "/" in paths[0] else ""
        named |= {p if "/" in p else f"{folder}/{p}" for p in paths}
    tree = {str(p.relative_to(ROOT)) for d in ("deconvnet", "pipeline", "jobs") for p in (ROOT / d).rglob("*.py")
            if p.name != "__init__.py"}
    assert named == tree, f"missing from the map: {sorted(tree - named)}; not in the tree: {sorted(named - tree)}"
