"""The gallery: one self-contained index.html at the top of --output that shows
a person what the labels are like.

    header   the output, the run that wrote the page and what that run did
    chart    each class's share of all labelled pixels, over every image the
             output holds (inline SVG)
    sample   up to N images with their overlay (or mask), classes and pixel
             shares, mean confidence, uncertainty; error rows in the sample show their reason
    review   the images least certain of their labels (largest `uncertainty`), first
    errors   how many images could not be labelled, and the first reasons

It works from result rows (the Parquet rows of predictions/, one per image:
see predictions.parts.latest_rows) and returns text; the driver reads the rows and
writes the page. The sample is deterministic: the images whose URI hashes
lowest, so every run shows the same images and new ones join only by
displacing others at random. The listing asks for overlays of every image
that is in the running sample when it is listed (RunningSample): a superset
of the final sample, found without holding the listing.

The page has no script and loads nothing but images under the same prefix, by
relative URL, so it works on a local disk, over `python -m http.server`, and
from a bucket that is served over HTTP or synced elsewhere. Everything that
comes from data (image keys, error messages, class names) is escaped, and
links are percent-encoded segment by segment.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import quote

import numpy as np

from deconvnet.inference.crf import UNCERTAIN_BELOW

COLUMNS = ("image_uri", "mask_uri", "overlay_uri", "status", "error", "permanent", "width", "height",
           "classes", "class_pixels", "mean_confidence", "uncertainty", "model_id", "run_id")  # what a page needs
ERROR_EXAMPLES = 10  # error rows listed by name and reason
REVIEW_EXAMPLES = 10  # the least certain images listed
CARD_CLASSES = 6  # classes listed under each image, largest share first


def sample_key(image_uri: str) -> tuple[int, str]:
    """A stable pseudo-random rank: the gallery shows the images that rank lowest."""
    digest = hashlib.sha1(image_uri.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big"), image_uri


def sample(image_uris: Iterable[str], n: int) -> set[str]:
    """The n URIs the gallery shows when these are all the images there are."""
    return {u for _, u in _smallest((sample_key(u) for u in image_uris), n)}


class RunningSample:
    """The sample of a stream of URIs: the n lowest-ranked seen so far, in O(n) memory.

    `add` says whether a URI ranks among the n lowest *when it arrives*. The
    listing asks for an overlay of exactly those: every URI of the final sample
    is one of them (the bar only falls as URIs stream past), plus the ones
    displaced later, about n * ln(N / n) of N: 48 * 12 = 590 extra overlays
    at 10 million images. So the gallery always has overlays for its sample,
    and no run needs to know the whole listing before it starts.
    """

    def __init__(self, n: int, keys: Iterable[tuple[int, str]] = ()):
        """`keys`: another sample's `keys()`, to go on where it left off."""
        self.n = n
        self.heap = [_Highest(tuple(k)) for k in keys]  # the n lowest keys; heap[0] is the highest of them
        heapq.heapify(self.heap)

    def keys(self) -> list[tuple[int, str]]:
        """The sample's state, small and picklable (`RunningSample(n, keys)` resumes it)."""
        return [k.key for k in self.heap]

    def add(self, image_uri: str) -> bool:
        key = _Highest(sample_key(image_uri))
        if len(self.heap) < self.n:
            heapq.heappush(self.heap, key)
            return True
        if key.key < self.heap[0].key:
            heapq.heapreplace(self.heap, key)
            return True
        return False

    def uris(self) -> set[str]:
        return {k.key[1] for k in self.heap}


@dataclass(frozen=True)
class _Highest:
    """A sample key that a (min-)heap orders highest first."""

    key: tuple[int, str]

    def __lt__(self, other: _Highest) -> bool:
        return self.key > other.key


def _smallest(items: Iterable[Any], n: int) -> list[Any]:
    """The n smallest items, sorted, keeping O(n) of them however many stream past."""
    kept: list[Any] = []
    for item in items:
        kept.append(item)
        if len(kept) >= 4 * n + 64:
            kept = sorted(kept)[:n]
    return sorted(kept)[:n]


@dataclass
class Summary:
    """What the page shows, gathered in one pass over the rows."""

    images: int = 0
    ok: int = 0
    errors: int = 0
    class_pixels: list[int] = field(default_factory=list)  # summed over ok rows, per class id
    models: Counter = field(default_factory=Counter)  # model_id -> images
    sample: list[dict[str, Any]] = field(default_factory=list)  # sorted by image_uri
    error_examples: list[dict[str, Any]] = field(default_factory=list)  # the first by image_uri
    least_certain: list[dict[str, Any]] = field(default_factory=list)  # ok rows, largest uncertainty first


