"""The segment job's source: the input listed as a stream, in windows, with the
done-set checked per window, feeding Ray Data without a list on the driver.

    storage.iter_files_detail (pages, URI order, after the segment's start)
        ─> windows of WINDOW images
        ─> `limit`, done-set lookup for the window's key range (predictions/done.py),
           gallery overlay flag (gallery.RunningSample)
        ─> a table of rows to label per window ─> Ray Data (one streaming task)

A run proceeds in segments (`Segment`), one Ray Dataset each: the listing of
a segment stops once `quota` images are to label, and the next resumes after
the last URI it listed (S3 `StartAfter`, a pruned local walk), with the
done-set seeking there. What carries from one segment to the next (where to
resume, how many were listed for `limit`, the gallery's running sample) is a
few hundred bytes, so a run of any size costs the driver what one segment
does (Ray Data keeps a record per block until its Dataset ends).

The listing runs in one Ray Data task, `list_todo`: a generator that yields a
table per window; the plan splits them into blocks. Ray Data pulls from the
generator as the stages downstream have room (back-pressure), so the driver
holds none of it and the task a window. What the driver still needs of the
listing, the counts (seen, skipped), times and the next segment, goes to a
small actor (`Tally`) a window at a time, keyed by segment and window so a
retried task counts once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from deconvnet import storage

from .config import IMAGE_SUFFIXES, SegmentJobConfig
from .gallery import RunningSample
from .layout import input_root, relative_key
from .predictions.done import DoneIndex, Labelling

WINDOW = 10_000  # listed images per window: the most the listing task holds at once
LISTING_CPUS = 0.25  # it waits on storage; unlike the next stage's 0.5, so Ray does not fuse them

TODO_SCHEMA = pa.schema([("image_uri", pa.string()), ("rel", pa.string()), ("source_size", pa.int64()),
                         ("source_version", pa.string()), ("overlay", pa.bool_())])


# The first segment is small: one large block's worth (job.BLOCK_ROWS) of images in
# blocks of one actor batch (job.block_rows), so an input smaller than a large block
# still spreads over every CRF task; the next ones take cfg.segment_images each.
FIRST_SEGMENT_IMAGES = 512


@dataclass(frozen=True)
class Segment:
    """A run's share of the listing for one Dataset: the images listed after
    `after` (None: from the first) until `quota` of them are to label."""

    index: int = 0
    after: str | None = None
    quota: int | None = None  # None: to the end of the listing
    listed_before: int = 0  # images the earlier segments listed, for `limit`
    sample: tuple[tuple[int, str], ...] = ()  # the gallery's running sample as they left it

    @property
    def first(self) -> bool:
        """The run's first segment, which fills the pipeline in small blocks (job.block_rows, job.plan)."""
        return self.index == 0


def first_segment(cfg: SegmentJobConfig) -> Segment:
    return Segment(quota=min(FIRST_SEGMENT_IMAGES, cfg.segment_images))


@dataclass
class Window:
    """One window of the listing: what was seen, skipped, and is left to label;
    on the window that filled the segment's quota, the segment after it."""

    index: int
    seen: int = 0
    skipped: int = 0
    todo: list[dict[str, Any]] = field(default_factory=list)
    listing_seconds: float = 0.0
    done_seconds: float = 0.0
    next_segment: Segment | None = None


def windows(cfg: SegmentJobConfig, labelling: Labelling, window: int = WINDOW, segment: Segment = Segment(),
            run_id: str | None = None) -> Iterator[Window]:
    """The listing of `cfg.input` in `segment`, `window` images at a time, in URI
    order: the first `cfg.limit`, those done with `labelling` skipped (with
    cfg.incremental). `run_id`'s own parts are not read for the done-set: all
    its rows are of earlier segments, before `segment.after`."""
    opts = cfg.storage_options
    files = storage.iter_files_detail(cfg.input, IMAGE_SUFFIXES, opts, start_after=segment.after)
    if cfg.limit is not None:
        files = itertools.islice(files, max(0, cfg.limit - segment.listed_before))
    done = DoneIndex(cfg.output, labelling, opts, after=segment.after, skip_run=run_id) if cfg.incremental else None
    shown = RunningSample(cfg.gallery_size, segment.sample) if cfg.gallery else None
    root, listed, todo = None, segment.listed_before, 0
    try:
        for index in itertools.count():
            t0 = time.perf_counter()
            chunk = list(itertools.islice(files, window))
            w = Window(index, listing_seconds=time.perf_counter() - t0)
            if not chunk:
                return
            if root is None:  # a single file is listed as itself: paths relative to its folder
                root = input_root(cfg.input, is_file=chunk[0].uri == cfg.input)
            t0 = time.perf_counter()
            labelled = done.lookup(chunk[0].uri, chunk[-1].uri) if done else {}
            w.done_seconds = time.perf_counter() - t0
            for f in chunk:
                w.seen += 1
                # Every listed image enters the running sample, labelled before or not.
                overlay = shown.add(f.uri) if shown else False
                if labelled.get(f.uri) == (f.size, f.version):
                    w.skipped += 1
                else:
                    w.todo.append({"image_uri": f.uri, "rel": relative_key(f.uri, root), "source_size": f.size,
                                   "source_version": f.version, "overlay": cfg.overlays or overlay})
                    todo += 1
                if todo == segment.quota:  # the rest is the next segment's
                    w.next_segment = Segment(segment.index + 1, after=f.uri, quota=cfg.segment_images,
                                             listed_before=listed + w.seen,
                                             sample=tuple(shown.keys()) if shown else ())
                    yield w
                    return
            listed += w.seen
            yield w
    finally:
        if done:
            done.close()


@ray.remote(num_cpus=0)
class Tally:
    """The listing's counts and each segment's successor, a window at a time
    (idempotent: keyed by segment and window)."""

    def __init__(self):
        self.windows: dict[tuple[int, int], dict[str, float]] = {}
        self.next: dict[int, Segment] = {}

    def add(self, segment: int, index: int, counts: dict[str, float], next_segment: Segment | None = None) -> None:
        self.windows[segment, index] = counts
        if next_segment is not None:
            self.next[segment] = next_segment

    def next_segment(self, segment: int) -> Segment | None:
        """The segment after `segment` once its listing ended; None if the listing did."""
        return self.next.get(segment)

    def totals(self) -> dict[str, float]:
        keys = ("seen", "skipped", "listing_seconds", "done_seconds")
        out = {k: sum(w[k] for w in self.windows.values()) for k in keys}
        out["windows"] = len(self.windows)
        out["segments"] = len({s for s, _ in self.windows})
        return out


def list_todo(seed: dict[str, Any], cfg: SegmentJobConfig, labelling: Labelling, tally, segment: Segment,
              run_id: str) -> Iterator[pa.Table]:
    """Ray Data's map_batches over one seed row: the segment's rows to label, a
    window at a time, its counts sent to `tally` first (job.listed splits the
    tables into blocks)."""
    for w in windows(cfg, labelling, segment=segment, run_id=run_id):
        ray.get(tally.add.remote(segment.index, w.index, {
            "seen": w.seen, "skipped": w.skipped, "listing_seconds": w.listing_seconds,
            "done_seconds": w.done_seconds}, w.next_segment))
        if w.todo:
            yield pa.Table.from_pylist(w.todo, schema=TODO_SCHEMA)
