"""The done-set of an incremental run, asked one window of the listing at a time.

An image is done when an earlier run with the same model labelled it (status
ok) or found the file itself bad (a permanent error), and its size and
version (ETag or mtime) are still those that run saw. The latest such row of
each image decides (run ids sort by start time).

The listing comes in URI order, in windows; `lookup(lo, hi)` answers for the
window's key range only. Memory does not grow with the output:
- compacted parts (compaction.py) are sorted by image_uri; each is
  read a row group at a time, in order, and only row groups overlapping the
  window are held (about one per part);
- the run parts not yet compacted are read once, only the done columns and
  only done rows, concurrently. A run compacts before listing when there are
  COMPACT_AT_PARTS of them, so these are bounded by that, not by the bucket.
"""

from __future__ import annotations

import bisect

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deconvnet import storage

from .. import rows
from .parts import Parts, latest_rows, read_parts, with_visible_parts

COLUMNS = list(rows.DONE_COLUMNS)


def _done_rows(table: pa.Table, model_id: str) -> pa.Table:
    ok = pc.or_(pc.equal(table["status"], "ok"), table["permanent"])
    return table.filter(pc.and_(pc.equal(table["model_id"], model_id), ok))


def _between(table: pa.Table, lo: str, hi: str) -> pa.Table:
    uri = table["image_uri"]
    return table.filter(pc.and_(pc.greater_equal(uri, lo), pc.less_equal(uri, hi)))


class SortedPart:
    """A compacted part read forwards, one row group at a time, as windows advance."""

    def __init__(self, uri: str, storage_options=None):
        self.file = storage.open_input(uri, storage_options)
        self.parquet = pq.ParquetFile(self.file)
        meta, col = self.parquet.metadata, self.parquet.schema_arrow.get_field_index("image_uri")
        self.ranges = []  # (min, max) image_uri of each row group
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(col).statistics
            has = stats is not None and stats.has_min_max
            self.ranges.append((stats.min if has else "", stats.max if has else "\U0010ffff"))
        self.next = 0
        self.held: list[tuple[str, pa.Table]] = []  # (max, rows) of row groups that may still match

    def between(self, lo: str, hi: str) -> list[pa.Table]:
        while self.next < len(self.ranges) and self.ranges[self.next][0] <= hi:
            group = self.parquet.read_row_group(self.next, columns=COLUMNS)
            self.held.append((self.ranges[self.next][1], group))
            self.next += 1
        self.held = [(mx, t) for mx, t in self.held if mx >= lo]
        return [_between(t, lo, hi) for _, t in self.held]

    def close(self) -> None:
        self.file.close()


class DoneIndex:
    """{image_uri: (size, version)} of the done images in a key range; ranges
    must be asked in increasing order (the listing's)."""

    def __init__(self, output: str, model_id: str, storage_options=None):
        self.output, self.model_id, self.storage_options = output, model_id, storage_options
        self.sorted_parts: list[SortedPart] = []
        self._open()

    def _open(self) -> None:
        def load(parts: Parts):
            recent = read_parts(parts.runs, COLUMNS, self.storage_options)
            return recent, [SortedPart(u, self.storage_options) for u in parts.compacted]

        self.close()
        recent, self.sorted_parts = with_visible_parts(self.output, load, self.storage_options)
        table = rows.columns(COLUMNS).empty_table() if not recent else pa.concat_tables(recent)
        self.recent = _done_rows(table, self.model_id).sort_by("image_uri")
        self.recent_uris = self.recent["image_uri"].to_pylist()

    def lookup(self, lo: str, hi: str) -> dict[str, tuple[int, str]]:
        try:
            return self._lookup(lo, hi)
        except FileNotFoundError:  # a compaction replaced a part since: its rows are in the new one
            self._open()
            return self._lookup(lo, hi)

    def _lookup(self, lo: str, hi: str) -> dict[str, tuple[int, str]]:
        a, b = bisect.bisect_left(self.recent_uris, lo), bisect.bisect_right(self.recent_uris, hi)
        tables = [self.recent.slice(a, b - a)]
        for part in self.sorted_parts:
            tables += [_done_rows(t, self.model_id) for t in part.between(lo, hi)]
        table = latest_rows(pa.concat_tables(tables))
        return {u: (s, v) for u, s, v in zip(table["image_uri"].to_pylist(), table["source_size"].to_pylist(),
                                             table["source_version"].to_pylist())}

    def close(self) -> None:
        for part in self.sorted_parts:
            part.close()
