"""Proposal generators and `propose`: determinism, coverage, limits, enlargement."""

from __future__ import annotations

import gzip
import sys

import fsspec
import numpy as np
import pytest

from deconvnet.data.geometry import enlarge_boxes
from deconvnet.inference.proposals import PROPOSAL_METHODS, ProposalConfig, propose


@pytest.fixture
def image() -> np.ndarray:
    """(120, 160, 3): two coloured rectangles on a noisy background."""
    rng = np.random.default_rng(0)
    img = np.full((120, 160, 3), (40, 120, 200), dtype=np.int64)
    img[25:75, 30:100] = (200, 50, 50)
    img[60:110, 90:150] = (30, 200, 40)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def test_grid_is_deterministic_and_ends_with_whole_image(image):
    config = ProposalConfig(method="grid")
    boxes = propose(image, config)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    np.testing.assert_array_equal(boxes, propose(image, config))
    np.testing.assert_array_equal(boxes[-1], [0, 0, 160, 120])
    assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])


def test_whole_method_gives_only_the_image_box(image):
    np.testing.assert_array_equal(propose(image, ProposalConfig(method="whole")),
                                  [[0, 0, 160, 120]])


@pytest.mark.parametrize("k", [0, 1, 7, 50])
def test_max_proposals_plus_whole_image(image, k):
    boxes = propose(image, ProposalConfig(max_proposals=k))
    assert len(boxes) == k + 1  # the grid has enough windows for all of these
    np.testing.assert_array_equal(boxes[-1], [0, 0, 160, 120])
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_enlargement_keeps_centres_and_scales_sides(image):
    plain = propose(image, ProposalConfig(enlarge=1.0))[:-1].astype(np.float64)
    grown = propose(image, ProposalConfig(enlarge=1.2))[:-1].astype(np.float64)
    np.testing.assert_allclose((grown[:, :2] + grown[:, 2:]) / 2,
                               (plain[:, :2] + plain[:, 2:]) / 2, atol=1e-4)
    np.testing.assert_allclose(grown[:, 2:] - grown[:, :2],
                               1.2 * (plain[:, 2:] - plain[:, :2]), rtol=1e-6)
    np.testing.assert_allclose(enlarge_boxes(np.array([[10.0, 20, 30, 60]]), 1.5),
                               [[5, 10, 35, 70]])


def test_small_duplicate_and_whole_boxes_are_dropped_in_rank_order(image, monkeypatch):
    ranked = np.array([
        [10, 10, 20, 100],     # 10 px wide: under min_side
        [0, 0, 160, 120],      # the whole image: appended at the end instead
        [50.2, 40, 90, 80.4],  # snaps to [50, 40, 90, 80]
        [5, 5, 60, 60],
        [50, 40, 90, 80],      # a duplicate of the third
        [-5, 0, 40, 130],      # clipped to the image
    ])
    monkeypatch.setitem(PROPOSAL_METHODS, "grid", lambda img, cfg, opts=None: ranked)
    boxes = propose(image, ProposalConfig(min_side=16, enlarge=1.0))
    np.testing.assert_array_equal(
        boxes, [[50, 40, 90, 80], [5, 5, 60, 60], [0, 0, 40, 120], [0, 0, 160, 120]])


def test_grid_covers_every_pixel_and_spreads_its_prefix(image):
    boxes = propose(image, ProposalConfig(enlarge=1.0))[:-1].astype(int)
    covered = np.zeros(image.shape[:2], dtype=bool)
    for x1, y1, x2, y2 in boxes:
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    # The first few windows already come from several scales.
    first = boxes[:6]
    assert len(np.unique(first[:, 2] - first[:, 0])) >= 2


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="grid") as err:
        ProposalConfig(method="sliding")
    for name in PROPOSAL_METHODS:
        assert name in str(err.value)


def test_edgeboxes_without_model_says_what_to_pass():
    with pytest.raises(ValueError, match="edge_model"):
        ProposalConfig(method="edgeboxes")


@pytest.mark.parametrize("method", ["selective-search", "edgeboxes"])
def test_missing_opencv_names_the_extra(image, monkeypatch, method):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` fail
    with pytest.raises(ImportError, match=r"\[selective-search\]"):
        PROPOSAL_METHODS[method](image, ProposalConfig(method=method, edge_model="unused"))


def test_selective_search_is_deterministic(image):
    pytest.importorskip("cv2")
    config = ProposalConfig(method="selective-search", max_proposals=20)
    boxes = propose(image, config)
    assert len(boxes) > 5
    np.testing.assert_array_equal(boxes, propose(image, config))
    # Downscaling for the search maps boxes back to full-size coordinates.
    small = propose(image, ProposalConfig(method="selective-search", max_side=80))
    assert small[:-1, 2].max() > 100


# A structured-edge "forest" of one tree: the root thresholds the gradient
# magnitude at the patch centre and the strong leaf marks the whole inner patch
# as edge. Enough for EdgeBoxes to find the rectangles; OpenCV's real model is
# trained on BSDS500.
_TINY_EDGE_MODEL = """%YAML:1.0
options:
   stride: 2
   shrinkNumber: 2
   patchSize: 32
   patchInnerSize: 16
   numberOfGradientOrientations: 4
   gradientSmoothingRadius: 0
   regFeatureSmoothingRadius: 2
   ssFeatureSmoothingRadius: 8
   gradientNormalizationRadius: 4
   selfsimilarityGridSize: 5
   numberOfTrees: 1
   numberOfTreesToEvaluate: 1
childs:
   - [ 2, 0, 0 ]
featureIds:
   - [ 904, 0, 0 ]
thresholds:
   - [ 0.05, 0., 0. ]
edgeBoundaries:
   - [ 0, 0, 0, 256 ]
edgeBins:
   - [ BINS ]
""".replace("BINS", ", ".join(map(str, range(256))))


def test_edgeboxes_reads_model_from_uri(image):
    pytest.importorskip("cv2")
    uri = "memory://test-proposals/edges.yml.gz"
    with fsspec.open(uri, "wb") as f:
        f.write(gzip.compress(_TINY_EDGE_MODEL.encode()))
    config = ProposalConfig(method="edgeboxes", edge_model=uri, max_proposals=10)
    boxes = propose(image, config)
    assert 2 <= len(boxes) <= 11
    np.testing.assert_array_equal(boxes, propose(image, config))


def test_edgeboxes_missing_model_file(image):
    pytest.importorskip("cv2")
    config = ProposalConfig(method="edgeboxes", edge_model="memory://test-proposals/absent.yml.gz")
    with pytest.raises(FileNotFoundError):
        propose(image, config)
