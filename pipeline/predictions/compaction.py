"""Compaction of predictions/: many small parts rewritten as few large ones,
so reading the output costs a few requests however many runs wrote it.

Every hourly run adds at least one part; after a year that is ~9,000 objects
to read before a run can start. `compact` merges run parts (and compacted
parts still under half the size limit) into one `compact-<id>.parquet`, rows
sorted by image_uri (so a reader can look up a key range by row-group
statistics: done.py), at most `max_rows` rows each (this bounds the
compactor's memory), and then deletes what it merged. Rows are never changed,
dropped or de-duplicated: every row of every run is still there.

Why no reader ever sees a row twice or misses one, even while a run writes
new parts and while this runs:

1. The compacted part is written as one atomic object (a single PUT, or a
   rename on a local disk). Its Parquet footer lists, by name, every part
   whose rows it holds (`REPLACES_KEY`).
2. Only then are those parts deleted.

A reader (`parts.visible_parts`) lists predictions/ and skips every part
that a listed compacted part replaces. Listed before step 1: it sees the old
parts and not the new one. Between 1 and 2: it sees both and skips the old.
After 2: only the new one. A part deleted between its listing and its read is
a FileNotFoundError, and the reader lists again (`parts.with_visible_parts`).
A part a run writes while this runs is not in the manifest, so it stays
visible. A compactor killed between 1 and 2 leaves replaced parts that every
reader skips; the next compaction deletes them. Replacing a compacted part
carries its manifest over, so its leftovers stay skipped after it is gone.
Two compactors at once could each merge the same part; readers then keep one
row per (image_uri, run_id) where it matters (parts.latest_rows), and the
deployment runs one at a time (deploy/: the same flock as the labelling).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from deconvnet import storage

from .. import layout
from .parts import REPLACES_KEY, read_parts, visible_parts

COMPACT_AT_PARTS = 32  # a run compacts first when this many run parts are visible
MAX_ROWS = 500_000  # rows per compacted part (the compactor holds them in memory to sort)
ROW_GROUP_ROWS = 16_384  # a done-set lookup reads about one row group per compacted part and window
READ_BATCH = 64  # parts read at once while gathering


def compact(output: str, storage_options=None, min_parts: int = 2, max_rows: int = MAX_ROWS,
            log=lambda s: None) -> dict[str, Any]:
    """Merge small parts until fewer than `min_parts` remain; returns what was done."""
    done: dict[str, Any] = {"written": [], "merged": 0, "rows": 0, "deleted_leftovers": 0}
    parts = visible_parts(output, storage_options)
    # Leftovers of a compactor that stopped between writing and deleting: already replaced.
    for uri in parts.replaced:
        _remove(uri, storage_options)
        done["deleted_leftovers"] += 1
    while True:
        small = [u for u in parts.compacted if parts.compacted_rows[u] < max_rows // 2]
        candidates = sorted(parts.runs) + small
        if len(candidates) < min_parts:
            return done
        merged, tables, total = [], [], 0
        for i in range(0, len(candidates), READ_BATCH):  # up to max_rows; parts are read a batch at a time
            batch = candidates[i:i + READ_BATCH]
            for uri, table in zip(batch, read_parts(batch, None, storage_options)):
                if total >= max_rows:
                    break
                merged.append(uri)
                tables.append(table)
                total += table.num_rows
            if total >= max_rows:
                break
        if len(merged) < 2:
            return done
        uri = _write(output, merged, tables, storage_options)
        for u in merged:
            _remove(u, storage_options)
        log(f"compacted {len(merged)} parts ({total:,} rows) into {uri}")
        done["written"].append(uri)
        done["merged"] += len(merged)
        done["rows"] += total
        parts = visible_parts(output, storage_options)


def _write(output: str, merged: list[str], tables: list[pa.Table], storage_options) -> str:
    """One compacted part holding `tables`, naming in its footer every part it replaces."""
    replaces = {layout.part_name(u) for u in merged}
    table = pa.concat_tables(tables).sort_by([("image_uri", "ascending"), ("run_id", "ascending")])
    table = table.replace_schema_metadata({REPLACES_KEY: json.dumps(sorted(replaces)).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    uri = layout.compacted_part_uri(output, layout.new_run_id())
    storage.write_bytes(uri, buf.getvalue(), storage_options)
    return uri


def _remove(uri: str, storage_options) -> None:
    try:
        storage.remove(uri, storage_options=storage_options)
    except FileNotFoundError:  # another compactor got there first
        pass


def needs_compaction(output: str, storage_options=None, at_parts: int = COMPACT_AT_PARTS) -> bool:
    parts = visible_parts(output, storage_options)
    return len(parts.runs) >= at_parts or bool(parts.replaced)

