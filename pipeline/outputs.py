"""What the segment job leaves under --output, and how a later run reads it.

    masks/<input path relative to --input, extension .png>   palette label maps
    overlays/<same, extension .jpg>                           with --overlays
    predictions/<run_id>-part-<n>.parquet                     one row per input processed
    predictions/compact-<id>.parquet                          many runs' parts, compacted (compaction.py)
    runs/<run_id>.json                                        config, counts, times
    index.html                                                with --gallery (pipeline/gallery.py)

Output paths are a pure function of the input URI, so a retried task rewrites
the same objects. Parquet parts are written by the driver as rows arrive, after
their masks exist: a run killed half-way leaves only rows that are really done,
and the next incremental run skips exactly those.

Readers take the *visible* parts: every part, less those a compacted part's
footer says it replaces (`visible_parts`); see pipeline/compaction.py for why
that makes a compaction invisible to readers. Parts are read concurrently.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import posixpath
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deconvnet import storage
from deconvnet.records import write_json

from . import rows

PREDICTION_SCHEMA = rows.SCHEMA  # the row is defined in pipeline/rows.py
COMPACTED = "compact-"  # name prefix of compacted parts (pipeline/compaction.py)
REPLACES_KEY = b"deconvnet.replaces"  # a compacted part's footer: JSON list of the part names it replaces
READ_THREADS = 16  # parts read at once: object stores answer many small GETs in parallel


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


@dataclass
class Parts:
    """The parts a reader should read: together they hold every row exactly once."""

    runs: list[str] = field(default_factory=list)  # <run_id>-part-N.parquet, as runs wrote them
    compacted: list[str] = field(default_factory=list)  # compact-*.parquet, rows sorted by image_uri
    compacted_rows: dict[str, int] = field(default_factory=dict)  # rows of each compacted part
    replaced: list[str] = field(default_factory=list)  # still present, but their rows are in a compacted part

    @property
    def all(self) -> list[str]:
        return self.runs + self.compacted


def predictions_uri(output: str) -> str:
    return storage.join(output, "predictions")


def part_name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def visible_parts(output: str, storage_options=None) -> Parts:
    """Every part under predictions/ less those a compacted part says it replaces
    (they are deleted after it is written; a reader in between must skip them)."""
    try:
        uris = storage.list_files(predictions_uri(output), suffixes=[".parquet"], storage_options=storage_options)
    except FileNotFoundError:
        return Parts()
    compacted = [u for u in uris if part_name(u).startswith(COMPACTED)]
    footers = dict(zip(compacted, parallel(lambda u: read_footer(u, storage_options), compacted)))
    replaced = {n for m in footers.values() for n in json.loads((m.metadata or {}).get(REPLACES_KEY, b"[]"))}
    out = Parts(replaced=[u for u in uris if part_name(u) in replaced])
    for u in uris:
        if part_name(u) in replaced:
            continue
        if u in footers:
            out.compacted.append(u)
            out.compacted_rows[u] = footers[u].num_rows
        else:
            out.runs.append(u)
    return out


def read_footer(uri: str, storage_options=None) -> pq.FileMetaData:
    with storage.open_input(uri, storage_options) as f:
        return pq.read_metadata(f)


def read_parts(parts: list[str], columns: list[str] | None, storage_options=None) -> list[pa.Table]:
    """The parts' tables (these columns, typed by the schema), read concurrently.
    A small part is one GET; a compacted one is read by ranges, only the columns asked for."""
    schema = rows.columns(columns)

    def read(uri: str) -> pa.Table:
        if part_name(uri).startswith(COMPACTED):
            with storage.open_input(uri, storage_options) as f:
                return pq.read_table(f, columns=columns).cast(schema)
        return pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_options)), columns=columns).cast(schema)

    return parallel(read, parts)


def with_visible_parts(output: str, read, storage_options=None, attempts: int = 5):
    """`read(parts)` over the visible parts; when a part vanished in between (a
    compaction replaced it), list again: its rows are in the new compacted part."""
    for attempt in range(attempts):
        try:
            return read(visible_parts(output, storage_options))
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def read_predictions(output: str, columns: list[str] | None = None, storage_options=None) -> pa.Table:
    """Every row under predictions/ (of all runs), as one table; empty when there is none."""
    schema = rows.columns(columns)
    tables = with_visible_parts(output, lambda p: read_parts(p.all, columns, storage_options), storage_options)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def parallel(fn, items: list) -> list:
    """[fn(x) for x in items], READ_THREADS at a time, in order."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


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
        self.prefix = predictions_uri(output)
        self.run_id, self.rows_per_part, self.storage_options = run_id, rows_per_part, storage_options
        self.part_seconds, self.last_flush = part_seconds, time.monotonic()
        self.tables: list[pa.Table] = []
        self.pending = 0  # rows buffered, not yet in a part
        self.parts: list[str] = []
        self.counts = {"ok": 0, "error": 0}

    def add(self, table: pa.Table) -> None:
        """Rows with the prediction schema (rows.table_from_batch)."""
        self.tables.append(table)
        self.pending += table.num_rows
        ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
        self.counts["ok"] += ok
        self.counts["error"] += table.num_rows - ok
        if self.pending >= self.rows_per_part or time.monotonic() - self.last_flush >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(self.tables), buf)
        uri = storage.join(self.prefix, f"{self.run_id}-part-{len(self.parts):05d}.parquet")
        storage.write_bytes(uri, buf.getvalue(), self.storage_options)
        self.parts.append(uri)
        self.tables, self.pending, self.last_flush = [], 0, time.monotonic()


def write_run_record(output: str, run_id: str, record: dict[str, Any], storage_options=None) -> str:
    return write_json(storage.join(output, "runs", f"{run_id}.json"), record, storage_options)
