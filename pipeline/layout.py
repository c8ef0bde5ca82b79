"""What the segment job leaves under its output prefix (the `output` field):
every path there is computed here, and nowhere else.

    masks/<key, extension .png>                 palette label maps (key: relative_key)
    overlays/<key, extension .jpg>              with `overlays`, and the gallery's sample
    predictions/<run_id>-part-<n>.parquet       one row per input processed (pipeline/predictions/)
    predictions/compact-<id>.parquet            many runs' parts, compacted
    runs/<run_id>.json                          each run's record: config, counts, times
    index.html                                  with `gallery` (pipeline/gallery.py)
    eval/                                       jobs/evaluate.py's scores, unless told elsewhere

Paths are a pure function of the input URI, so a retried task rewrites the
same objects. A run's id names its parts and its record; ids start with the
run's UTC start time, so they sort by time (the predictions store relies on it
to find each image's latest row).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath
import uuid

from deconvnet import storage

MASKS = "masks"
OVERLAYS = "overlays"
PREDICTIONS = "predictions"
RUNS = "runs"
GALLERY = "index.html"
EVALUATION = "eval"
PART_SUFFIX = ".parquet"
COMPACTED = "compact-"  # name prefix of compacted parts (pipeline/predictions/compaction.py)


def new_run_id() -> str:
    """A fresh id: the UTC time now, then a random tag (ids sort by time)."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"


# --- inputs and their masks -------------------------------------------------------------


def input_root(input_uri: str, is_file: bool) -> str:
    """The prefix keys are taken relative to: the input, or the folder of a single file."""
    return posixpath.dirname(input_uri.rstrip("/")) if is_file else input_uri.rstrip("/")


def relative_key(image_uri: str, input_root: str) -> str:
    """The input's path relative to `input_root`, made safe to append to the output prefix.

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


def masks_uri(output: str) -> str:
    return storage.join(output, MASKS)


def mask_uri(output: str, rel: str) -> str:
    return storage.join(masks_uri(output), posixpath.splitext(rel)[0] + ".png")


def overlays_uri(output: str) -> str:
    return storage.join(output, OVERLAYS)


def overlay_uri(output: str, rel: str) -> str:
    return storage.join(overlays_uri(output), posixpath.splitext(rel)[0] + ".jpg")


# --- predictions/ -----------------------------------------------------------------------


def predictions_uri(output: str) -> str:
    return storage.join(output, PREDICTIONS)


def run_part_uri(output: str, run_id: str, index: int) -> str:
    """The `index`th Parquet part a run writes."""
    return storage.join(predictions_uri(output), f"{run_id}-part-{index:05d}{PART_SUFFIX}")


def is_run_part(uri: str, run_id: str) -> bool:
    """Whether `uri` is one of the parts run `run_id` wrote (run_part_uri)."""
    return part_name(uri).startswith(f"{run_id}-part-")


def compacted_part_uri(output: str, part_id: str) -> str:
    return storage.join(predictions_uri(output), f"{COMPACTED}{part_id}{PART_SUFFIX}")


def part_name(uri: str) -> str:
    """A part's name within predictions/ (what a compacted part's footer lists)."""
    return uri.rsplit("/", 1)[-1]


def is_compacted(uri: str) -> bool:
    return part_name(uri).startswith(COMPACTED)


# --- runs/, the gallery, evaluation ---------------------------------------------------


def runs_uri(output: str) -> str:
    return storage.join(output, RUNS)


def run_record_uri(output: str, run_id: str) -> str:
    return storage.join(runs_uri(output), f"{run_id}.json")


def gallery_uri(output: str) -> str:
    return storage.join(output, GALLERY)


def evaluation_uri(output: str) -> str:
    """Where jobs/evaluate.py writes its scores by default."""
    return storage.join(output, EVALUATION)