def summarize(rows: Iterable[dict[str, Any]], sample_size: int,
              error_examples: int = ERROR_EXAMPLES, review: int = REVIEW_EXAMPLES) -> Summary:
    """Fold result rows (one per image) into a Summary, holding only the sample."""
    s = Summary()
    pixels = np.zeros(0, np.int64)
    picked: list[tuple[tuple[int, str], dict[str, Any]]] = []
    errors: list[tuple[str, dict[str, Any]]] = []
    uncertain: list[tuple[tuple[float, str], dict[str, Any]]] = []  # rows written before the column have None
    for r in rows:
        s.images += 1
        s.models[r["model_id"]] += 1
        picked.append((sample_key(r["image_uri"]), r))
        if r["status"] == "ok":
            s.ok += 1
            counts = np.asarray(r["class_pixels"], np.int64)
            if len(counts) > len(pixels):
                pixels = np.pad(pixels, (0, len(counts) - len(pixels)))
            pixels[: len(counts)] += counts
            if r.get("uncertainty") is not None:
                uncertain.append(((-r["uncertainty"], r["image_uri"]), r))
        else:
            s.errors += 1
            errors.append((r["image_uri"], r))
        if len(picked) >= 4 * sample_size + 64:
            picked = _smallest(picked, sample_size)
        if len(errors) >= 4 * error_examples + 64:
            errors = _smallest(errors, error_examples)
        if len(uncertain) >= 4 * review + 64:
            uncertain = _smallest(uncertain, review)
    s.class_pixels = pixels.tolist()
    s.sample = sorted((r for _, r in _smallest(picked, sample_size)), key=lambda r: r["image_uri"])
    s.error_examples = [r for _, r in _smallest(errors, error_examples)]
    s.least_certain = [r for _, r in _smallest(uncertain, review)]
    return s


def relative_href(uri: str, output: str) -> str | None:
    """A URL for `uri` relative to the page at the top of `output`, each path
    segment percent-encoded; None when `uri` is not under `output`."""
    root = output.rstrip("/") + "/"
    if not uri or not uri.startswith(root):
        return None
    parts = uri[len(root):].split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return "/".join(quote(p, safe="") for p in parts)


