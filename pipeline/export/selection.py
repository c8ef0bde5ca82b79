"""Which images an export holds, in which order: the latest `ok` row of each
image under the segment job's output (only the columns the export needs),
then the filters of the export's config.

    model        one model's masks (the only one there, or `model_id`)
    classes      images whose mask holds at least one of these class names
    confidence   `min_confidence` <= ORDER_COLUMN <= `max_confidence`
    review_first the N least confident images, least confident first (a
                 bounded selection over the column, not a sort of all rows)
    limit        the first N of what is left, in export order

Export order is by image URI, or least confident first with `review_first`.
The selected rows are one Arrow table of a few columns, read and sorted whole
(about 1 KB an image at the peak, bench/export.py); masks are read later, a
shard at a time (shards.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deconvnet.data.voc import VOC_CLASSES, voc_palette
from deconvnet.records import read_json
from deconvnet.weights import read_model_info

from .. import layout
from ..predictions.parts import latest_rows, read_predictions

# The per-image figure `review_first` and the confidence filters go by, and the
# Label Studio score: lower = look at it first. One name, so another column can take its place.
ORDER_COLUMN = "mean_confidence"
COLUMNS = ["image_uri", "mask_uri", "status", "width", "height", "classes", ORDER_COLUMN, "model_id", "run_id"]
ROW_FIELDS = ("image_uri", "mask_uri", "width", "height", "classes", ORDER_COLUMN)  # what a shard gets of a row


@dataclass(frozen=True)
class Filters:
    model_id: str | None = None
    classes: tuple[str, ...] = ()
    min_confidence: float | None = None
    max_confidence: float | None = None
    review_first: int | None = None
    limit: int | None = None

    def __post_init__(self):
        for name in ("min_confidence", "max_confidence"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"`{name}` must be within [0, 1], got {value}")
        if None not in (self.min_confidence, self.max_confidence) and self.min_confidence > self.max_confidence:
            raise ValueError(f"`min_confidence` {self.min_confidence} is above `max_confidence` {self.max_confidence}")
        for name in ("review_first", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")


@dataclass
class Selection:
    rows: pa.Table  # the selected rows (ROW_FIELDS), in export order
    model_id: str
    names: tuple[str, ...]  # class names by id
    palette: np.ndarray  # (256, 3) uint8, the model's colours
    names_from: str  # where the names came from: the model directory, or VOC's as a fallback
    run_ids: list[str]  # the labelling runs whose masks are exported
    labelled: int  # images with a mask by this model (before the other filters)


def current_rows(labels: str, storage_options=None) -> pa.Table:
    """The latest row of each image, those with a mask only (an error row writes none)."""
    table = read_predictions(labels, COLUMNS, storage_options)
    return latest_rows(table.filter(pc.equal(table["status"], "ok")))


def recorded_model(labels: str, run_id: str, model_id: str, storage_options=None):
    """The ModelInfo of the model a run used, from the model directory its record
    names; None when the record or the directory is gone, or holds another model by now."""
    try:
        record = read_json(layout.run_record_uri(labels, run_id), storage_options)
        info = read_model_info(record["config"]["model"], storage_options)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if info.model_id == model_id else None


def select(labels: str, filters: Filters, storage_options=None) -> Selection:
    """The rows to export. ValueError when there is nothing labelled under
    `labels`, when masks of several models are there and `model_id` names none
    of them, or when a class in `classes` is not one of the model's."""
    table = current_rows(labels, storage_options)
    if table.num_rows == 0:
        raise ValueError(f"`labels`: no labelled images in {layout.predictions_uri(labels)} "
                         f"(expected the segment job's output prefix)")
    models = table["model_id"].unique().to_pylist()
    if filters.model_id is None and len(models) > 1:
        counts = pc.value_counts(table["model_id"]).to_pylist()
        found = ", ".join(f"{c['values']} ({c['counts']} images)" for c in sorted(counts, key=lambda c: c["values"]))
        raise ValueError(f"`labels` holds masks of {len(models)} models: {found}; choose one with `model_id`")
    model_id = filters.model_id or models[0]
    if model_id not in models:
        raise ValueError(f"`model_id` {model_id}: no masks by that model under {labels} "
                         f"(the latest mask of every image is by {', '.join(sorted(models))})")
    table = table.filter(pc.equal(table["model_id"], model_id))
    names, palette, names_from = _classes(labels, table, storage_options)
    unknown = [c for c in filters.classes if c not in names]
    if unknown:
        raise ValueError(f"`classes`: not classes of model {model_id}: {', '.join(unknown)} "
                         f"(its classes: {', '.join(names)})")
    labelled = table.num_rows
    table = _filtered(table, filters)
    return Selection(rows=table.select(list(ROW_FIELDS)), model_id=model_id, names=names, palette=palette,
                     names_from=names_from, run_ids=sorted(table["run_id"].unique().to_pylist()),
                     labelled=labelled)


def _classes(labels: str, table: pa.Table, storage_options=None) -> tuple[tuple[str, ...], np.ndarray, str]:
    """The model's class names and palette from its directory (via the newest run's
    record), else VOC's names and palette for as many classes as its rows count
    pixels of: the segment job's masks use the model's palette."""
    newest = table.take(pc.sort_indices(table, [("run_id", "descending")])[:1]).to_pylist()[0]
    info = recorded_model(labels, newest["run_id"], newest["model_id"], storage_options)
    if info is not None:
        return tuple(info.classes), info.palette_array(), "model"
    pixels = read_predictions(labels, ["model_id", "class_pixels"], storage_options)
    pixels = pixels.filter(pc.equal(pixels["model_id"], newest["model_id"]))["class_pixels"]
    n = len(pixels[0].as_py())
    names = VOC_CLASSES[:n] + tuple(f"class_{k}" for k in range(len(VOC_CLASSES), n))
    return names, voc_palette(256), "voc"


def _filtered(table: pa.Table, f: Filters) -> pa.Table:
    if f.classes:
        values = table["classes"].combine_chunks()
        hit = pc.is_in(pc.list_flatten(values), value_set=pa.array(list(f.classes)))
        rows = np.unique(pc.list_parent_indices(values).to_numpy()[hit.to_numpy(zero_copy_only=False)])
        table = table.take(pa.array(rows, pa.int64()))
    conf = table[ORDER_COLUMN]
    if f.min_confidence is not None:
        table = table.filter(pc.greater_equal(conf, f.min_confidence))
        conf = table[ORDER_COLUMN]
    if f.max_confidence is not None:
        table = table.filter(pc.less_equal(conf, f.max_confidence))
    if f.review_first is not None:
        keys = [(ORDER_COLUMN, "ascending"), ("image_uri", "ascending")]
        table = table.take(pc.select_k_unstable(table, k=min(f.review_first, table.num_rows), sort_keys=keys))
        table = table.take(pc.sort_indices(table, keys))  # the N picked, least confident first
    else:
        table = table.take(pc.sort_indices(table, [("image_uri", "ascending")]))
    if f.limit is not None:
        table = table.slice(0, f.limit)
    return table
