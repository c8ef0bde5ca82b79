"""CVAT's "Segmentation mask 1.1" (Datumaro's VOC segmentation): one zip per shard.

    labelmap.txt                      `name:r,g,b::`, line i (after the comment) is class i
    ImageSets/Segmentation/default.txt image ids, one a line
    SegmentationClass/<id>.png        the mask in the labelmap's colours

An image's id is its key below the segment job's masks/ without the
extension (the image's path below the input, so CVAT matches it to the task's
image of that name). Every shard is a complete zip: import each into the task.
The masks hold class ids below the class count only (shards.py checks), so VOC's
255, "undeclared" in this format, never occurs.
"""

from __future__ import annotations

import io
import zipfile

from deconvnet.data.voc import encode_label_png

SHARD_PATTERN = "masks-{index:05d}.zip"
NEEDS_IMAGE = False
LABELMAP = "labelmap.txt"
LIST = "ImageSets/Segmentation/default.txt"
MASK_DIR = "SegmentationClass"


def labelmap(names, palette) -> str:
    lines = [f"{name}:{r},{g},{b}::" for name, (r, g, b) in zip(names, palette.tolist())]
    return "# label:color_rgb:parts:actions\n" + "\n".join(lines) + "\n"


def shard(items, ctx) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(LABELMAP, labelmap(ctx.names, ctx.palette))
        ids = [ctx.key(it.row["mask_uri"]) for it in items]
        z.writestr(LIST, "".join(f"{i}\n" for i in ids))
        for i, it in zip(ids, items):  # PNGs are compressed already: stored as they are
            z.writestr(f"{MASK_DIR}/{i}.png", encode_label_png(it.labels, ctx.palette), zipfile.ZIP_STORED)
    return buf.getvalue()


def extra_files(ctx) -> dict[str, bytes]:
    return {}
