"""deconvnet/data/geometry.py: connected components, ground-truth objects, box IoU."""

from __future__ import annotations

from collections import deque

import numpy as np

from deconvnet.data.geometry import box_iou, connected_components, find_instances, matching_proposals, object_labels
from deconvnet.data.voc import IGNORE_INDEX


def _bfs_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Reference: breadth-first 4-connected labelling in raster order."""
    h, w = mask.shape
    out = np.zeros((h, w), np.int32)
    n = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not out[y, x]:
                n += 1
                out[y, x] = n
                todo = deque([(y, x)])
                while todo:
                    cy, cx = todo.popleft()
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not out[ny, nx]:
                            out[ny, nx] = n
                            todo.append((ny, nx))
    return out, n


def test_connected_components_hand_made():
    mask = np.array([
        [1, 1, 0, 0, 1],
        [0, 1, 0, 1, 0],  # (1, 3) touches (0, 4) only diagonally: separate
        [0, 0, 0, 1, 0],
        [1, 0, 0, 0, 0],
    ], dtype=bool)
    labels, n = connected_components(mask)
    assert n == 4
    np.testing.assert_array_equal(labels, [
        [1, 1, 0, 0, 2],
        [0, 1, 0, 3, 0],
        [0, 0, 0, 3, 0],
        [4, 0, 0, 0, 0],
    ])
    assert connected_components(np.zeros((3, 3), bool))[1] == 0


def test_connected_components_spiral_and_random_match_bfs():
    spiral = np.zeros((15, 15), bool)  # one long snake: many union-find rounds
    spiral[0, :] = spiral[:, 14] = spiral[14, :] = spiral[2:, 0] = True
    spiral[2, 0:12] = spiral[2:12, 12] = spiral[12, 2:13] = spiral[4:12, 2] = True
    rng = np.random.default_rng(0)
    for mask in [spiral, *(rng.random((40, 50)) < p for p in (0.3, 0.5, 0.6))]:
        labels, n = connected_components(mask)
        ref, ref_n = _bfs_components(mask)
        assert n == ref_n
        np.testing.assert_array_equal(labels, ref)


def scene() -> tuple[np.ndarray, np.ndarray]:
    """Two class-3 objects touching only at a 255 border, one class-1 object."""
    classes = np.zeros((40, 60), np.uint8)
    objects = np.zeros((40, 60), np.uint8)
    classes[5:15, 5:20] = 3
    objects[5:15, 5:20] = 1
    classes[5:15, 21:30] = 3
    objects[5:15, 21:30] = 2
    classes[5:15, 20] = objects[5:15, 20] = IGNORE_INDEX
    classes[25:35, 40:55] = 1
    objects[25:35, 40:55] = 3
    classes[24, 40:55] = objects[24, 40:55] = IGNORE_INDEX
    return classes, objects


def test_find_instances_from_objects_and_from_components_agree():
    classes, objects = scene()
    for found in (find_instances(classes, objects), find_instances(classes, None)):
        got = sorted((o.class_id, tuple(o.box)) for o in found)
        assert got == [(1, (40, 25, 55, 35)), (3, (5, 5, 20, 15)), (3, (21, 5, 30, 15))]


def test_min_side_drops_small_objects():
    classes, objects = scene()
    kept = find_instances(classes, objects, min_side=10)  # boxes are 15x10, 9x10, 15x10
    assert sorted(tuple(o.box) for o in kept) == [(5, 5, 20, 15), (40, 25, 55, 35)]


def test_stage1_labels_only_the_chosen_object():
    classes, objects = scene()
    chosen = next(o for o in find_instances(classes, objects) if tuple(o.box) == (21, 5, 30, 15))
    labels = object_labels(classes, chosen)
    assert labels[5:15, 21:30].tolist() == (np.full((10, 9), 3)).tolist()  # the object keeps its class
    assert (labels[5:15, 5:20] == 0).all()  # the other class-3 object is background
    assert (labels[25:35, 40:55] == 0).all()  # so is the class-1 object
    assert (labels[classes == IGNORE_INDEX] == IGNORE_INDEX).all()  # borders stay ignored
    assert set(np.unique(labels)) == {0, 3, IGNORE_INDEX}


def test_box_iou_and_the_stage2_threshold():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 5], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.5, 0.0]])
    props = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.9], [20, 20, 30, 30]], float)
    objects = np.array([[0, 0, 10, 10]], float)
    assert matching_proposals(props, objects, 0.5).tolist() == [True, True, False, False]
    assert matching_proposals(props, np.zeros((0, 4)), 0.5).tolist() == [False] * 4
