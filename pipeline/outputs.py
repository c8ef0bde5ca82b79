"""What the segment job leaves under --output, and how a later run reads it.

    masks/<input path relative to --input, extension .png>   palette label maps
    overlays/<same, extension .jpg>                           with --overlays
    predictions/<run_id>-part-<n>.parquet                     one row per input processed
    runs/<run_id>.json                                        config, counts, times
    index.html                                                with --gallery (pipeline/gallery.py)

Output paths are a pure function of the input URI, so a retried task rewrites
the same objects. Parquet parts are written by the driver as rows arrive, after
their masks exist: a run killed half-way leaves only rows that are really done,
and the next incremental run skips exactly those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import posixpath
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deconvnet import storage

PREDICTION_SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("mask_uri", pa.string()),
    ("overlay_uri", pa.string()),
    ("status", pa.string()),  # "ok" or "error"
    ("error", pa.string()),  # what was wrong, "" when ok
    ("permanent", pa.bool_()),  # the file itself is bad: retrying the same bytes cannot help
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("classes", pa.list_(pa.string())),  # class names present in the mask
    ("class_pixels", pa.list_(pa.int64())),  # pixels per class id, all classes
    ("mean_confidence", pa.float32()),
    ("num_proposals", pa.int32()),
    ("source_size", pa.int64()),
    ("source_version", pa.string()),  # ETag or mtime: a changed file is labelled again
    ("model_id", pa.string()),
    ("run_id", pa.string()),
    ("seconds", pa.float64()),  # this image's share of the work, all stages
])


def new_run_id() -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"


def relative_key(image_uri: str, input_root: str) -> str:
    """The input's path relative to --input, made safe to append to --output.

    '..', '.' and empty segments are dropped so no key can climb out of the
    output prefix; when that changed the key, a short hash of the original is
    added so two hostile keys never collide on one mask.
    """
    root = input_root.rstrip("/")
    rel = image_uri[len(root):] if image_uri.startswith(root) else image_uri
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    safe = "/".join(parts) or "image"
    if safe != rel.strip("/"):
        stem, ext = posixpath.splitext(safe)
        safe = f"{stem}-{hashlib.sha1(image_uri.encode()).hexdigest()[:8]}{ext}"
    return safe


def input_root(input_uri: str, is_file: bool) -> str:
    """The prefix relative paths are taken from: the folder of a single file."""
    return posixpath.dirname(input_uri.rstrip("/")) if is_file else input_uri.rstrip("/")


def mask_uri(output: str, rel: str) -> str:
    return storage.join(output, "masks", posixpath.splitext(rel)[0] + ".png")


def overlay_uri(output: str, rel: str) -> str:
    return storage.join(output, "overlays", posixpath.splitext(rel)[0] + ".jpg")


def read_predictions(output: str, columns: list[str] | None = None, storage_options=None) -> pa.Table:
    """Every row under predictions/ (of all runs), as one table; empty when there is none."""
    try:
        parts = storage.list_files(storage.join(output, "predictions"), suffixes=[".parquet"],
                                   storage_options=storage_options)
    except FileNotFoundError:
        parts = []
    schema = pa.schema([PREDICTION_SCHEMA.field(c) for c in columns]) if columns else PREDICTION_SCHEMA
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(p, storage_options)), columns=columns) for p in parts]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per image_uri: the one from the latest run, i.e. what masks/ holds
    now (run ids start with their UTC start time, so they sort by time)."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, [("image_uri", "ascending"), ("run_id", "descending")])
    table = table.take(order)
    uris = table.column("image_uri").combine_chunks()
    first = np.ones(len(uris), dtype=bool)  # the first row of each image_uri after the sort
    first[1:] = pc.not_equal(uris[1:], uris[:-1]).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first))


def read_done(output: str, model_id: str, storage_options=None) -> dict[str, tuple[int, str]]:
    """{image_uri: (size, version)} of inputs that earlier runs finished with this
    model: labelled ok, or found to be a bad file (permanent error)."""
    cols = ["image_uri", "status", "permanent", "model_id", "source_size", "source_version"]
    done: dict[str, tuple[int, str]] = {}
    for r in iter_rows(read_predictions(output, cols, storage_options)):
        if r["model_id"] == model_id and (r["status"] == "ok" or r["permanent"]):
            done[r["image_uri"]] = (r["source_size"], r["source_version"])
    return done


def iter_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The table's rows as dicts, a record batch at a time (not all at once)."""
    for batch in table.to_batches():
        yield from batch.to_pylist()


class PredictionWriter:
    """Buffers result rows on the driver and writes them as Parquet parts: one
    every `rows_per_part` rows or `part_seconds` seconds, whichever comes first,
    so a killed run loses little finished work (its masks are rewritten next time)."""

    def __init__(self, output: str, run_id: str, rows_per_part: int, storage_options=None,
                 part_seconds: float = 60.0):
        self.prefix = storage.join(output, "predictions")
        self.run_id, self.rows_per_part, self.storage_options = run_id, rows_per_part, storage_options
        self.part_seconds, self.last_flush = part_seconds, time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.parts: list[str] = []
        self.counts = {"ok": 0, "error": 0}

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.rows.append(r)
            self.counts[r["status"]] += 1
        if len(self.rows) >= self.rows_per_part or time.monotonic() - self.last_flush >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=PREDICTION_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uri = storage.join(self.prefix, f"{self.run_id}-part-{len(self.parts):05d}.parquet")
        storage.write_bytes(uri, buf.getvalue(), self.storage_options)
        self.parts.append(uri)
        self.rows, self.last_flush = [], time.monotonic()


def write_run_record(output: str, run_id: str, record: dict[str, Any], storage_options=None) -> str:
    uri = storage.join(output, "runs", f"{run_id}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2, default=str).encode(), storage_options)
    return uri
