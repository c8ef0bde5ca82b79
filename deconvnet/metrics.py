"""Segmentation metrics from a confusion matrix, as PASCAL VOC scores them.

`ConfusionMatrix` accumulates (ground truth, prediction) pixel counts over any
number of label maps; rows are ground truth, columns prediction. Pixels whose
ground truth is the ignore label (255, VOC's object borders) or outside
[0, C) are not counted. Per-class IoU = TP / (TP + FP + FN); the VOC score is
the mean over classes. Accumulators from several processes (DDP workers) add
up through an all-reduce of `.matrix` and `from_matrix`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data.voc import IGNORE_INDEX, VOC_CLASSES


def _as_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array, a (CPU or GPU) torch tensor or a list."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (no warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


class ConfusionMatrix:
    """A (C, C) int64 pixel count matrix: rows ground truth, columns prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        assert num_classes >= 1, f"num_classes must be >= 1, got {num_classes}"
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)  # (C, C)

    @classmethod
    def from_matrix(cls, matrix: Any, ignore_index: int = IGNORE_INDEX) -> ConfusionMatrix:
        """Wrap counts gathered elsewhere (e.g. an all-reduced `.matrix`)."""
        m = _as_numpy(matrix)
        assert m.ndim == 2 and m.shape[0] == m.shape[1], f"matrix must be (C, C), got {m.shape}"
        cm = cls(m.shape[0], ignore_index)
        cm.matrix = m.astype(np.int64)
        return cm

    def update(self, pred: Any, target: Any) -> ConfusionMatrix:
        """Count one batch: integer class ids of any (equal) shape, numpy or torch."""
        p = _as_numpy(pred).reshape(-1)  # (P,)
        t = _as_numpy(target).reshape(-1)  # (P,)
        if p.shape != t.shape:
            raise ValueError(f"pred has {p.size} pixels but target has {t.size}")
        if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
            raise ValueError(f"pred and target must be integer class ids, got {p.dtype} and {t.dtype}")
        c = self.num_classes
        keep = (t >= 0) & (t < c) & (t != self.ignore_index)  # (P,)
        p = p[keep].astype(np.int64)
        t = t[keep].astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= c):
            raise ValueError(f"predictions must lie in [0, {c}), got [{p.min()}, {p.max()}]")
        self.matrix += np.bincount(c * t + p, minlength=c * c).reshape(c, c)
        return self

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.matrix.sum())}, "
                f"mean_iou={self.mean_iou():.4f})")

    # Scores. A class absent from both ground truth and prediction has no IoU
    # (NaN) and does not count towards the mean, as in the VOC devkit.

    def iou(self) -> np.ndarray:
        """Per-class intersection over union, (C,) float; NaN where undefined."""
        tp = np.diag(self.matrix).astype(np.float64)  # (C,)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp  # (C,) = TP + FP + FN
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def accuracy(self) -> np.ndarray:
        """Per-class recall TP / (TP + FN), (C,) float; NaN for classes not in the ground truth."""
        tp = np.diag(self.matrix).astype(np.float64)  # (C,)
        gt = self.matrix.sum(1)  # (C,)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gt > 0, tp / gt, np.nan)

    def mean_iou(self) -> float:
        return _nanmean(self.iou())

    def mean_accuracy(self) -> float:
        return _nanmean(self.accuracy())

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else math.nan

    # Reports.

    def class_names(self, class_names: Sequence[str] | None = None) -> list[str]:
        """The given names (checked against C), or VOC's first C names, or the ids."""
        if class_names is None:
            if self.num_classes <= len(VOC_CLASSES):
                return list(VOC_CLASSES[: self.num_classes])
            return [str(k) for k in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        return list(class_names)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Flat scores for logging (e.g. Ray Train's `report`): means, then `iou/<name>`."""
        out = {"mean_iou": self.mean_iou(), "mean_accuracy": self.mean_accuracy(),
               "pixel_accuracy": self.pixel_accuracy()}
        out.update({f"iou/{n}": float(v) for n, v in zip(self.class_names(class_names), self.iou())})
        return out

    def _table_cells(self, class_names: Sequence[str] | None) -> tuple[list[str], list[str]]:
        """Header and values of the DeconvNet paper's Table 1: classes, then mean; IoU in %."""
        header = self.class_names(class_names) + ["mean"]
        values = [*self.iou(), self.mean_iou()]
        return header, ["-" if math.isnan(v) else f"{100 * v:.1f}" for v in values]

    def table(self, class_names: Sequence[str] | None = None, name: str = "IoU") -> str:
        """Plain-text per-class IoU table (%), class names as columns and the mean last.

        `name` labels the row, as the method names do in the paper's Table 1.
        """
        header, values = self._table_cells(class_names)
        widths = [max(len(h), len(v)) for h, v in zip(header, values)]
        first = len(name)
        head = " " * first + "".join(f" {h:>{w}}" for h, w in zip(header, widths))
        row = name + "".join(f" {v:>{w}}" for v, w in zip(values, widths))
        return f"{head}\n{row}"

    def to_markdown(self, class_names: Sequence[str] | None = None, name: str = "IoU") -> str:
        """The same table as `table` in Markdown, for a README or a run report."""
        header, values = self._table_cells(class_names)
        lines = [["", *header], ["---"] + ["---:"] * len(header), [name, *values]]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)

    def to_csv_rows(self, class_names: Sequence[str] | None = None) -> list[list[str]]:
        """Rows `class,iou,accuracy,pixels` (fractions, empty when undefined; pixels
        of ground truth), then `mean` (mean IoU, mean accuracy) and `overall`
        (pixel accuracy), header first."""
        def num(v: float) -> str:
            return "" if math.isnan(v) else f"{v:.6f}"

        gt = self.matrix.sum(1)  # (C,)
        rows = [["class", "iou", "accuracy", "pixels"]]
        for n, i, a, g in zip(self.class_names(class_names), self.iou(), self.accuracy(), gt):
            rows.append([n, num(i), num(a), str(int(g))])
        total = str(int(gt.sum()))
        rows.append(["mean", num(self.mean_iou()), num(self.mean_accuracy()), total])
        rows.append(["overall", "", num(self.pixel_accuracy()), total])
        return rows

    def to_csv(self, class_names: Sequence[str] | None = None) -> str:
        """`to_csv_rows` as CSV text (write it with `storage.write_bytes`)."""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(self.to_csv_rows(class_names))
        return buf.getvalue()
