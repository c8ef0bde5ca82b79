"""Object proposals: the boxes DeconvNet segments one at a time (paper, section 4.1).

A generator takes an (H, W, 3) uint8 RGB image and returns candidate boxes,
best first, as an (K, 4) array of xyxy pixel coordinates inside the image.
`propose` turns a generator's output into what the network sees:

1. boxes snap to whole pixels (clipped to the image); duplicates go (`dedupe`),
   and so does the whole-image box when step 5 adds it back;
2. each is enlarged `enlarge` times around its centre, so it may now extend
   beyond the image (the crop pads it);
3. those with a side under `min_side` go, measured on the generator's box or,
   with `min_side_enlarged`, on the enlarged box rounded to whole pixels;
4. the first `max_proposals` that are left are kept;
5. with `whole_image`, the whole image is appended, unenlarged, so every
   pixel is covered.

So `propose` returns up to `max_proposals` (+ 1) boxes as float32. The same
image and config always give the same boxes. The release's rules (mode
"original" in `deconvnet.inference`; HyeonwooNoh/DeconvNet
inference/generate_EDeconvNet_CRF_results.m) are `min_side=112` on the
enlarged box, no whole-image box, no dedupe: its loop skips a cached,
already enlarged box whose shorter side is under 112 px and stops after 50
processed boxes. How much the release enlarged its EdgeBoxes boxes is not in
its code (the boxes are a downloaded cache); `enlarge` stays 1.2.

Generators (`PROPOSAL_METHODS`):
- `whole`: only the whole image (the segmenter then sees one 224x224 view).
- `grid`: multi-scale sliding windows; needs nothing beyond numpy.
- `selective-search`: OpenCV's selective search, fast mode.
- `edgeboxes`: OpenCV's EdgeBoxes on structured edges (the release used
  EdgeBoxes from pdollar/edges, cached; the release's README.md); needs
  the structured-edge model file (OpenCV's `model.yml.gz`) at `edge_model`.
The last two need OpenCV's contrib modules (the `selective-search` extra).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from .. import storage
from ..checks import Problems
from ..data.geometry import enlarge_boxes, integer_boxes
from ..data.imageio import downscale


@dataclass(frozen=True)
class ProposalConfig:
    """What `propose` does. A field left None takes the default mode's value
    (`deconvnet.inference.modes.MODE_TABLE`, the one place they are written)."""
    method: str | None = None        # a key of PROPOSAL_METHODS; None: edgeboxes with `edge_model`, else grid
    max_proposals: int | None = None  # boxes kept per image (the release processes 50)
    enlarge: float = 1.2             # each box grows 1.2x around its centre (the paper's training crops)
    # Boxes with a side under min_side go: smaller ones would be magnified more
    # than 14x to the network's 224 px, carry no context and would take the
    # place of real objects.
    min_side: int | None = None
    min_side_enlarged: bool | None = None  # measure min_side on the enlarged box (the release) not the generator's
    whole_image: bool | None = None  # append the whole image so every pixel is covered (the release does not)
    dedupe: bool | None = None       # drop repeated boxes (the release keeps them; each takes a slot)
    candidates: int | None = None    # boxes EdgeBoxes is asked for; None: 2 x max_proposals
    # Selective search and EdgeBoxes see the image downscaled to this longer
    # side (None: full size); their cost grows with the pixel count, and
    # 500 px is the size of a PASCAL VOC image.
    max_side: int | None = 500
    edge_model: str | None = None    # structured-edge model (path or URI) for `edgeboxes`

    def __post_init__(self) -> None:
        from .modes import fill_defaults  # modes imports this module

        fill_defaults(self, "proposals")
        if self.method is None:
            object.__setattr__(self, "method", "edgeboxes" if self.edge_model else "grid")
        problems = Problems(self)
        problems.one_of("method", sorted(PROPOSAL_METHODS))
        if self.method == "edgeboxes" and not self.edge_model:
            problems.add("proposal method 'edgeboxes' needs a structured-edge model: pass `edge_model` "
                         "(the path or URI of OpenCV's model.yml.gz), or use the 'grid' or "
                         "'selective-search' method, which need no model file")
        problems.at_least("max_proposals", 0)
        problems.check("enlarge", self.enlarge > 0, "must be > 0")
        problems.at_least("min_side", 1)
        problems.at_least("max_side", 1, none_ok=True)
        problems.at_least("candidates", 1, none_ok=True)
        problems.raise_any()

    @property
    def smallest_box(self) -> float:
        """The smallest side a generator's box can have and still pass `min_side`."""
        return self.min_side / self.enlarge if self.min_side_enlarged else self.min_side


