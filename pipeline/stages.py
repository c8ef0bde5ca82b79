"""The segment job's stages, each a function (or, for the model, a callable class)
over a Ray Data batch: a dict of column name -> numpy array.

    read_and_propose  (CPU tasks)   read bytes, decode, propose boxes
    SegmentActor      (GPU actors)  crop + forward + paste + merge, on the actor
                                    (+ the dense CRF on its device: `crf_device` "gpu")
    refine            (CPU tasks)   dense CRF -> label map, confidence and uncertainty
    write             (CPU tasks)   PNG mask (+ overlay), per-class counts -> the Parquet row

Rows never disappear: a file that cannot be read or decoded becomes a row with
status "error" and a message, and flows through every stage untouched.
Resources (GPUs, pool sizes, batch sizes) are set in one place, pipeline/job.py.
A row's decoded image travels past the model only while the CRF needs it or the
row's "overlay" flag (set by the listing) asks for an overlay.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from deconvnet import storage
from deconvnet.inference.crf import CRFConfig, label_map
from deconvnet.data.imageio import MAX_BYTES, BadImage, decode_image, encode_jpeg
from deconvnet.inference.proposals import ProposalConfig, propose
from deconvnet.inference.segmenter import Segmenter, SegmenterConfig
from deconvnet.data.voc import encode_label_png, overlay

from .layout import mask_uri, overlay_uri
from .rows import STAGE_COLUMNS, table_from_batch

Batch = dict[str, np.ndarray]

EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)
EMPTY_BOXES = np.zeros((0, 4), np.float32)
EMPTY_LABELS = np.zeros((0, 0), np.uint8)


def ragged(items: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of different shapes (Ray stores it as a variable-shaped tensor)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _writable(batch: Batch) -> Batch:
    """Ray hands batches over zero-copy (read-only); copy the small columns a stage updates."""
    for k in ("status", "error", "permanent", "seconds"):
        batch[k] = np.array(batch[k], copy=True)
    return batch


def _error(batch: Batch, i: int, message: str, permanent: bool) -> None:
    batch["status"][i], batch["error"][i], batch["permanent"][i] = "error", message, permanent


def read_and_propose(batch: Batch, proposals: ProposalConfig, storage_options: dict) -> Batch:
    """Read and decode each image and propose its boxes."""
    n = len(batch["image_uri"])
    batch["status"] = np.array(["ok"] * n, dtype=object)
    batch["error"] = np.array([""] * n, dtype=object)
    batch["permanent"] = np.zeros(n, bool)
    images, boxes = [EMPTY_IMAGE] * n, [EMPTY_BOXES] * n
    seconds = np.zeros(n)
    for i, uri in enumerate(batch["image_uri"]):
        t0 = time.perf_counter()
        if batch["source_size"][i] > MAX_BYTES:
            _error(batch, i, f"file is {batch['source_size'][i]:,} bytes, over the limit of {MAX_BYTES:,}", True)
            continue
        try:
            images[i] = decode_image(storage.read_bytes(uri, storage_options))
            boxes[i] = propose(images[i], proposals, storage_options)
        except BadImage as e:
            _error(batch, i, str(e), True)
        except (FileNotFoundError, PermissionError) as e:  # gone or forbidden since listing: retry next run
            _error(batch, i, f"cannot read: {type(e).__name__}: {e}", False)
        seconds[i] = time.perf_counter() - t0
    batch["image"], batch["boxes"] = ragged(images), ragged(boxes)
    batch["height"] = np.array([im.shape[0] for im in images], np.int32)
    batch["width"] = np.array([im.shape[1] for im in images], np.int32)
    batch["num_proposals"] = np.array([len(b) for b in boxes], np.int32)
    batch["seconds"] = seconds
    return batch


class SegmentActor:
    """The GPU stage: loads the model once per actor, then turns batches of
    images with their boxes into merged maps. All proposals of an image stay
    here; what leaves is one map per image (probabilities for the CRF workers
    when `with_crf`, or the label map itself: the argmax, or with `crf` the
    dense CRF's, run here by the torch engine on the model's device)."""

    def __init__(self, model: str, fcn_model: str | None, config: SegmenterConfig,
                 with_crf: bool, cpu_threads: int | None, pool_size: int, storage_options: dict,
                 crf: CRFConfig | None = None):
        if not torch.cuda.is_available():  # None: this actor's share of the node's cores
            torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // pool_size))
        self.segmenter = Segmenter.from_model_dir(model, config, fcn_uri=fcn_model,
                                                  storage_options=storage_options)
        self.with_crf, self.crf = with_crf, crf

    def _maps(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray | Exception]:
        try:
            return self.segmenter.probabilities(images, boxes)
        except (RuntimeError, ValueError) as batch_error:  # e.g. out of memory: isolate the culprit
            if len(images) == 1:
                return [batch_error]
            return [self._maps([im], [b])[0] for im, b in zip(images, boxes)]

    def __call__(self, batch: Batch) -> Batch:
        batch, n = _writable(batch), len(batch["image_uri"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        t0 = time.perf_counter()
        maps = self._maps([batch["image"][i] for i in ok], [batch["boxes"][i] for i in ok])
        elapsed = time.perf_counter() - t0
        total = max(1, sum(len(batch["boxes"][i]) for i in ok))
        probs, labels = [np.zeros((0, 0, 0), np.float16)] * n, [EMPTY_LABELS] * n
        confidence, uncertainty = np.zeros(n, np.float32), np.zeros(n, np.float32)
        for i, m in zip(ok, maps):
            batch["seconds"][i] += elapsed * len(batch["boxes"][i]) / total
            if isinstance(m, Exception):
                _error(batch, i, f"segmentation failed: {type(m).__name__}: {m}", False)
            elif self.with_crf:
                probs[i] = m.astype(np.float16)  # half the bytes to the CRF workers
            else:  # the CRF (if any) here: one image at a time, as their sizes differ
                t1 = time.perf_counter()
                labels[i], confidence[i], uncertainty[i] = label_map(
                    batch["image"][i], m, self.crf, engine="torch", device=self.segmenter.device)
                batch["seconds"][i] += time.perf_counter() - t1
        del batch["boxes"]
        if self.with_crf:
            batch["probs"] = ragged(probs)
        else:
            batch["labels"], batch["mean_confidence"] = ragged(labels), confidence
            batch["uncertainty"] = uncertainty
            batch["image"] = _images_for_overlays(batch)
        return batch


def refine(batch: Batch, crf: CRFConfig) -> Batch:
    """Dense CRF on each merged map -> label map, mean confidence and uncertainty."""
    batch, n = _writable(batch), len(batch["image_uri"])
    labels, confidence, uncertainty = [EMPTY_LABELS] * n, np.zeros(n, np.float32), np.zeros(n, np.float32)
    for i in range(n):
        if batch["status"][i] != "ok":
            continue
        t0 = time.perf_counter()
        labels[i], confidence[i], uncertainty[i] = label_map(batch["image"][i], batch["probs"][i].astype(np.float32),
                                                             crf)
        batch["seconds"][i] += time.perf_counter() - t0
    del batch["probs"]
    batch["labels"], batch["mean_confidence"], batch["uncertainty"] = ragged(labels), confidence, uncertainty
    batch["image"] = _images_for_overlays(batch)
    return batch


def _images_for_overlays(batch: Batch) -> np.ndarray:
    """The image column with only the images that an overlay still needs."""
    return ragged([im if flag else EMPTY_IMAGE for im, flag in zip(batch["image"], batch["overlay"])])


def write(batch: Batch, output: str, classes: Sequence[str], palette: np.ndarray,
          model_id: str, labelling_key: str, run_id: str, storage_options: dict) -> pa.Table:
    """Write masks (and the overlays rows ask for) and turn each row into its
    Parquet record (rows.SCHEMA): the driver only writes them into parts."""
    batch, n, c = _writable(batch), len(batch["image_uri"]), len(classes)
    masks, overlay_uris = [""] * n, [""] * n
    class_pixels = np.zeros((n, c), np.int64)
    for i in range(n):
        t0 = time.perf_counter()
        if batch["status"][i] == "ok":
            lab = batch["labels"][i]
            masks[i] = mask_uri(output, batch["rel"][i])
            storage.write_bytes(masks[i], encode_label_png(lab, palette), storage_options)
            if batch["overlay"][i]:
                overlay_uris[i] = overlay_uri(output, batch["rel"][i])
                storage.write_bytes(overlay_uris[i], encode_jpeg(overlay(batch["image"][i], lab, palette=palette)),
                                    storage_options)
            class_pixels[i] = np.bincount(lab.ravel(), minlength=c)[:c]
        batch["seconds"][i] += time.perf_counter() - t0
    made = {"mask_uri": np.array(masks, dtype=object), "overlay_uri": np.array(overlay_uris, dtype=object),
            "class_pixels": class_pixels, "model_id": np.array([model_id] * n, dtype=object),
            "labelling_key": np.array([labelling_key] * n, dtype=object),
            "run_id": np.array([run_id] * n, dtype=object)}
    return table_from_batch({k: made[k] if k in made else batch[k] for k in STAGE_COLUMNS}, classes)