def _colour(palette: np.ndarray, k: int) -> str:
    if k >= len(palette):
        return "#999999"
    r, g, b = (int(v) for v in palette[k][:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _pct(share: float) -> str:
    """A share as HTML text ("&lt;0.1%" below 0.1%)."""
    return "&lt;0.1%" if 0 < share < 0.001 else f"{100 * share:.1f}%"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _name(classes: Sequence[str], k: int) -> str:
    return classes[k] if k < len(classes) else f"class {k}"


def _chart(pixels: list[int], classes: Sequence[str], palette: np.ndarray) -> str:
    total = sum(pixels)
    if total == 0:
        return "<p>No labelled pixels yet.</p>"
    present = sorted((k for k, v in enumerate(pixels) if v), key=lambda k: (-pixels[k], k))
    row_h, label_w, bar_w = 22, 150, 420
    width, height = label_w + bar_w + 70, row_h * len(present) + 4
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" aria-label="share of labelled pixels per class">']
    for i, k in enumerate(present):
        y, share = 2 + i * row_h, pixels[k] / total
        w = max(1.0, share * bar_w)
        name = escape(_name(classes, k))
        out.append(f'<g><title>{name}: {pixels[k]:,} pixels ({_pct(share)})</title>'
                   f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{name}</text>'
                   f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
                   f'fill="{_colour(palette, k)}" stroke="#555" stroke-width="0.5"/>'
                   f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{_pct(share)}</text></g>')
    out.append("</svg>")
    absent = [escape(_name(classes, k)) for k in range(max(len(pixels), len(classes)))
              if k >= len(pixels) or not pixels[k]]
    out.append(f"<p>{total:,} labelled pixels.")
    if absent:
        out.append(f" No pixels of: {', '.join(absent)}.")
    out.append("</p>")
    return "".join(out)


def _card(r: dict[str, Any], output: str, palette: np.ndarray) -> str:
    uri = escape(r["image_uri"])
    name = f'<div class="name" title="{uri}">{uri}</div>'
    if r["status"] != "ok":
        return (f'<figure class="card error"><div class="noimg">not labelled</div><figcaption>{name}'
                f'<div class="reason">{escape(r["error"] or "unknown error")}</div></figcaption></figure>')
    mask, over = relative_href(r["mask_uri"], output), relative_href(r["overlay_uri"], output)
    links = " · ".join(f'<a href="{h}">{label}</a>' for h, label in ((mask, "mask"), (over, "overlay")) if h)
    shown, kind = (over, "overlay") if over else (mask, "mask")
    picture = (f'<a href="{shown}"><img class="{kind}" src="{shown}" alt="{kind} of {uri}" '
               f'width="{int(r["width"])}" height="{int(r["height"])}"></a>' if shown
               else '<div class="noimg">mask not under this output</div>')
    pixels = [int(v) for v in r["class_pixels"]]
    total = sum(pixels) or 1
    # `classes` holds the row's own model's names of its nonzero ids, in id order.
    names = dict(zip((k for k, v in enumerate(pixels) if v), r["classes"] or []))
    top = sorted(names, key=lambda k: (-pixels[k], k))
    chips = "".join(f'<li><i style="background:{_colour(palette, k)}"></i>{escape(names[k])} '
                    f'{_pct(pixels[k] / total)}</li>' for k in top[:CARD_CLASSES])
    if len(top) > CARD_CLASSES:
        chips += f"<li>+{len(top) - CARD_CLASSES} more</li>"
    meta = (f'{int(r["width"])}&times;{int(r["height"])} px · confidence {float(r["mean_confidence"]):.2f}'
            + (f' · uncertain {_pct(r["uncertainty"])}' if r.get("uncertainty") is not None else "")
            + (f" · {links}" if links else ""))
    return (f'<figure class="card">{picture}<figcaption>{name}<div class="meta">{meta}</div>'
            f'<ul class="classes">{chips}</ul></figcaption></figure>')


def _least_certain(s: Summary, output: str) -> str:
    if not s.least_certain:
        return ""
    rows = []
    for r in s.least_certain:
        href = relative_href(r["overlay_uri"], output) or relative_href(r["mask_uri"], output)
        name = escape(r["image_uri"])
        link = f'<a href="{href}">{name}</a>' if href else name
        rows.append(f'<tr><td class="name">{link}</td>'
                    f'<td>{_pct(r["uncertainty"])}</td><td>{float(r["mean_confidence"]):.2f}</td>'
                    f'<td>{escape(", ".join(r["classes"] or []))}</td></tr>')
    return (f"<h2>Least certain first: {_count(len(rows), 'image')} to review</h2>"
            f"<p>Uncertain: the share of an image's pixels whose label has a probability under {UNCERTAIN_BELOW}. "
            "All images: sort predictions/ by its <code>uncertainty</code> column.</p>"
            f'<table><tr><th>image</th><th>uncertain</th><th>confidence</th><th>classes</th></tr>{"".join(rows)}'
            "</table>")


def _errors(s: Summary) -> str:
    if not s.errors:
        return "<h2>Errors</h2><p>None: every image was labelled.</p>"
    rows = "".join(f'<tr><td class="name">{escape(r["image_uri"])}</td><td>{escape(r["error"])}</td>'
                   f'<td>{"skipped: the file is bad" if r["permanent"] else "retried"}</td></tr>'
                   for r in s.error_examples)
    more = s.errors - len(s.error_examples)
    tail = f"<p>and {more:,} more.</p>" if more > 0 else ""
    return (f"<h2>Errors: {_count(s.errors, 'image')} could not be labelled</h2>"
            f'<table><tr><th>image</th><th>reason</th><th>next run</th></tr>{rows}</table>{tail}'
            "<p>Every one is a row with status = 'error' in predictions/.</p>")


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:0 0 .2em}h2{margin:1.5em 0 .5em}.sub{color:#555;overflow-wrap:anywhere}
.chart text{font:12px system-ui,sans-serif;fill:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;overflow:hidden}
.card img,.noimg{display:block;width:100%;height:180px;object-fit:contain;background:#eee}
.card img.mask{image-rendering:pixelated}
.noimg{display:flex;align-items:center;justify-content:center;color:#a00}
figcaption{padding:6px 8px}.name{font-size:12px;overflow-wrap:anywhere;color:#333}
.meta{color:#555;font-size:12px}.reason{color:#a00;font-size:12px;overflow-wrap:anywhere}
.card.error{border-color:#d99}
.classes{list-style:none;margin:4px 0 0;padding:0;font-size:12px}
.classes li{display:inline-block;margin:0 8px 2px 0}
.classes i{display:inline-block;width:10px;height:10px;margin-right:3px;border:1px solid #555;vertical-align:-1px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
td.name{overflow-wrap:anywhere;max-width:40em}
"""


def render(s: Summary, *, output: str, classes: Sequence[str], palette: np.ndarray,
           run: dict[str, Any]) -> str:
    """The page for `output`, written by `run` (its run record: run_id, model_id, counts)."""
    c = run.get("counts", {})
    models = ""
    if len(s.models) > 1:
        models = "<p>Labelled by models: " + ", ".join(
            f"{escape(m)} ({n:,})" for m, n in s.models.most_common()) + ".</p>"
    cards = "".join(_card(r, output, palette) for r in s.sample)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Segmentation gallery: {escape(output)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Segmentation gallery</h1>
<p class="sub">{escape(output)}</p>
<p>{_count(s.images, "image")}: {s.ok:,} labelled, {_count(s.errors, "error")}.
Page written by run {escape(str(run.get("run_id", "")))} with model {escape(str(run.get("model_id", "")))};
that run labelled {c.get("ok", 0):,}, found {_count(c.get("error", 0), "error")} and skipped
{c.get("skipped", 0):,} already labelled.</p>{models}
<h2>Share of labelled pixels per class</h2>
{_chart(s.class_pixels, classes, palette)}
<h2>Sample: {len(s.sample):,} of {_count(s.images, "image")}</h2>
<p>Always the same images: those whose URI hashes lowest. Each shows its overlay, or its mask
when the run that labelled it wrote no overlay.</p>
<div class="grid">{cards}</div>
{_least_certain(s, output)}
{_errors(s)}
</body></html>
"""
