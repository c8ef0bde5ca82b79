"""jobs/export_labels.py at scale: N synthetic prediction rows with tiny masks
(and tiny images, for the Hugging Face format) on the local disk, exported to
each format by the job as a user runs it; prints wall and CPU time and the
job's peak RSS per format and appends them to bench/results/export.json.

    python bench/export.py --rows 100000            # all three formats
    python bench/export.py --rows 10000 --formats label-studio

Each row's mask is a SIZE x SIZE palette PNG with a few rectangles of 4
classes; rows are written as the segment job writes them (PredictionWriter,
10,000 rows a part), so the export reads what it reads in production, only
smaller.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image

import record as bench_record  # bench/record.py: this script's folder is on sys.path

# ...and bench/pipeline.py would shadow the `pipeline` package: take the folder off again.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from deconvnet import storage  # noqa: E402
from deconvnet.data.voc import VOC_CLASSES, encode_label_png  # noqa: E402
from pipeline import layout, rows  # noqa: E402
from pipeline.predictions.writer import PredictionWriter  # noqa: E402

RUN = "20260101T000000Z-bench0"
CLASSES = 4


def generate(base: str, n: int, size: int, seed: int = 0) -> None:
    """n rows under `base` as a segment run leaves them: images, masks/, predictions/."""
    rng = np.random.default_rng(seed)
    writer = PredictionWriter(base, RUN, rows_per_part=10_000)
    image = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(image, format="PNG")
    batch = []
    for i in range(n):
        labels = np.zeros((size, size), np.uint8)
        for k in rng.integers(1, CLASSES, 2):
            y, x = rng.integers(0, size - 2, 2)
            labels[y:y + size // 3, x:x + size // 3] = k
        rel = f"{i // 1000:03d}/{i:07d}.png"
        storage.write_bytes(f"{base}/in/{rel}", image.getvalue())
        mask = layout.mask_uri(base, rel)
        storage.write_bytes(mask, encode_label_png(labels))
        pixels = np.bincount(labels.ravel(), minlength=CLASSES)
        batch.append({"image_uri": f"{base}/in/{rel}", "mask_uri": mask, "overlay_uri": "", "status": "ok",
                      "error": "", "permanent": False, "width": size, "height": size,
                      "classes": [VOC_CLASSES[k] for k in np.flatnonzero(pixels)],
                      "class_pixels": pixels.tolist(), "mean_confidence": float(rng.random()),
                      "num_proposals": 1, "source_size": 1, "source_version": "1", "model_id": "bench",
                      "run_id": RUN, "seconds": 0.0})
        if len(batch) == 1000:
            writer.add(pa.Table.from_pylist(batch, schema=rows.SCHEMA))
            batch = []
    if batch:
        writer.add(pa.Table.from_pylist(batch, schema=rows.SCHEMA))
    writer.flush()


def export(base: str, fmt: str, shard_size: int) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MiB, the command's last line) of one
    export, run as a user runs it. CPU time (user + system) says what the export
    costs where other work shares the cores; wall time, what a user waits."""
    job = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "export_labels.py")
    cmd = [sys.executable, job, "--labels", base, "--format", fmt, "--to", f"{base}/export-{fmt}",
           "--shard-size", str(shard_size)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(job))}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    assert os.waitstatus_to_exitcode(status) == 0, out
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--size", type=int, default=16, help="mask and image side in pixels")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--formats", default="label-studio,cvat,huggingface")
    p.add_argument("--dir", help="where the rows go (default: a temporary folder, removed after)")
    p.add_argument("--out", default=bench_record.default_path("export"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = a.dir or os.path.join(tmp, "labels")
        start = time.monotonic()
        generate(base, a.rows, a.size)
        print(f"{a.rows} rows, {a.size}x{a.size} masks generated in {time.monotonic() - start:.0f} s")
        for fmt in a.formats.split(","):
            seconds, cpu, rss, last = export(base, fmt, a.shard_size)
            bench_record.report(a.out, {"bench": "export", "format": fmt, "rows": a.rows, "size": a.size,
                                        "shard_size": a.shard_size, "seconds": round(seconds, 2),
                                        "cpu_seconds": round(cpu, 2), "peak_rss_mib": round(rss, 1)},
                                f"{fmt}: {a.rows} rows in {seconds:.1f} s ({a.rows / seconds:.0f} rows/s; "
                                f"CPU {cpu:.1f} s), peak RSS {rss:.0f} MiB | {last}")


if __name__ == "__main__":
    main()
