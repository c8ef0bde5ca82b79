"""Which images an export holds, in which order: the latest `ok` row of each
image under the segment job's output (only the columns the export needs),
then the filters of the export's config.

    model        one model's masks (the only one there, or `model_id`)
    classes      images whose mask holds at least one of these class names
    confidence   `min_confidence` <= ORDER_COLUMN <= `max_confidence`
    review_first the N least confident images, least confident first (a
                 bounded selection over the column, not a sort of all rows)
    limit        the first N of what is left, in export order

The labels are read as a stream (parts.iter_latest: bounded batches of every
image's latest ok row, only the columns needed here) and each batch filtered as
it comes; what is kept goes to a local spill file, one per model, so memory
holds a batch (BATCH_ROWS rows), not the row count. `review_first` keeps a
running top-k over the batches instead (k = N: memory holds N rows). The
stream is read to its end before anything is written: the counts, the model
check and the class names need all of it. Shards then read the spill a shard
at a time (`Selection.shards`).

Export order: with `review_first`, least confident first (ties by image URI);
otherwise the stream's order, which is the same for the same labels (images
by a hash of their URI, then by URI) but not sorted by URI: a sort would hold
every row.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deconvnet import storage
from deconvnet.data.voc import VOC_CLASSES, voc_palette
from deconvnet.records import read_json
from deconvnet.weights import read_model_info

from .. import layout
from .. import rows as row_schema
from ..predictions.parts import iter_latest, iter_rows, read_columns, with_visible_parts

# The per-image figure `review_first` and the confidence filters go by, and the
# Label Studio score: lower = look at it first. One name, so another column can take its place.
ORDER_COLUMN = "mean_confidence"
COLUMNS = ["image_uri", "mask_uri", "status", "width", "height", "classes", ORDER_COLUMN, "model_id", "run_id"]
ROW_FIELDS = ("image_uri", "mask_uri", "width", "height", "classes", ORDER_COLUMN)  # what a shard gets of a row
BATCH_ROWS = 20_000  # rows of the labels' stream held at once (about 1 KB each at the peak)
_KEPT = [*ROW_FIELDS, "run_id"]  # what the spill and the review queue keep of a row
_ORDER = [(ORDER_COLUMN, "ascending"), ("image_uri", "ascending")]  # the review queue's order


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
    model_id: str
    names: tuple[str, ...]  # class names by id
    palette: np.ndarray  # (256, 3) uint8, the model's colours
    names_from: str  # where the names came from: the model directory, or VOC's as a fallback
    run_ids: list[str]  # the labelling runs whose masks are exported
    labelled: int  # images with a mask by this model (before the other filters)
    selected: int  # images to export
    _source: Any = field(repr=False, default=None)  # a pa.Table (the review queue) or the spill file's path

    def batches(self) -> Iterator[pa.Table]:
        """The selected rows (ROW_FIELDS) in export order, a batch at a time."""
        if isinstance(self._source, pa.Table):
            yield self._source.select(list(ROW_FIELDS))
        elif self._source is not None:
            with pa.OSFile(self._source) as f:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    yield pa.Table.from_batches([reader.get_batch(i)]).select(list(ROW_FIELDS))

    def shards(self, size: int) -> Iterator[list[dict[str, Any]]]:
        """The selected rows as dicts, `size` at a time: a shard's rows are made when it is asked for."""
        rows: list[dict[str, Any]] = []
        for batch in self.batches():
            for row in iter_rows(batch):
                rows.append(row)
                if len(rows) == size:
                    yield rows
                    rows = []
        if rows:
            yield rows


@dataclass
class _Model:
    """What the stream left of one model's rows."""

    labelled: int = 0
    newest_run: str = ""
    kept: int = 0
    run_ids: set[str] = field(default_factory=set)
    queue: pa.Table | None = None  # review_first: the running top-k
    spill: str | None = None  # otherwise: the local file of the rows kept, and its writer
    writer: pa.ipc.RecordBatchFileWriter | None = None


def recorded_model(labels: str, run_id: str, model_id: str, storage_options=None):
    """The ModelInfo of the model a run used, from the model directory its record
    names; None when the record or the directory is gone, or holds another model by now."""
    try:
        record = read_json(layout.run_record_uri(labels, run_id), storage_options)
        info = read_model_info(record["config"]["model"], storage_options)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if info.model_id == model_id else None


@contextlib.contextmanager
def select(labels: str, filters: Filters, storage_options=None,
           batch_rows: int = BATCH_ROWS) -> Iterator[Selection]:
    """The rows to export (valid inside the `with`: the spill is removed after).
    ValueError when there is nothing labelled under `labels`, when masks of
    several models are there and `model_id` names none of them, or when a class
    in `classes` is not one of the model's."""
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        models: dict[str, _Model] = {}
        try:
            _stream(labels, filters, storage_options, batch_rows, tmp, models)
        finally:
            for m in models.values():
                if m.writer is not None:
                    m.writer.close()
        yield _chosen(labels, filters, models, storage_options)