def propose(image: np.ndarray, config: ProposalConfig, storage_options: dict | None = None) -> np.ndarray:
    """Proposal boxes for one image: (K, 4) float32 xyxy, best first, K <=
    max_proposals (+ 1: the whole image `[0, 0, W, H]` last, with
    `whole_image`); see the module docstring. `storage_options` reach the
    read of `edge_model`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    whole = np.array([[0, 0, w, h]], dtype=np.float64)  # (1, 4)
    tail = whole if config.whole_image else np.zeros((0, 4))
    if config.max_proposals == 0:
        return tail.astype(np.float32)
    boxes = PROPOSAL_METHODS[config.method](image, config, storage_options)  # (K, 4), best first
    boxes = np.clip(np.rint(boxes), 0, [w, h, w, h]).reshape(-1, 4)
    if config.whole_image:
        boxes = boxes[~np.all(boxes == whole, axis=1)]
    if config.dedupe:
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]  # keeping the ranking
    grown = enlarge_boxes(boxes, config.enlarge)
    measured = boxes
    if config.min_side_enlarged:  # the release's `if min(box_wd, box_ht) < 112, continue; end`
        grown = measured = integer_boxes(grown).astype(np.float64)
    sides = np.minimum(measured[:, 2] - measured[:, 0], measured[:, 3] - measured[:, 1])
    kept = grown[sides >= config.min_side][: config.max_proposals]  # the first max_proposals that pass
    return np.concatenate([kept, tail]).astype(np.float32)


# ---------------------------------------------------------------- generators

def whole_image(image: np.ndarray, config: ProposalConfig, storage_options: dict | None = None) -> np.ndarray:
    h, w = image.shape[:2]
    return np.array([[0, 0, w, h]], dtype=np.float64)


def grid(image: np.ndarray, config: ProposalConfig, storage_options: dict | None = None) -> np.ndarray:
    """Sliding windows at several scales, each with half-window overlap.

    Level n (n = 2, 3, ...) tiles the image with n x n windows of 2/(n+1) of
    its width and height, so every level covers the whole image. Levels are
    added, coarse to fine, until there are `max_proposals` windows or the
    windows would be smaller than `min_side`. The ranking takes one window of
    each level in turn, and within a level the one farthest from those already
    taken, so any prefix of it spreads over scales and positions.
    """
    h, w = image.shape[:2]
    levels, count, n = [], 0, 2
    while count < config.max_proposals and min(w, h) * 2 / (n + 1) >= config.smallest_box:
        edges_x = np.rint(np.arange(n + 2) * w / (n + 1))  # window i spans edges i..i+2
        edges_y = np.rint(np.arange(n + 2) * h / (n + 1))
        x1, y1 = np.meshgrid(edges_x[:n], edges_y[:n])
        x2, y2 = np.meshgrid(edges_x[2:], edges_y[2:])
        boxes = np.stack([x1.ravel(), y1.ravel(), x2.ravel(), y2.ravel()], axis=1)  # (n*n, 4)
        levels.append(boxes[_spread_order(boxes)])
        count += n * n
        n += 1
    return _interleave(levels)


def selective_search(image: np.ndarray, config: ProposalConfig, storage_options: dict | None = None) -> np.ndarray:
    """OpenCV's selective search (fast mode) on the image downscaled to `max_side`.

    OpenCV ranks its boxes with C's `rand()`, which `cv2.setRNGSeed` does not
    seed, so its order changes from run to run while the set of boxes does not.
    The set is therefore ranked here, deterministically: one box per
    half-octave of scale in turn, coarse to fine, spread over positions within
    a scale (as `grid` ranks its windows).
    """
    cv2 = _cv2()
    small, scale = downscale(image, config.max_side)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    search.switchToSelectiveSearchFast()
    xywh = search.process().astype(np.float64).reshape(-1, 4)  # (K, 4)
    boxes = np.unique(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), axis=0)
    areas = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1)
    # Scale bins of half an octave of side: log2 of the area ratio to the image.
    octaves = np.floor(np.log2(small.shape[0] * small.shape[1] / areas)).astype(int)
    groups = [boxes[octaves == o] for o in np.unique(octaves)]
    return _interleave([g[_spread_order(g)] for g in groups]) / scale


def edgeboxes(image: np.ndarray, config: ProposalConfig, storage_options: dict | None = None) -> np.ndarray:
    """EdgeBoxes (Zitnick and Dollar, 2014) on structured edges, the paper's
    proposals; OpenCV's default parameters, boxes in order of their objectness
    score. The edge model is read with `storage_options`."""
    cv2 = _cv2()
    detector = _edge_detector(config.edge_model, storage_options)
    small, scale = downscale(image, config.max_side)
    edges = detector.detectEdges(small.astype(np.float32) / 255)  # wants RGB in [0, 1]
    orientation = detector.computeOrientation(edges)
    edges = detector.edgesNms(edges, orientation)
    # By default twice the boxes that are kept: headroom for those the min_side filter drops.
    finder = cv2.ximgproc.createEdgeBoxes(maxBoxes=config.candidates or 2 * config.max_proposals)
    xywh, _ = finder.getBoundingBoxes(edges, orientation)
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)  # (K, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) / scale


ProposalFn = Callable[[np.ndarray, ProposalConfig, "dict | None"], np.ndarray]

PROPOSAL_METHODS: dict[str, ProposalFn] = {
    "whole": whole_image,
    "grid": grid,
    "selective-search": selective_search,
    "edgeboxes": edgeboxes,
}


# ------------------------------------------------------------------- helpers

def _spread_order(boxes: np.ndarray) -> np.ndarray:
    """Indices that rank (K, 4) boxes so any prefix spreads over the image: first
    the box whose centre is nearest the centroid, then each time the box farthest
    from all those taken (greedy farthest-point order; ties go to the lower index)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=int)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (K, 2)
    order = [int(np.argmin(np.linalg.norm(centres - centres.mean(axis=0), axis=1)))]
    nearest = np.full(len(boxes), np.inf)  # distance to the closest box taken
    for _ in range(len(boxes) - 1):
        nearest = np.minimum(nearest, np.linalg.norm(centres - centres[order[-1]], axis=1))
        nearest[order[-1]] = -1  # boxes with equal centres must not be taken twice
        order.append(int(np.argmax(nearest)))
    return np.array(order)


