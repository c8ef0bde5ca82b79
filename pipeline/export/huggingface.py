"""Hugging Face datasets: Parquet shards whose `image` and `label` columns are
`{bytes, path}` structs and whose schema carries the `huggingface` features
metadata, so `datasets.load_dataset("parquet", ...)` (or `load_dataset(<to>)`:
the shards are the train split by their names) gives `Image` features; and
id2label.json, {"<class id>": name}.

    image            the image file as stored, path: its key below the input
    label            the mask, a palette PNG of class ids (in the model's colours)
    image_uri        where the image is
    <ORDER_COLUMN>   the per-image confidence (selection.ORDER_COLUMN)
    classes          class names present in the mask
"""

from __future__ import annotations

import io
import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from deconvnet.data.voc import encode_label_png

from .selection import ORDER_COLUMN

SHARD_PATTERN = "data/train-{index:05d}-of-{count:05d}.parquet"
NEEDS_IMAGE = True
ID2LABEL = "id2label.json"

_FILE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FEATURES = {"image": {"_type": "Image"}, "label": {"_type": "Image"},
            "image_uri": {"dtype": "string", "_type": "Value"},
            ORDER_COLUMN: {"dtype": "float32", "_type": "Value"},
            "classes": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"}}
SCHEMA = pa.schema([("image", _FILE), ("label", _FILE), ("image_uri", pa.string()), (ORDER_COLUMN, pa.float32()),
                    ("classes", pa.list_(pa.string()))],
                   metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})


def shard(items, ctx) -> bytes:
    keys = [ctx.key(it.row["mask_uri"]) for it in items]
    table = pa.table({
        "image": [{"bytes": it.image, "path": k + posixpath.splitext(it.row["image_uri"])[1]}
                  for k, it in zip(keys, items)],
        "label": [{"bytes": encode_label_png(it.labels, ctx.palette), "path": f"{k}.png"}
                  for k, it in zip(keys, items)],
        "image_uri": [it.row["image_uri"] for it in items],
        ORDER_COLUMN: [it.row[ORDER_COLUMN] for it in items],
        "classes": [it.row["classes"] for it in items],
    }, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def extra_files(ctx) -> dict[str, bytes]:
    return {ID2LABEL: json.dumps({str(k): name for k, name in enumerate(ctx.names)}, indent=1).encode()}
