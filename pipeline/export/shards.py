"""One shard of an export: read its masks (and images, for formats that embed
them), check them, encode them in the format, write one file. Memory holds one
shard's masks at a time per shard in flight, whatever the row count.

A mask that is missing, unreadable, of another size than its row says, or
with a class id the model does not have, leaves its image out of the shard and
becomes an error entry (the manifest lists them); storage that keeps failing
raises, and the export stops before its manifest is written.

Shards run in this process one after another (each reads its masks
concurrently), or as Ray tasks when Ray is initialised (a cluster: see
jobs/export_labels.py), `workers` at a time.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from deconvnet import storage
from deconvnet.data.voc import decode_label_png

from . import cvat, huggingface, labelstudio

# --format -> module: SHARD_PATTERN (file name, from index and count), NEEDS_IMAGE,
# shard(items, ctx) -> bytes, extra_files(ctx) -> {name: bytes}.
FORMATS: dict[str, ModuleType] = {"label-studio": labelstudio, "cvat": cvat, "huggingface": huggingface}


@dataclass(frozen=True)
class Context:
    """What every shard of one export shares."""

    format: str
    to: str
    names: tuple[str, ...]
    palette: np.ndarray  # (256, 3) uint8
    model_id: str
    masks_root: str  # <labels>/masks: a mask's key below it names the image in CVAT and Hugging Face
    image_url_prefix: tuple[tuple[str, str], ...] = ()
    storage_options: dict = field(default_factory=dict)

    def image_url(self, uri: str) -> str:
        """The image's URI as the tool should fetch it: the first matching prefix replaced."""
        for old, new in self.image_url_prefix:
            if uri.startswith(old):
                return new + uri[len(old):]
        return uri

    def key(self, mask_uri: str) -> str:
        """The image's id: its mask's path below masks/ without '.png' (VOC's
        image id when the input is flat), else the mask's file name stem."""
        root = self.masks_root.rstrip("/") + "/"
        rel = mask_uri[len(root):] if mask_uri.startswith(root) else posixpath.basename(mask_uri)
        return posixpath.splitext(rel)[0]


@dataclass
class Item:
    row: dict[str, Any]
    labels: np.ndarray  # (H, W) uint8 class ids
    image: bytes | None = None  # the image file, for formats that embed it


def shard_name(fmt: str, index: int, count: int) -> str:
    return FORMATS[fmt].SHARD_PATTERN.format(index=index, count=count)


def export_shard(ctx: Context, index: int, count: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write shard `index` of `count`; returns {file, rows, bytes, errors}."""
    module = FORMATS[ctx.format]
    opts = ctx.storage_options

    def read(row: dict[str, Any]) -> Item | dict[str, str]:
        try:
            labels = decode_label_png(storage.read_bytes(row["mask_uri"], opts))
            image = storage.read_bytes(row["image_uri"], opts) if module.NEEDS_IMAGE else None
        except FileNotFoundError as e:
            return _error(row, f"missing: {e}")
        except ValueError as e:
            return _error(row, f"unreadable mask: {e}")
        if labels.shape != (row["height"], row["width"]):
            return _error(row, f"mask is {labels.shape[1]}x{labels.shape[0]}, "
                               f"its row says {row['width']}x{row['height']}")
        if labels.size and int(labels.max()) >= len(ctx.names):
            return _error(row, f"mask has class id {int(labels.max())}, the model has {len(ctx.names)} classes")
        return Item(row, labels, image)

    items, errors = [], []
    for got in storage.read_concurrently(read, rows):
        (items if isinstance(got, Item) else errors).append(got)
    data = module.shard(items, ctx)
    name = shard_name(ctx.format, index, count)
    storage.write_bytes(storage.join(ctx.to, name), data, opts)
    return {"file": name, "rows": len(items), "bytes": len(data), "errors": errors}


def _error(row: dict[str, Any], error: str) -> dict[str, str]:
    return {"image_uri": row["image_uri"], "mask_uri": row["mask_uri"], "error": error}


def run_shards(ctx: Context, shards: Iterable[list[dict[str, Any]]], count: int, workers: int,
               log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Each shard's result, in order. `shards` gives the `count` shards' rows in
    turn, a shard's when it starts, so only the shards in flight hold theirs."""
    ray = sys.modules.get("ray")  # not imported: not initialised either (the caller joins a cluster)
    if ray is None or not ray.is_initialized():
        for i, rows in enumerate(shards):
            yield export_shard(ctx, i, count, rows)
            log(f"shard {i + 1}/{count} written")
        return
    env = {k: os.environ[k] for k in (storage.RETRY_SECONDS_ENV,) if k in os.environ}
    remote = ray.remote(export_shard).options(num_cpus=1, **({"runtime_env": {"env_vars": env}} if env else {}))
    todo = enumerate(shards)
    pending = deque(remote.remote(ctx, j, count, rows) for j, rows in itertools.islice(todo, workers))
    i = 0
    while pending:
        result = ray.get(pending.popleft())
        pending.extend(remote.remote(ctx, j, count, rows) for j, rows in itertools.islice(todo, 1))
        i += 1
        log(f"shard {i}/{count} written")
        yield result