def _interleave(groups: list[np.ndarray]) -> np.ndarray:
    """Round-robin over ranked groups of boxes: the first of each, then the second..."""
    if not groups:
        return np.zeros((0, 4))
    ranks = np.concatenate([np.arange(len(g)) for g in groups])
    return np.concatenate(groups)[np.argsort(ranks, kind="stable")]


def _cv2() -> Any:
    try:
        import cv2

        cv2.ximgproc  # only in the contrib build
    except (ImportError, AttributeError) as e:
        raise ImportError(
            "proposal methods 'selective-search' and 'edgeboxes' need OpenCV's contrib "
            "modules: pip install 'deconvnet-at-scale[selective-search]' "
            "(opencv-contrib-python-headless)") from e
    return cv2


_EDGE_DETECTORS: dict[tuple[str, str], Any] = {}  # (uri, storage options as JSON) -> detector


def _edge_detector(model_uri: str, storage_options: dict | None = None) -> Any:
    """The structured-edge detector, loaded once per process, model and storage
    options (the options are unhashable dicts, hence no lru_cache)."""
    key = (model_uri, json.dumps(storage_options or {}, sort_keys=True, default=str))
    if key not in _EDGE_DETECTORS:
        if len(_EDGE_DETECTORS) >= 4:
            _EDGE_DETECTORS.pop(next(iter(_EDGE_DETECTORS)))
        _EDGE_DETECTORS[key] = _load_edge_detector(model_uri, storage_options)
    return _EDGE_DETECTORS[key]


def _load_edge_detector(model_uri: str, storage_options: dict | None) -> Any:
    """OpenCV reads only local files, so the model goes through a temporary copy;
    the name keeps its suffixes because OpenCV tells a gzipped model by its `.gz`."""
    cv2 = _cv2()
    data = storage.read_bytes(model_uri, storage_options)
    suffix = "".join(PurePosixPath(model_uri).suffixes)
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return cv2.ximgproc.createStructuredEdgeDetection(path)
    except cv2.error as e:
        raise ValueError(f"not a structured-edge model: {model_uri}") from e
    finally:
        os.remove(path)