def _stream(labels: str, f: Filters, storage_options, batch_rows: int, tmp: str, models: dict[str, _Model]) -> None:
    """Each batch of the latest ok rows, filtered as it comes, into `models`."""
    caps = [x for x in (f.review_first, f.limit) if x is not None]
    cap = min(caps) if caps else None  # rows a model keeps at most
    schema = row_schema.columns(_KEPT)
    for batch in iter_latest(labels, COLUMNS, storage_options, batch_rows,
                             where=lambda t: pc.equal(t["status"], "ok")):
        found = batch["model_id"].unique().to_pylist()
        for model_id in found:
            rows = batch.filter(pc.equal(batch["model_id"], model_id)) if len(found) > 1 else batch
            m = models.setdefault(model_id, _Model())
            m.labelled += rows.num_rows
            m.newest_run = max(m.newest_run, pc.max(rows["run_id"]).as_py())
            if f.model_id not in (None, model_id):  # counted for the error message, not kept
                continue
            rows = _filtered(rows, f).select(_KEPT)
            if f.review_first is not None:
                both = rows if m.queue is None else pa.concat_tables([m.queue, rows])
                m.queue = both.take(pc.select_k_unstable(both, k=cap, sort_keys=_ORDER)) if len(both) > cap else both
            elif rows.num_rows and (cap is None or m.kept < cap):
                rows = rows if cap is None else rows.slice(0, cap - m.kept)
                if m.writer is None:
                    m.spill = os.path.join(tmp, f"{len(os.listdir(tmp))}.arrow")
                    m.writer = pa.ipc.new_file(m.spill, schema)
                m.writer.write_table(rows.cast(schema))
                m.kept += rows.num_rows
                m.run_ids.update(rows["run_id"].unique().to_pylist())


def _chosen(labels: str, f: Filters, models: dict[str, _Model], storage_options) -> Selection:
    if not models:
        raise ValueError(f"`labels`: no labelled images in {layout.predictions_uri(labels)} "
                         f"(expected the segment job's output prefix)")
    if f.model_id is None and len(models) > 1:
        found = ", ".join(f"{k} ({m.labelled} images)" for k, m in sorted(models.items()))
        raise ValueError(f"`labels` holds masks of {len(models)} models: {found}; choose one with `model_id`")
    if f.model_id is not None and f.model_id not in models:
        raise ValueError(f"`model_id` {f.model_id}: no masks by that model under {labels} "
                         f"(the latest mask of every image is by {', '.join(sorted(models))})")
    model_id = f.model_id or next(iter(models))
    m = models[model_id]
    names, palette, names_from = _classes(labels, model_id, m.newest_run, storage_options)
    unknown = [c for c in f.classes if c not in names]
    if unknown:
        raise ValueError(f"`classes`: not classes of model {model_id}: {', '.join(unknown)} "
                         f"(its classes: {', '.join(names)})")
    if f.review_first is not None:
        source = m.queue.take(pc.sort_indices(m.queue, _ORDER))  # the N picked, least confident first
        run_ids, selected = source["run_id"].unique().to_pylist(), source.num_rows
    else:
        source = m.spill
        run_ids, selected = m.run_ids, m.kept
    return Selection(model_id=model_id, names=names, palette=palette, names_from=names_from,
                     run_ids=sorted(run_ids), labelled=m.labelled, selected=selected, _source=source)


def _classes(labels: str, model_id: str, newest_run: str, storage_options=None):
    """The model's class names and palette from its directory (via the newest run's
    record), else VOC's names and palette for as many classes as its rows count
    pixels of (the first row by the model found): the segment job's masks use the model's palette."""
    info = recorded_model(labels, newest_run, model_id, storage_options)
    if info is not None:
        return tuple(info.classes), info.palette_array(), "model"
    n = with_visible_parts(labels, lambda p: _class_count(p.all, model_id, storage_options), storage_options)
    names = VOC_CLASSES[:n] + tuple(f"class_{k}" for k in range(len(VOC_CLASSES), n))
    return names, voc_palette(256), "voc"


def _class_count(parts: list[str], model_id: str, storage_options) -> int:
    """len(class_pixels) of the first row by the model, a part's row group at a time."""
    schema = row_schema.columns(["model_id", "class_pixels"])
    for uri in parts:
        with storage.open_input(uri, storage_options) as f:
            part = pq.ParquetFile(f)
            for group in range(part.num_row_groups):
                t = read_columns(part, schema, group)
                t = t.filter(pc.equal(t["model_id"], model_id))
                if t.num_rows:
                    return len(t["class_pixels"][0].as_py())
    raise FileNotFoundError(f"`labels`: no rows by model {model_id} (removed while the export read them?)")


def _filtered(table: pa.Table, f: Filters) -> pa.Table:
    """The rows `classes` and the confidence bounds keep, in their order."""
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
    return table
