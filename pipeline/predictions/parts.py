"""Reading predictions/: which parts, their rows, and the latest row of each image.

Readers take the *visible* parts: every part, less those a compacted part's
footer says it replaces (`visible_parts`); compaction.py says why that makes a
compaction invisible to readers. Parts are read concurrently.
"""

from __future__ import annotations

import io
import json
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
    """The parts' tables (these columns, typed by the schema), read concurrently.
    A small part is one GET; a compacted one is read by ranges, only the columns asked for.
    A column that a part written before it existed lacks reads as nulls (`rows.conform`)."""
    schema = rows.columns(columns)

    def conformed(f) -> pa.Table:
        part = pq.ParquetFile(f)
        return rows.conform(part.read(columns=[n for n in schema.names if n in part.schema_arrow.names]), schema)

    def read(uri: str) -> pa.Table:
        if layout.is_compacted(uri):
            with storage.open_input(uri, storage_options) as f:
                return conformed(f)
        return conformed(io.BytesIO(storage.read_bytes(uri, storage_options)))

    return list(storage.read_concurrently(read, parts))


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
