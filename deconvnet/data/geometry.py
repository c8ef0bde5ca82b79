"""Box and ground-truth geometry shared by proposals, the segmenter and training.

Boxes are (K, 4) xyxy arrays in pixels, [x1, x2) x [y1, y2). `integer_boxes`
is the one rounding rule: the segmenter crops and pastes back with it and
training crops with it, so a training crop is exactly the view inference gives
the network. Ground-truth objects (`Instance`) come from VOC's instance maps or,
where there are none, from the 4-connected components of each class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .voc import IGNORE_INDEX


def integer_boxes(boxes: np.ndarray) -> np.ndarray:
    """(K, 4) float xyxy -> (K, 4) int64 pixel boxes [x1, x2) x [y1, y2), each at
    least one pixel wide. Crop and paste-back both use these, so they agree."""
    b = np.round(np.asarray(boxes, dtype=np.float64)).astype(np.int64).reshape(-1, 4)
    b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
    b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
    return b


def enlarge_boxes(boxes: np.ndarray, factor: float) -> np.ndarray:
    """Scale (K, 4) xyxy boxes by `factor` around their centres."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (K, 2)
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)  # (K, 2)
    return np.concatenate([centres - half, centres + half], axis=1)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of an (H, W) bool mask.

    Returns (labels, n): labels (H, W) int32, 0 outside the mask and 1..n
    inside, numbered in raster order of each component's first pixel.
    Vectorised union-find: every round hooks the larger root of each edge
    whose ends disagree onto the smaller one, then compresses every pointer
    to its root; roots only decrease, so it ends in a few rounds.
    """
    assert mask.ndim == 2, f"mask must be (H, W), got shape {mask.shape}"
    mask = mask.astype(bool)
    h, w = mask.shape
    flat = np.arange(h * w).reshape(h, w)
    right = mask[:, :-1] & mask[:, 1:]  # (H, W-1): pixel and its right neighbour both inside
    down = mask[:-1, :] & mask[1:, :]  # (H-1, W)
    a = np.concatenate([flat[:, :-1][right], flat[:-1, :][down]])  # (E,) edge ends
    b = np.concatenate([flat[:, 1:][right], flat[1:, :][down]])
    parent = np.arange(h * w)  # parent[x] <= x always, so there are no cycles
    while True:
        ra, rb = parent[a], parent[b]  # roots: parent is fully compressed here
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    labels = np.zeros((h, w), dtype=np.int32)
    roots, inverse = np.unique(parent.reshape(h, w)[mask], return_inverse=True)
    labels[mask] = inverse.reshape(-1) + 1
    return labels, len(roots)


@dataclass(frozen=True)
class Instance:
    mask: np.ndarray  # (H, W) bool
    class_id: int
    box: np.ndarray  # (4,) float64 tight xyxy, [x1, x2) x [y1, y2)


def _instance(mask: np.ndarray, class_id: int) -> Instance:
    ys, xs = np.nonzero(mask)
    return Instance(mask, int(class_id), np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64))


def find_instances(classes: np.ndarray, objects: np.ndarray | None = None,
                   min_side: int = 1) -> list[Instance]:
    """The ground-truth objects of one image.

    From the instance map when there is one (an object's class is the most
    common class id under it), else from the connected components of each
    class. Objects with a box side under `min_side` are left out.
    """
    found = []
    if objects is not None:
        for k in np.unique(objects):
            if k in (0, IGNORE_INDEX):
                continue
            mask = objects == k
            under = classes[mask]
            under = under[(under != 0) & (under != IGNORE_INDEX)]
            if under.size:
                found.append(_instance(mask, np.bincount(under).argmax()))
    else:
        for c in np.unique(classes):
            if c in (0, IGNORE_INDEX):
                continue
            components, n = connected_components(classes == c)
            found.extend(_instance(components == k, c) for k in range(1, n + 1))
    return [o for o in found if min(o.box[2] - o.box[0], o.box[3] - o.box[1]) >= min_side]


def object_labels(classes: np.ndarray, instance: Instance) -> np.ndarray:
    """Stage-1 labels: `instance` keeps its class, everything else is background
    (0), and the ignore band (255) stays ignored. (H, W) uint8."""
    out = np.zeros_like(classes)
    out[classes == IGNORE_INDEX] = IGNORE_INDEX
    out[instance.mask] = instance.class_id
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) and (M, 4) xyxy boxes: (N, M); 0 where a union is empty."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)  # (N, M)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def matching_proposals(proposals: np.ndarray, object_boxes: np.ndarray, threshold: float) -> np.ndarray:
    """(K,) bool: proposals whose IoU with some object box is >= threshold."""
    if len(proposals) == 0 or len(object_boxes) == 0:
        return np.zeros(len(proposals), dtype=bool)
    return box_iou(proposals, object_boxes).max(axis=1) >= threshold
