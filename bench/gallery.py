"""Peak memory of the gallery's summary (the task write_gallery runs) over many rows.

    python bench/gallery.py --rows 1000000 --dir /tmp/gallery-bench

writes synthetic prediction rows under --dir as the job leaves them after an
hourly service's second run (90% of the rows from a first run, compacted; 10%
from a second run as run parts of 5,000 rows, half of them relabelling images
of the first), then summarises them in a fresh process each way, and prints
its peak RSS and time:

    all-at-once  every row read into one table, then the latest of each image
                 (what the gallery did before)
    bounded      parts.iter_latest: batches of --batch-rows, folded into the
                 summary as they come (what write_gallery does)

The two summaries must agree (images, ok, errors, pixels, the sample).
Appends the figures as a JSON line to bench/results/gallery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import gallery  # noqa: E402
from pipeline.predictions.compaction import compact  # noqa: E402
from pipeline.predictions.parts import (  # noqa: E402
    LATEST_BATCH_ROWS, iter_latest, iter_rows, latest_rows, read_predictions)
from pipeline.predictions.writer import PredictionWriter  # noqa: E402
from pipeline.rows import SCHEMA  # noqa: E402

CLASSES = 21
PART_ROWS = 5000


def synthetic(ids: np.ndarray, run_id: str, seed: int) -> pa.Table:
    """Rows of SCHEMA for images number `ids`: every tenth an error, two classes each."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    ok = ids % 10 != 0
    pixels = np.zeros((n, CLASSES), np.int64)
    pixels[:, 0] = rng.integers(1000, 200_000, n)
    pixels[np.arange(n), rng.integers(1, CLASSES, n)] = rng.integers(1, 100_000, n)
    pixels[~ok] = 0
    uris = [f"s3://bucket/images/cam{i % 50:02d}/{i:09d}.jpg" for i in ids]
    offsets = pa.array(np.arange(0, n * CLASSES + 1, CLASSES, dtype=np.int32))
    names = [["background", "person"] if o else [] for o in ok]
    cols = {
        "image_uri": uris, "mask_uri": [u.replace("/images/", "/labels/masks/") for u in uris],
        "overlay_uri": [""] * n, "status": np.where(ok, "ok", "error").tolist(),
        "error": np.where(ok, "", "UnidentifiedImageError: cannot identify image file").tolist(),
        "permanent": (~ok).tolist(), "width": np.full(n, 500, np.int32), "height": np.full(n, 375, np.int32),
        "classes": pa.array(names, pa.list_(pa.string())),
        "class_pixels": pa.ListArray.from_arrays(offsets, pa.array(pixels.ravel())),
        "mean_confidence": rng.random(n, np.float32), "num_proposals": np.full(n, 50, np.int32),
        "source_size": rng.integers(20_000, 200_000, n), "source_version": [f'"{i:032x}"' for i in ids],
        "model_id": ["deconvnet-vgg16-voc"] * n, "run_id": [run_id] * n, "seconds": rng.random(n),
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                     else cols[f.name] for f in SCHEMA}, schema=SCHEMA)


def write_run(output: str, run_id: str, ids: np.ndarray, seed: int) -> None:
    writer = PredictionWriter(output, run_id, PART_ROWS)
    for i in range(0, len(ids), PART_ROWS):
        writer.add(synthetic(ids[i:i + PART_ROWS], run_id, seed + i))
    writer.flush()


def make(output: str, rows: int) -> None:
    first = int(rows * 0.9)
    write_run(output, "20260101T000000Z-aaaaaa", np.arange(first), 0)
    compact(output)
    second = rows - first  # half relabel images of the first run, half are new
    ids = np.concatenate([np.arange(0, first, 2)[: second // 2], np.arange(first, first + second - second // 2)])
    write_run(output, "20260101T010000Z-bbbbbb", ids, 1)


def peak_rss_mib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        return round(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)


def measure(output: str, how: str, batch_rows: int) -> dict:
    base = peak_rss_mib()
    t0 = time.perf_counter()
    if how == "all-at-once":
        rows = iter_rows(latest_rows(read_predictions(output, list(gallery.COLUMNS))))
    else:
        rows = (r for t in iter_latest(output, list(gallery.COLUMNS), batch_rows=batch_rows) for r in iter_rows(t))
    s = gallery.summarize(rows, 48)
    return {"how": how, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": base,
            "summary": [s.images, s.ok, s.errors, sum(s.class_pixels), sorted(r["image_uri"] for r in s.sample)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dir", required=True, help="where the synthetic output goes (reused if there)")
    p.add_argument("--batch-rows", type=int, default=LATEST_BATCH_ROWS)
    p.add_argument("--measure", choices=["all-at-once", "bounded"], help=argparse.SUPPRESS)
    a = p.parse_args()
    output = os.path.join(a.dir, f"rows-{a.rows}")
    if a.measure:
        print(json.dumps(measure(output, a.measure, a.batch_rows)))
        return
    if not os.path.isdir(output):
        t0 = time.perf_counter()
        make(output, a.rows)
        print(f"wrote {a.rows:,} rows under {output} in {time.perf_counter() - t0:.0f} s")
    results = []
    for how in ("all-at-once", "bounded"):
        out = subprocess.run([sys.executable, __file__, "--dir", a.dir, "--rows", str(a.rows), "--batch-rows",
                              str(a.batch_rows), "--measure", how], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout))
        r = results[-1]
        print(f"{how:12s} peak RSS {r['peak_rss_mib']:,} MiB ({r['rss_after_imports_mib']} MiB after imports), "
              f"{r['seconds']} s, {r['summary'][0]:,} images")
    assert results[0]["summary"] == results[1]["summary"], "the two summaries differ"
    out = ROOT / "bench" / "results" / "gallery.json"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps({"rows": a.rows, "batch_rows": a.batch_rows, "date": time.strftime("%Y-%m-%d"),
                            "results": [{k: v for k, v in r.items() if k != "summary"} for r in results]}) + "\n")


if __name__ == "__main__":
    main()
