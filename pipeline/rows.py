"""The prediction row: one per input image per run, the unit of predictions/.

Defined once here and used by every place that makes or reads rows: the write
stage (STAGE_COLUMNS: what it fills; `table_from_batch` makes the rows it hands
back to the driver), the Parquet writer and compaction (SCHEMA), the done-set
(DONE_COLUMNS), the gallery and evaluation (`columns(...)` checks their names).
Adding a column is one line in SCHEMA plus the stage that fills it; parts
written before it read it as nulls (`conform`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("mask_uri", pa.string()),
    ("overlay_uri", pa.string()),
    ("status", pa.string()),  # "ok" or "error"
    ("error", pa.string()),  # what was wrong, "" when ok
    ("permanent", pa.bool_()),  # the file itself is bad: retrying the same bytes cannot help
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("classes", pa.list_(pa.string())),  # class names present in the mask
    ("class_pixels", pa.list_(pa.int64())),  # pixels per class id, all classes
    ("mean_confidence", pa.float32()),
    ("uncertainty", pa.float32()),  # share of pixels whose label's probability < crf.UNCERTAIN_BELOW; null in old parts
    ("num_proposals", pa.int32()),
    ("source_size", pa.int64()),
    ("source_version", pa.string()),  # ETag or mtime: a changed file is labelled again
    ("model_id", pa.string()),
    ("labelling_key", pa.string()),  # the settings' id (labelling_key); null in rows written before it
    ("run_id", pa.string()),
    ("seconds", pa.float64()),  # this image's share of the work, all stages
])

# Derived from the others by `table_from_batch` (class_pixels and the model's class names).
DERIVED = ("classes",)
# What the write stage fills for each row: every column but the derived ones.
STAGE_COLUMNS = tuple(n for n in SCHEMA.names if n not in DERIVED)
# What the incremental skip needs of earlier rows.
DONE_COLUMNS = ("image_uri", "status", "permanent", "model_id", "labelling_key", "source_size", "source_version",
                "run_id")


def columns(names: Iterable[str] | None = None) -> pa.Schema:
    """The schema of these columns (all when None); an unknown name is a ValueError."""
    if names is None:
        return SCHEMA
    names = list(names)
    unknown = [n for n in names if n not in SCHEMA.names]
    if unknown:
        raise ValueError(f"not prediction columns: {', '.join(unknown)} (columns: {', '.join(SCHEMA.names)})")
    return pa.schema([SCHEMA.field(n) for n in names])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table read from a part as `schema`: each column cast to its type, and a
    column the part was written without (an older part) all nulls."""
    return pa.table([table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                     for f in schema], schema=schema)


def table_from_batch(batch: dict[str, np.ndarray], classes: Sequence[str]) -> pa.Table:
    """The rows of a batch that the write stage returned, as a table with SCHEMA:
    each column cast to its type, and `classes` named from `class_pixels`."""
    pixels = np.asarray(np.stack(batch["class_pixels"]) if len(batch["class_pixels"]) else
                        np.zeros((0, len(classes))), np.int64)  # (n, C)
    n, c = pixels.shape
    out = {}
    for f in SCHEMA:
        if f.name == "class_pixels":
            out[f.name] = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c + 1, c, dtype=np.int32)),
                                                   pa.array(pixels.ravel()))
        elif f.name == "classes":
            out[f.name] = pa.array([[classes[k] for k in np.flatnonzero(p)] for p in pixels], f.type)
        else:
            out[f.name] = pa.array(np.asarray(batch[f.name]).tolist(), f.type)
    return pa.table(out, schema=SCHEMA)
