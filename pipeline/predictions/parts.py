"""Reading predictions/: which parts, their rows, and the latest row of each image.

Readers take the *visible* parts: every part, less those a compacted part's
footer says it replaces (`visible_parts`); compaction.py says why that makes a
compaction invisible to readers. Parts are read concurrently.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deconvnet import storage

from .. import layout, rows

REPLACES_KEY = b"deconvnet.replaces"  # a compacted part's footer: JSON list of the part names it replaces
LATEST_BATCH_ROWS = 100_000  # rows iter_latest holds at once (about): see there
MAX_SPILL_FILES = 512  # buckets iter_latest spills to at most (open files at once)


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


def visible_parts(output: str, storage_options=None) -> Parts:
    """Every part under predictions/ less those a compacted part says it replaces
    (they are deleted after it is written; a reader in between must skip them)."""
    try:
        uris = storage.list_files(layout.predictions_uri(output), suffixes=[layout.PART_SUFFIX],
                                  storage_options=storage_options)
    except FileNotFoundError:
        return Parts()
    compacted = [u for u in uris if layout.is_compacted(u)]
    footers = dict(zip(compacted, storage.read_concurrently(lambda u: read_footer(u, storage_options), compacted)))
    replaced = {n for m in footers.values() for n in json.loads((m.metadata or {}).get(REPLACES_KEY, b"[]"))}
    out = Parts(replaced=[u for u in uris if layout.part_name(u) in replaced])
    for u in uris:
        if layout.part_name(u) in replaced:
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
    """The parts' tables (these columns, typed by the schema; a column a part was
    written without is nulls), read concurrently. A small part is one GET; a
    compacted one is read by ranges, only the columns asked for."""
    return list(storage.read_concurrently(_part_reader(columns, storage_options), parts))


def _part_reader(columns: list[str] | None, storage_options):
    schema = rows.columns(columns)

    def read(uri: str) -> pa.Table:
        if layout.is_compacted(uri):
            with storage.open_input(uri, storage_options) as f:
                return read_columns(pq.ParquetFile(f), schema)
        return read_columns(pq.ParquetFile(io.BytesIO(storage.read_bytes(uri, storage_options))), schema)

    return read


def read_columns(part: pq.ParquetFile, schema: pa.Schema, row_group: int | None = None) -> pa.Table:
    """`schema`'s columns of a part (of one row group of it), those it has; the others nulls."""
    names = [n for n in schema.names if n in part.schema_arrow.names]
    table = part.read(columns=names) if row_group is None else part.read_row_group(row_group, columns=names)
    return rows.conform(table, schema)


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


def iter_latest(output: str, columns: list[str], storage_options=None,
                batch_rows: int = LATEST_BATCH_ROWS, where=None) -> Iterator[pa.Table]:
    """Every image's latest row (as `latest_rows`), these columns, in tables of
    about `batch_rows` rows: memory depends on `batch_rows`, not on the row count.
    `where(table)`, when given, is a boolean mask of the rows to consider at all
    (before the latest is taken: an image whose rows it drops all is left out).

    The visible parts are read once, a part (a compacted one a row group) at a
    time, only these columns, and each batch is spread by a hash of image_uri
    over local spill files, enough of them (from the parts' footers) that each
    holds about `batch_rows` rows (past MAX_SPILL_FILES * `batch_rows` rows,
    more). Every row of an image lands in the same file; each file is then read
    back and cut to its latest rows. Rows come in no particular order."""
    import pandas as pd  # its hash is vectorised and stable

    columns = list(dict.fromkeys([*columns, "image_uri", "run_id"]))
    schema = rows.columns(columns)
    with tempfile.TemporaryDirectory(prefix="latest-") as tmp:
        def spill(parts: Parts) -> int:
            for name in os.listdir(tmp):  # a retry (a part vanished) starts over
                os.remove(os.path.join(tmp, name))
            sizes = list(storage.read_concurrently(lambda u: read_footer(u, storage_options).num_rows, parts.all))
            buckets = min(MAX_SPILL_FILES, max(1, -(-sum(sizes) // batch_rows)))
            writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
            try:
                run_rows = sum(sizes[:len(parts.runs)]) // max(1, len(parts.runs))  # a run part's, on average
                for batch in _part_batches(parts, columns, storage_options, batch_rows, run_rows):
                    if where is not None:
                        batch = batch.filter(where(batch))
                    uris = batch.column("image_uri").to_numpy(zero_copy_only=False)
                    ids = pd.util.hash_array(uris) % buckets
                    for b in np.unique(ids):
                        if b not in writers:
                            writers[b] = pa.ipc.new_file(os.path.join(tmp, f"{b}.arrow"), schema)
                        writers[b].write_table(batch.filter(pa.array(ids == b)))
            finally:
                for w in writers.values():
                    w.close()
            return buckets

        for b in range(with_visible_parts(output, spill, storage_options)):
            path = os.path.join(tmp, f"{b}.arrow")
            if os.path.exists(path):
                with pa.memory_map(path) as f:
                    yield latest_rows(pa.ipc.open_file(f).read_all())
                os.remove(path)


def _part_batches(parts: Parts, columns: list[str], storage_options, batch_rows: int,
                  run_rows: int) -> Iterator[pa.Table]:
    """The parts' rows (these columns), a run part or a compacted part's row group at a time."""
    # Run parts are small (rows_per_part rows, `run_rows` on average), read a few at a time: up to
    # 2 * threads wait in read_concurrently, together about `batch_rows` rows (one at a time at least).
    threads = max(1, min(storage.READ_THREADS, batch_rows // max(1, 2 * run_rows)))
    yield from storage.read_concurrently(_part_reader(columns, storage_options), parts.runs, threads)
    schema = rows.columns(columns)
    for uri in parts.compacted:  # a row group at a time (compaction writes them small)
        with storage.open_input(uri, storage_options) as f:
            part = pq.ParquetFile(f)
            for group in range(part.num_row_groups):
                yield read_columns(part, schema, group)
