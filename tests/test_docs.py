"""The documentation stays true to the repository: README.md is a front page of at
most 200 lines, every relative link in README.md and docs/*.md reaches a file of
the repository (and an #anchor a heading of it, by GitHub's slug rules), and the
module map in docs/design.md names every module of deconvnet/, pipeline/ and
jobs/ (recursively, __init__.py aside) and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAP_PAGE = ROOT / "docs" / "design.md"
MAP_HEADING = "The modules"
PACKAGES = ("deconvnet", "pipeline", "jobs")
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    out, fenced = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and (fenced is None or m.group(1) == fenced):
            fenced = m.group(1) if fenced is None else None
            continue
        if fenced is None:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, without
    punctuation (word characters, spaces and hyphens stay), spaces -> hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """Link and image targets in the page's prose (not in code)."""
    out = []
    for line in prose_lines(page.read_text()):
        line = CODE_SPAN.sub("", line)
        out += INLINE_LINK.findall(line)
        m = REFERENCE_DEF.match(line)
        if m:
            out.append(m.group(1))
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if SCHEME.match(target):  # https:, mailto:: not a file of this repository
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if path.startswith("/") or not dest.is_relative_to(ROOT) or not dest.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return broken


def module_map(page: Path = MAP_PAGE) -> list[str]:
    """The modules the map's table names: the backquoted .py paths in its first column."""
    lines = prose_lines(page.read_text())
    start = next(i for i, line in enumerate(lines)
                 if (m := HEADING.match(line)) and m.group(2) == MAP_HEADING)
    named = []
    for line in lines[start + 1:]:
        if HEADING.match(line):
            break
        if (cell := re.match(r"^\|([^|]+)\|", line)):
            named += re.findall(r"`([\w/]+\.py)`", cell.group(1))
    return named


def modules_in_tree() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for d in PACKAGES for p in (ROOT / d).rglob("*.py")
            if p.name != "__init__.py"}


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if not SCHEME.match(t)}
    unlinked = [p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_module_map_matches_the_tree():
    named = module_map()
    repeated = sorted({m for m in named if named.count(m) > 1})
    tree = modules_in_tree()
    assert not repeated, f"named more than once in the map: {repeated}"
    assert set(named) == tree, (f"missing from the map: {sorted(tree - set(named))}; "
                                f"not in the tree: {sorted(set(named) - tree)}")


def test_slugs_follow_githubs_rules():
    assert slug("Inference: `original` and `default`") == "inference-original-and-default"
    assert slug("One image: `python -m deconvnet`") == "one-image-python--m-deconvnet"
    assert slug("The cluster: `ray_cluster.yaml`") == "the-cluster-ray_clusteryaml"
    assert slug("Weights and Table 1") == "weights-and-table-1"
