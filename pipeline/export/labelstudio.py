"""Label Studio: tasks JSON with brush predictions, one task per image.

Each task is `{"data": {"image": URL}, "predictions": [{"model_version",
"score", "result": [...]}]}` with one `brushlabels` result per class present
in the mask (background, class 0, left out: annotators paint objects), its
mask in Label Studio's RLE: the thi.ng `rle-pack` bitstream over the H x W x 4
RGBA buffer, every channel 255 inside the mask, which
`label_studio_sdk.converter.brush` encodes and decodes. The SDK's encoder
builds a Python string bit by bit; `encode_rle` below computes the same
stream with numpy, a run at a time. `score` is the image's confidence
(selection.ORDER_COLUMN), so the Data Manager can sort by it. `label_config.xml` beside the tasks is a
labelling config whose tag names match the results'.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape

import numpy as np

from .selection import ORDER_COLUMN

FROM_NAME, TO_NAME = "tag", "image"  # the BrushLabels and Image tags of label_config.xml
BACKGROUND = 0  # class id with no result: the unpainted rest of the image
SHARD_PATTERN = "tasks-{index:05d}.json"
EXTRA = "label_config.xml"
NEEDS_IMAGE = False

# rle-pack's header: value count (32 bits), word size - 1 (5 bits), the 4 run-length sizes - 1 (4 bits each).
WORD_BITS = 8
RLE_SIZES = (3, 4, 8, 16)  # bits of (run length - 1) for size index 0..3, as the SDK writes
_MAX_RUN = 2 ** RLE_SIZES[-1]


def encode_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> Label Studio's RLE of the RGBA buffer (H x W x 4 bytes,
    255 where the mask is set, else 0) as a list of byte values.

    Every run is written as a repeat (flag 1, size index, length - 1, value),
    runs longer than 2**16 values in pieces of 2**16, as the SDK does; the RGBA
    buffer has no run shorter than 4, so the SDK's single-value form never occurs."""
    flat = np.asarray(mask, dtype=bool).ravel()
    num = flat.size * 4
    header = [(num, 32), (WORD_BITS - 1, 5), *((s - 1, 4) for s in RLE_SIZES)]
    if flat.size:
        starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
        lengths = np.diff(np.append(starts, flat.size)).astype(np.int64) * 4  # values per run
        values = np.where(flat[starts], 255, 0).astype(np.int64)
        pieces = -(-lengths // _MAX_RUN)  # runs longer than the largest size, in pieces
        values = np.repeat(values, pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)  # index of each run's first piece
        piece = np.arange(values.size) - first
        run_len = np.repeat(lengths, pieces)
        lengths = np.minimum(run_len - piece * _MAX_RUN, _MAX_RUN)
    else:
        lengths = values = np.zeros(0, np.int64)
    sizes = np.asarray(RLE_SIZES)
    index = np.searchsorted(2 ** sizes, lengths)  # smallest size that holds length - 1
    width = sizes[index]
    # Each piece: 1 | index (2 bits) | length - 1 (width bits) | value (8 bits), most significant first.
    code = (((1 << 2 | index) << width | (lengths - 1)) << WORD_BITS) | values
    nbits = 3 + width + WORD_BITS
    head_code = np.array([v for v, _ in header], np.int64)
    head_bits = np.array([b for _, b in header], np.int64)
    code, nbits = np.concatenate((head_code, code)), np.concatenate((head_bits, nbits))
    top = int(nbits.max())
    shifts = nbits[:, None] - 1 - np.arange(top)[None, :]  # (pieces, top): bit j of each, MSB first
    bits = (code[:, None] >> np.maximum(shifts, 0)) & 1
    stream = bits[shifts >= 0].astype(np.uint8)  # row by row: the pieces in order
    pad = 8 - stream.size % 8  # zero bits to a whole byte, 8 when it is whole already: the SDK's bytes exactly
    return np.packbits(np.concatenate((stream, np.zeros(pad, np.uint8)))).tolist()


def task(image_url: str, labels: np.ndarray, names: Sequence[str], score: float, model_id: str) -> dict:
    """One task: the image and a prediction with a brush result per class present."""
    height, width = labels.shape
    result = []
    for k in np.unique(labels).tolist():
        if k == BACKGROUND:
            continue
        result.append({"id": f"{names[k]}-{k}", "from_name": FROM_NAME, "to_name": TO_NAME,
                       "type": "brushlabels", "original_width": width, "original_height": height,
                       "image_rotation": 0,
                       "value": {"format": "rle", "rle": encode_rle(labels == k), "brushlabels": [names[k]]}})
    return {"data": {"image": image_url},
            "predictions": [{"model_version": model_id, "score": score, "result": result}]}


def shard(items, ctx) -> bytes:
    """A JSON list of tasks (what Label Studio's import takes)."""
    tasks = [task(ctx.image_url(it.row["image_uri"]), it.labels, ctx.names, round(float(it.row[ORDER_COLUMN]), 6),
                  ctx.model_id) for it in items]
    return json.dumps(tasks, separators=(",", ":")).encode()


def extra_files(ctx) -> dict[str, bytes]:
    """label_config.xml: an Image tag and a BrushLabels tag with every class but background."""
    labels = "\n".join(
        f'    <Label value="{escape(name)}" background="#{r:02x}{g:02x}{b:02x}"/>'
        for k, (name, (r, g, b)) in enumerate(zip(ctx.names, ctx.palette.tolist())) if k != BACKGROUND)
    return {EXTRA: (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
                    f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n'
                    f'</View>\n').encode()}
