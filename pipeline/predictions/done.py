"""The done-set of an incremental run, asked one window of the listing at a time.

An image is done when its latest row that labelled it (status ok) or found
the file itself bad (a permanent error), the row whose mask masks/ holds now
(run ids sort by start time), was written with this run's labelling key (the
model and every setting that decides a mask:
deconvnet.inference.modes.labelling_key), and its size and version (ETag or
mtime) are still those that run saw. So a run with other settings in between
(another model, another `crf`) makes the next run with the first ones label
again. Rows written before rows had keys (the key null) count for a run of
the same model whose key is the default settings' (`Labelling.legacy`): what
they were written with.

The listing comes in URI order, in windows; `lookup(lo, hi)` answers for the
window's key range only. Memory does not grow with the output:
- compacted parts (compaction.py) are sorted by image_uri; each is
  read a row group at a time, in order, and only row groups overlapping the
  window are held (about one per part);
- the run parts not yet compacted are read once, only the done columns and
  only rows that labelled an image or found it bad, concurrently. A run
  compacts before listing when there are COMPACT_AT_PARTS of them, so these
  are bounded by that, not by the bucket.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deconvnet import storage
from deconvnet.inference.modes import default_labelling_key

from .. import layout, rows
from .parts import Parts, latest_rows, read_columns, read_parts, with_visible_parts

COLUMNS = list(rows.DONE_COLUMNS)
SCHEMA = rows.columns(COLUMNS)


@dataclass(frozen=True)
class Labelling:
    """What a run labels with: its model and its labelling key (what its rows hold)."""
    model_id: str
    key: str

    @cached_property
    def legacy(self) -> bool:
        """Whether rows without a key count: this run's settings are the defaults."""
        return self.key == default_labelling_key(self.model_id)


def _final_rows(table: pa.Table) -> pa.Table:
    """The rows that labelled an image or found it bad: not transient errors."""
    return table.filter(pc.or_(pc.equal(table["status"], "ok"), table["permanent"]))


def _labelled_with(table: pa.Table, labelling: Labelling) -> pa.Table:
    """The rows written with this labelling (a row without a key: with the defaults)."""
    key = table["labelling_key"]
    same = pc.equal(key, labelling.key)
    if labelling.legacy:
        same = pc.or_kleene(pc.is_null(key), same)
    return table.filter(pc.and_(pc.equal(table["model_id"], labelling.model_id), pc.fill_null(same, False)))


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
            if self.ranges[self.next][1] >= lo:  # row groups wholly before `lo` are not read: a seek
                self.held.append((self.ranges[self.next][1], read_columns(self.parquet, SCHEMA, self.next)))
            self.next += 1
        self.held = [(mx, t) for mx, t in self.held if mx >= lo]
        return [_between(t, lo, hi) for _, t in self.held]

    def close(self) -> None:
        self.file.close()


class DoneIndex:
    """{image_uri: (size, version)} of the done images in a key range; ranges
    must be asked in increasing order (the listing's), all after `after` when
    given. The parts of run `skip_run` (the run asking: its rows are of URIs
    before `after`) are not read."""

    def __init__(self, output: str, labelling: Labelling, storage_options=None, after: str | None = None,
                 skip_run: str | None = None):
        self.output, self.labelling, self.storage_options = output, labelling, storage_options
        self.after, self.skip_run = after, skip_run
        self.sorted_parts: list[SortedPart] = []
        self._open()

    def _open(self) -> None:
        def load(parts: Parts):
            runs = [u for u in parts.runs if not (self.skip_run and layout.is_run_part(u, self.skip_run))]
            recent = read_parts(runs, COLUMNS, self.storage_options)
            return recent, [SortedPart(u, self.storage_options) for u in parts.compacted]

        self.close()
        recent, self.sorted_parts = with_visible_parts(self.output, load, self.storage_options)
        table = SCHEMA.empty_table() if not recent else pa.concat_tables(recent)
        if self.after is not None:
            table = table.filter(pc.greater(table["image_uri"], self.after))
        self.recent = _final_rows(table).sort_by("image_uri")
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
            tables += [_final_rows(t) for t in part.between(lo, hi)]
        table = _labelled_with(latest_rows(pa.concat_tables(tables)), self.labelling)
        return {u: (s, v) for u, s, v in zip(table["image_uri"].to_pylist(), table["source_size"].to_pylist(),
                                             table["source_version"].to_pylist())}

    def close(self) -> None:
        for part in self.sorted_parts:
            part.close()
