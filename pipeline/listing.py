"""The segment job's source: the input listed as a stream, in windows, with the
done-set checked per window, feeding Ray Data without a list on the driver.

    storage.iter_files_detail (pages, URI order) ─> windows of WINDOW images
        ─> `limit`, done-set lookup for the window's key range (predictions/done.py),
           gallery overlay flag (gallery.RunningSample)
        ─> a table of rows to label per window ─> Ray Data (one streaming task)

The listing runs in one Ray Data task, `list_todo`: a generator that yields a
table per window; Ray Data passes them on every job.BLOCK_BYTES (about 2,300
rows) and the plan splits them into blocks of one segment-actor batch. Ray
Data pulls from the generator as the stages downstream have room
(back-pressure), so the driver holds none of it and the task a window. What
the driver still needs of the listing, the counts (seen, skipped) and times,
goes to a small actor (`Tally`) a window at a time, keyed by window so a
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


@dataclass
class Window:
    """One window of the listing: what was seen, skipped, and is left to label."""

    index: int
    seen: int = 0
    skipped: int = 0
    todo: list[dict[str, Any]] = field(default_factory=list)
    listing_seconds: float = 0.0
    done_seconds: float = 0.0


def windows(cfg: SegmentJobConfig, labelling: Labelling, window: int = WINDOW) -> Iterator[Window]:
    """The listing of `cfg.input`, `window` images at a time, in URI order: the
    first `cfg.limit`, those done with `labelling` skipped (with cfg.incremental)."""
    opts = cfg.storage_options
    files = storage.iter_files_detail(cfg.input, IMAGE_SUFFIXES, opts)
    if cfg.limit is not None:
        files = itertools.islice(files, cfg.limit)
    done = DoneIndex(cfg.output, labelling, opts) if cfg.incremental else None
    shown = RunningSample(cfg.gallery_size) if cfg.gallery else None
    root = None
    try:
        for index in itertools.count():
            t0 = time.perf_counter()
            chunk = list(itertools.islice(files, window))
            w = Window(index, seen=len(chunk), listing_seconds=time.perf_counter() - t0)
            if not chunk:
                return
            if root is None:  # a single file is listed as itself: paths relative to its folder
                root = input_root(cfg.input, is_file=chunk[0].uri == cfg.input)
            t0 = time.perf_counter()
            labelled = done.lookup(chunk[0].uri, chunk[-1].uri) if done else {}
            w.done_seconds = time.perf_counter() - t0
            for f in chunk:
                # Every listed image enters the running sample, labelled before or not.
                overlay = shown.add(f.uri) if shown else False
                if labelled.get(f.uri) == (f.size, f.version):
                    w.skipped += 1
                    continue
                w.todo.append({"image_uri": f.uri, "rel": relative_key(f.uri, root), "source_size": f.size,
                               "source_version": f.version, "overlay": cfg.overlays or overlay})
            yield w
    finally:
        if done:
            done.close()


@ray.remote(num_cpus=0)
class Tally:
    """The listing's counts, a window at a time (idempotent: keyed by window)."""

    def __init__(self):
        self.windows: dict[int, dict[str, float]] = {}

    def add(self, index: int, counts: dict[str, float]) -> None:
        self.windows[index] = counts

    def totals(self) -> dict[str, float]:
        keys = ("seen", "skipped", "listing_seconds", "done_seconds")
        out = {k: sum(w[k] for w in self.windows.values()) for k in keys}
        out["windows"] = len(self.windows)
        return out


def list_todo(seed: dict[str, Any], cfg: SegmentJobConfig, labelling: Labelling, tally) -> Iterator[pa.Table]:
    """Ray Data's map_batches over one seed row: the rows to label, a window at a
    time, its counts sent to `tally` first (job.plan splits the tables into blocks)."""
    for w in windows(cfg, labelling):
        ray.get(tally.add.remote(w.index, {
            "seen": w.seen, "skipped": w.skipped, "listing_seconds": w.listing_seconds,
            "done_seconds": w.done_seconds}))
        if w.todo:
            yield pa.Table.from_pylist(w.todo, schema=TODO_SCHEMA)
