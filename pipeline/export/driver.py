"""An export, start to end: select the rows, write the format's extra files and
its shards, then the manifest, then remove what an earlier export to the same
place left that this one does not list.

The manifest (<to>/manifest.json) is written last and lists everything the
export wrote: shards with their row counts, the filters, the model and the
labelling runs, counts, and an entry for every image left out by an error.
The old manifest is removed before the first shard is written, so while an
export runs (or after one broke off) no manifest claims shards that are being
replaced; a finished rerun leaves exactly its own files, never a mix.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from deconvnet import storage
from deconvnet.records import now_iso, read_json, write_json

from .. import layout
from .selection import ORDER_COLUMN, Filters, Selection, select
from .shards import FORMATS, Context, run_shards, shard_name

MANIFEST = "manifest.json"
SHARD_SIZE = 1000  # images a shard: memory holds about this many masks per shard in flight
WORKERS = 4  # shards in flight at once on Ray


@dataclass(frozen=True)
class ExportConfig:
    labels: str  # the segment job's output prefix
    format: str  # a key of shards.FORMATS
    to: str  # where the export goes
    filters: Filters = field(default_factory=Filters)
    image_url_prefix: tuple[tuple[str, str], ...] = ()  # (old, new): image URIs as the tool fetches them
    shard_size: int = SHARD_SIZE
    workers: int = WORKERS
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"`format` must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.shard_size < 1 or self.workers < 1:
            raise ValueError(f"`shard_size` and `workers` must be >= 1, got {self.shard_size}, {self.workers}")
        for old, _ in self.image_url_prefix:
            if not old:
                raise ValueError("`image_url_prefix`: the prefix to replace is empty (OLD=NEW)")
        if self.to.rstrip("/") == self.labels.rstrip("/"):
            raise ValueError(f"`to` {self.to} is `labels`: export somewhere beside the labels")


def manifest_uri(to: str) -> str:
    return storage.join(to, MANIFEST)


def run_export(cfg: ExportConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export; returns the manifest (also written to <to>/manifest.json).
    ValueError for a bad config or nothing to export (before anything is written)."""
    started, opts = time.monotonic(), cfg.storage_options
    with select(cfg.labels, cfg.filters, opts) as sel:
        return _export(cfg, sel, started, log)


def _export(cfg: ExportConfig, sel: Selection, started: float, log: Callable[[str], None]) -> dict[str, Any]:
    opts, n = cfg.storage_options, sel.selected
    count = -(-n // cfg.shard_size)
    log(f"{n} of {sel.labelled} images by model {sel.model_id} to export as {cfg.format}, {count} shards")
    old = _read_manifest(cfg.to, opts)
    if old is not None:
        storage.remove(manifest_uri(cfg.to), storage_options=opts)
    ctx = Context(format=cfg.format, to=cfg.to, names=sel.names, palette=sel.palette, model_id=sel.model_id,
                  masks_root=layout.masks_uri(cfg.labels), image_url_prefix=cfg.image_url_prefix,
                  storage_options=opts)
    extra = FORMATS[cfg.format].extra_files(ctx)
    for name, data in extra.items():
        storage.write_bytes(storage.join(cfg.to, name), data, opts)
    results = list(run_shards(ctx, sel.shards(cfg.shard_size), count, cfg.workers, log))
    errors = [e for r in results for e in r.pop("errors")]
    manifest = {
        "format": cfg.format, "labels": cfg.labels, "to": cfg.to, "created": now_iso(),
        "model_id": sel.model_id, "labelling_runs": sel.run_ids,
        "classes": list(sel.names), "classes_from": sel.names_from,
        "filters": {**asdict(cfg.filters), "order": (f"{ORDER_COLUMN} ascending" if cfg.filters.review_first
                                                      else "hash of image_uri, then image_uri")},
        "image_url_prefix": [list(p) for p in cfg.image_url_prefix], "shard_size": cfg.shard_size,
        "counts": {"labelled": sel.labelled, "selected": n, "exported": sum(r["rows"] for r in results),
                   "errors": len(errors)},
        "shards": results, "files": sorted(extra), "errors": errors,
        "seconds": round(time.monotonic() - started, 3),
    }
    write_json(manifest_uri(cfg.to), manifest, opts)
    _remove_stale(cfg.to, old, {r["file"] for r in results} | set(extra), opts, log)
    return manifest


def _read_manifest(to: str, opts) -> dict[str, Any] | None:
    try:
        return read_json(manifest_uri(to), opts)
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON: not ours to trust, but replaced all the same
        return {}


# Any format's shard file name, whatever its index: what an export that broke off may have left.
_SHARD_NAMES = re.compile("|".join(re.escape(shard_name(f, 0, 0)).replace("00000", r"\d{5}") for f in FORMATS))


def _remove_stale(to: str, old: dict[str, Any] | None, keep: set[str], opts, log) -> None:
    """Files under `to` that the old manifest listed, or that are named as shards,
    and that this export did not write."""
    listed = {s["file"] for s in (old or {}).get("shards", [])} | set((old or {}).get("files", []))
    try:
        present = storage.list_files(to, storage_options=opts)
    except FileNotFoundError:
        return
    root = to.rstrip("/") + "/"
    stale = [u for u in present if (rel := u[len(root):]) not in keep and rel != MANIFEST
             and (rel in listed or _SHARD_NAMES.fullmatch(rel))]
    for uri in stale:
        storage.remove(uri, storage_options=opts)
    if stale:
        log(f"removed {len(stale)} files of an earlier export to {to}")


def describe(manifest: dict[str, Any]) -> str:
    c = manifest["counts"]
    return (f"exported {c['exported']} of {c['selected']} selected images ({c['labelled']} labelled by model "
            f"{manifest['model_id']}) in {len(manifest['shards'])} shards, {c['errors']} errors, "
            f"{manifest['seconds']:.1f} s: {manifest_uri(manifest['to'])}")
