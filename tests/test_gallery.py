"""The gallery (index.html): the sample, the chart and escaping from rows, then
the page a real run writes, loaded in headless Chromium over HTTP and file://."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import random
import re
import threading
from html import escape
from pathlib import Path

import numpy as np
import pyarrow as pa
from chromium import load_pages
from corpus import PHOTO, scene
from PIL import Image

from deconvnet import storage
from deconvnet.data.voc import VOC_CLASSES, voc_palette
from pipeline import gallery, layout
from pipeline.predictions.compaction import compact
from pipeline.predictions.parts import iter_latest, latest_rows, read_predictions
from pipeline.predictions.writer import PredictionWriter
from pipeline.rows import SCHEMA
from jobs import segment_dataset


FAST = ["--max-proposals", "3", "--batch-size", "8", "--images-per-batch", "4", "--crf", "none"]
RUN = {"run_id": "20260101T000000Z-abcdef", "model_id": "deconvnet-test", "counts": {"ok": 3, "error": 1}}


def row(uri: str, status: str = "ok", pixels=(30, 10), output: str = "out", **kw) -> dict:
    rel = uri.split("/in/", 1)[1].rsplit(".", 1)[0]
    pixels = list(pixels) + [0] * (21 - len(pixels))
    r = {"image_uri": uri, "mask_uri": f"{output}/masks/{rel}.png" if status == "ok" else "",
         "overlay_uri": "", "status": status, "error": "" if status == "ok" else "not an image",
         "permanent": status != "ok", "width": 8, "height": 5,
         "classes": [VOC_CLASSES[k] for k, v in enumerate(pixels) if v] if status == "ok" else [],
         "class_pixels": pixels if status == "ok" else [0] * 21, "mean_confidence": 0.75, "uncertainty": 0.25,
         "model_id": "deconvnet-test", "run_id": RUN["run_id"]}
    return {**r, **kw}


def test_the_sample_is_the_lowest_hashes_whatever_the_order():
    rows = [row(f"s3://b/in/{i:04d}.jpg", "ok" if i % 7 else "error") for i in range(500)]
    want = sorted((gallery.sample_key(r["image_uri"]) for r in rows))[:9]
    for _ in range(3):
        random.shuffle(rows)
        s = gallery.summarize(rows, sample_size=9, error_examples=4)
        assert sorted(gallery.sample_key(r["image_uri"]) for r in s.sample) == want
        assert [r["image_uri"] for r in s.sample] == sorted(r["image_uri"] for r in s.sample)
        assert [r["image_uri"] for r in s.error_examples] == [f"s3://b/in/{i:04d}.jpg" for i in (0, 7, 14, 21)]
    assert gallery.sample([r["image_uri"] for r in rows], 9) == {u for _, u in want}
    assert (s.images, s.ok, s.errors) == (500, 428, 72)


def test_the_chart_sums_class_pixels_of_ok_rows():
    rows = [row("s3://b/in/a.jpg", pixels=(30, 10)), row("s3://b/in/b.jpg", pixels=(50, 0, 10)),
            row("s3://b/in/c.jpg", "error")]
    s = gallery.summarize(rows, sample_size=48)
    assert s.class_pixels[:3] == [80, 10, 10] and sum(s.class_pixels) == 100
    page = gallery.render(s, output="out", classes=VOC_CLASSES, palette=voc_palette(21), run=RUN)
    chart = page[page.index("<svg"):page.index("</svg>")]
    assert re.findall(r"<text[^>]*>([^<]+)</text>", chart) == ["background", "80.0%", "aeroplane", "10.0%",
                                                                "bicycle", "10.0%"]
    assert "No pixels of: bird, boat," in page and "Errors: 1 image could not be labelled" in page
    # A share under 0.1% is written as text, not as the start of a tag.
    tiny = gallery.render(gallery.summarize([row("s3://b/in/a.jpg", pixels=(99_999, 1))], 48), output="out",
                          classes=VOC_CLASSES, palette=voc_palette(21), run=RUN)
    assert "&lt;0.1%" in tiny and "<0.1%" not in tiny


def test_the_least_certain_images_are_listed_first_and_cards_show_uncertainty():
    rows = [row(f"s3://b/in/{i:03d}.jpg", uncertainty=(i * 37 % 100) / 100) for i in range(100)]
    rows += [row("s3://b/in/old.jpg", uncertainty=None),  # a row written before the column: not ranked
             row("s3://b/in/bad.jpg", "error", uncertainty=None)]
    random.shuffle(rows)
    s = gallery.summarize(rows, sample_size=200, review=3)
    assert [(r["image_uri"], r["uncertainty"]) for r in s.least_certain] == [
        ("s3://b/in/027.jpg", 0.99), ("s3://b/in/054.jpg", 0.98), ("s3://b/in/081.jpg", 0.97)]
    page = " ".join(gallery.render(s, output="out", classes=VOC_CLASSES, palette=voc_palette(21), run=RUN).split())
    assert "Least certain first: 3 images to review" in page
    review = page[page.index("Least certain first"):page.index("<h2>Errors")]
    assert re.findall(r'<a href="([^"]+)">', review) == ["masks/027.png", "masks/054.png", "masks/081.png"]
    assert "<td>99.0%</td><td>0.75</td><td>background, aeroplane</td>" in review
    cards = page[page.index('<div class="grid">'):page.index("Least certain first")]
    assert "confidence 0.75 · uncertain 99.0%" in cards and cards.count("uncertain") == 100  # not old.jpg's


def test_hostile_keys_and_messages_are_escaped_and_links_percent_encoded():
    evil = 's3://b/in/x/<script>alert("k")</script> ü #1?.jpg'
    rows = [row(evil, overlay_uri='out/overlays/x/<script>alert("k")</script> ü #1?.jpg'),
            row("s3://b/in/y.jpg", "error", error="<img src=x onerror=alert(1)>"),
            row("s3://b/in/z.jpg", mask_uri="elsewhere/masks/z.png")]
    page = gallery.render(gallery.summarize(rows, 48), output="out", classes=VOC_CLASSES,
                          palette=voc_palette(21), run=RUN)
    assert "<script" not in page and "<img src=x" not in page
    assert escape(evil) in page and escape("<img src=x onerror=alert(1)>") in page
    srcs = re.findall(r'<img class="(\w+)" src="([^"]+)"', page)
    assert srcs == [("overlay", "overlays/x/%3Cscript%3Ealert%28%22k%22%29%3C/script%3E%20%C3%BC%20%231%3F.jpg")]
    assert "mask not under this output" in page  # z's mask lies outside: no link, no broken image
    assert gallery.relative_href("out/masks/../../etc/passwd", "out") is None
    assert gallery.relative_href("out/masks/a:b.png", "out/") == "masks/a%3Ab.png"  # never a scheme


def test_latest_rows_keep_the_latest_run_of_each_image():
    rows = [row("s3://b/in/a.jpg", run_id="20260101T000000Z-aaaaaa", mean_confidence=0.1),
            row("s3://b/in/b.jpg", run_id="20260101T000000Z-aaaaaa"),
            row("s3://b/in/a.jpg", run_id="20260102T000000Z-bbbbbb", mean_confidence=0.9)]
    table = pa.Table.from_pylist([{k: r[k] for k in gallery.COLUMNS} for r in rows],
                                 schema=pa.schema([SCHEMA.field(c) for c in gallery.COLUMNS]))
    latest = latest_rows(table).to_pylist()
    assert [(r["image_uri"], round(r["mean_confidence"], 1)) for r in latest] == [
        ("s3://b/in/a.jpg", 0.9), ("s3://b/in/b.jpg", 0.8)]


def test_latest_rows_in_bounded_batches_are_the_latest_rows_of_every_part(tmp_path):
    """iter_latest, the gallery's reader: compacted and run parts, several runs, in
    batches of about 25 rows; the same latest rows, each once, as reading them all."""
    output = str(tmp_path / "out")
    full = {f.name: f for f in SCHEMA}

    def write_run(run_id: str, uris: list[str], rows_per_part: int) -> None:
        writer = PredictionWriter(output, run_id, rows_per_part)
        for i in range(0, len(uris), 10):
            rs = [{**{k: None for k in SCHEMA.names}, **row(u, "ok" if j % 5 else "error", run_id=run_id),
                   "mean_confidence": float(j)} for j, u in enumerate(uris[i:i + 10])]
            writer.add(pa.Table.from_pylist(rs, schema=pa.schema(list(full.values()))))
        writer.flush()

    uris = [f"s3://b/in/{i:04d}.jpg" for i in range(300)]
    write_run("20260101T000000Z-aaaaaa", uris[:200], 40)
    compact(output, max_rows=120)  # sorted compacted parts, read by row group
    write_run("20260102T000000Z-bbbbbb", uris[100:], 30)  # relabels 100 of them, adds 100
    want = latest_rows(read_predictions(output, list(gallery.COLUMNS))).to_pylist()
    batches = list(iter_latest(output, list(gallery.COLUMNS), batch_rows=25))
    assert len(batches) >= 10 and max(t.num_rows for t in batches) < 60
    got = sorted((r for t in batches for r in t.to_pylist()), key=lambda r: r["image_uri"])
    assert got == want and len(got) == 300
    assert {r["run_id"] for r in got if r["image_uri"] >= uris[100]} == {"20260102T000000Z-bbbbbb"}


@contextlib.contextmanager
def serve(directory: str):
    """The output directory over HTTP on 127.0.0.1, as `python -m http.server` serves it."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_the_page_of_a_run_loads_in_chromium_with_no_errors(ray_session, tmp_path, tiny_model):
    hostile = 'odd/<img src=x onerror=alert(1)> "ü" #%.png'
    names = {"photo/grace hopper.jpg": PHOTO.read_bytes(), hostile: _png(scene(seed=1)),
             "bad/empty.jpg": b"", "bad/text.jpg": b"not an image\n" * 10,
             **{f"scenes/{i}.png": _png(scene(seed=10 + i)) for i in range(5)}}
    # The sample hashes full URIs, and tmp_path differs per run: pick an input folder
    # whose sample of 5 holds the hostile name, so the page must show it.
    inp = next(d for d in (str(tmp_path / f"in{k}") for k in range(1000))
               if storage.join(d, hostile) in gallery.sample([storage.join(d, n) for n in names], 5))
    for name, data in names.items():
        path = Path(inp) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out = str(tmp_path / "out")
    args = ["--input", inp, "--output", out, "--model", tiny_model, "--gallery", "--gallery-size", "5", *FAST]
    assert segment_dataset.main(args) == 0
    first = Path(layout.gallery_uri(out)).read_text()

    shown = gallery.sample([storage.join(inp, n) for n in names], 5)
    shown_ok = {u for u in shown if "/bad/" not in u}
    # The listing streams in URI order and asks for an overlay of each image that is in the
    # running sample when listed: every image of the final sample, and those displaced later.
    running = gallery.RunningSample(5)
    flagged = {u for u in sorted(storage.join(inp, n) for n in names) if running.add(u)}
    assert running.uris() == shown and shown <= flagged
    overlays = {str(p) for p in Path(layout.overlays_uri(out)).rglob("*.*")}
    assert overlays == {layout.overlay_uri(out, u[len(inp) + 1:]) for u in flagged if "/bad/" not in u}

    # A run with nothing new rebuilds the page from all of predictions/: the same images.
    assert segment_dataset.main(args) == 0
    page = Path(layout.gallery_uri(out)).read_text()
    assert "labelled 0, found 0 errors and skipped 9 already labelled" in " ".join(page.split())
    assert re.findall(r'src="([^"]+)"', page) == re.findall(r'src="([^"]+)"', first)

    broken = tmp_path / "broken.html"  # the harness must see what goes wrong on a page
    broken.write_text('<img src="missing.png"><script>console.error("boom"); null.x;</script>')
    with serve(out) as base:
        http_page, file_page, bad = load_pages(
            [base + layout.GALLERY, Path(layout.gallery_uri(out)).as_uri(), broken.as_uri()], tmp_path)
    for p in (http_page, file_page):
        assert p.problems == [], p.url
        assert len(p.images) == len(shown_ok) and all(i["complete"] and i["width"] > 0 for i in p.images), p.images
        assert p.scripts == 0 and '<img src=x onerror=alert(1)> "ü" #%.png' in p.text
        assert "Errors: 2 images could not be labelled" in p.text and p.title.startswith("Segmentation gallery")
        assert p.screenshot.stat().st_size > 10_000
    assert {i["src"][len(base):] for i in http_page.images} == {
        gallery.relative_href(layout.overlay_uri(out, u[len(inp) + 1:]), out)
        for u in shown_ok}
    assert any("boom" in m for m in bad.problems) and any("missing.png" in m for m in bad.problems)
    assert any(m.startswith("exception") for m in bad.problems) and bad.images[0]["width"] == 0
    print(f"screenshots: {http_page.screenshot} {file_page.screenshot}")
