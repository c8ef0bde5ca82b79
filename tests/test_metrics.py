"""ConfusionMatrix: counts, IoU and accuracies on hand-computed cases, merging, reports."""

import csv
import io
import math

import numpy as np
import pytest
import torch

from deconvnet.metrics import ConfusionMatrix

# Three classes, ten pixels (one ignored):
#   target: 0 0 0 1 1 1 2 2 2 255
#   pred:   0 0 1 1 1 2 2 0 2 1
# Matrix (rows gt, cols pred): [[2, 1, 0], [0, 2, 1], [1, 0, 2]]
# IoU_k = TP / (row_k + col_k - TP):
#   class 0: 2 / (3 + 3 - 2) = 0.5
#   class 1: 2 / (3 + 3 - 2) = 0.5
#   class 2: 2 / (3 + 3 - 2) = 0.5
# Accuracy (recall) = 2/3 each; pixel accuracy 6/9.
TARGET = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 255])
PRED = np.array([0, 0, 1, 1, 1, 2, 2, 0, 2, 1])


def test_hand_computed_three_classes():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    assert cm.matrix.dtype == np.int64
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 0], [0, 2, 1], [1, 0, 2]])
    np.testing.assert_allclose(cm.iou(), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(cm.accuracy(), [2 / 3] * 3)
    assert cm.mean_iou() == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(6 / 9)
    assert cm.mean_accuracy() == pytest.approx(2 / 3)


def test_unequal_classes():
    # target: 0 0 0 0 1 1 ; pred: 0 0 0 1 1 0 -> [[3, 1], [1, 1]]
    # IoU_0 = 3 / (4 + 4 - 3) = 0.6 ; IoU_1 = 1 / (2 + 2 - 1) = 1/3
    cm = ConfusionMatrix(2).update(np.array([0, 0, 0, 1, 1, 0]), np.array([0, 0, 0, 0, 1, 1]))
    np.testing.assert_allclose(cm.iou(), [0.6, 1 / 3])
    assert cm.mean_iou() == pytest.approx((0.6 + 1 / 3) / 2)
    np.testing.assert_allclose(cm.accuracy(), [0.75, 0.5])


def test_ignored_and_out_of_range_targets_are_not_counted():
    cm = ConfusionMatrix(3).update(np.array([0, 1, 2, 2]), np.array([255, 7, -1, 2]))
    assert cm.matrix.sum() == 1 and cm.matrix[2, 2] == 1
    # A different ignore label inside [0, C) is honoured too.
    cm = ConfusionMatrix(3, ignore_index=0).update(np.array([1, 1]), np.array([0, 1]))
    assert cm.matrix.sum() == 1 and cm.matrix[1, 1] == 1


def test_prediction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="predictions"):
        ConfusionMatrix(3).update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(3).update(np.zeros(4, int), np.zeros(5, int))


def test_absent_class_is_nan_and_left_out_of_the_mean():
    # Class 2 appears in neither: IoU NaN; mean over classes 0 and 1 only.
    cm = ConfusionMatrix(3).update(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 1]))
    iou = cm.iou()  # [[1, 1], [0, 2]]: IoU_0 = 1/2, IoU_1 = 2/3
    assert math.isnan(iou[2])
    np.testing.assert_allclose(iou[:2], [0.5, 2 / 3])
    assert cm.mean_iou() == pytest.approx((0.5 + 2 / 3) / 2)
    # Predicted but never in the ground truth: IoU 0 (counts), accuracy NaN.
    cm = ConfusionMatrix(3).update(np.array([2, 1]), np.array([1, 1]))
    assert cm.iou()[2] == 0 and math.isnan(cm.accuracy()[2])


def test_empty_matrix_scores_are_nan():
    cm = ConfusionMatrix(4)
    assert math.isnan(cm.mean_iou()) and math.isnan(cm.pixel_accuracy())


def test_counts_from_two_processes_add_up_through_from_matrix():
    """What DDP ranks do: all-reduce (sum) their `.matrix`, then wrap it."""
    rng = np.random.default_rng(0)
    t1, t2 = rng.integers(0, 5, (2, 6, 7)), rng.integers(0, 5, (3, 4, 4))
    p1, p2 = rng.integers(0, 5, t1.shape), rng.integers(0, 5, t2.shape)
    t1[0, 0] = 255
    a, b = ConfusionMatrix(5).update(p1, t1), ConfusionMatrix(5).update(p2, t2)
    whole = ConfusionMatrix(5).update(np.concatenate([p1.ravel(), p2.ravel()]),
                                      np.concatenate([t1.ravel(), t2.ravel()]))
    summed = ConfusionMatrix.from_matrix(torch.from_numpy(a.matrix) + torch.from_numpy(b.matrix))
    np.testing.assert_array_equal(summed.matrix, whole.matrix)
    assert summed.mean_iou() == whole.mean_iou()


def test_torch_tensors_of_any_shape():
    pred = torch.from_numpy(PRED.reshape(2, 5)).to(torch.uint8)
    target = torch.from_numpy(TARGET.reshape(2, 5)).to(torch.uint8)  # 255 fits in uint8
    cm = ConfusionMatrix(3).update(pred, target)
    np.testing.assert_array_equal(cm.matrix, ConfusionMatrix(3).update(PRED, TARGET).matrix)


def test_table_has_class_names_as_header_and_mean_last():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    head, row = cm.table(["bkg", "cat", "dog"], name="DeconvNet").splitlines()
    assert head.split() == ["bkg", "cat", "dog", "mean"]
    assert row.split() == ["DeconvNet", "50.0", "50.0", "50.0", "50.0"]
    # Default names are VOC's; an absent class shows as "-".
    head, row = ConfusionMatrix(3).update(np.array([0, 1]), np.array([0, 1])).table().splitlines()
    assert head.split() == ["background", "aeroplane", "bicycle", "mean"]
    assert row.split() == ["IoU", "100.0", "100.0", "-", "100.0"]
    with pytest.raises(ValueError):
        cm.table(["a", "b"])


def test_markdown_and_csv():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    md = cm.to_markdown(["bkg", "cat", "dog"]).splitlines()
    assert md[0] == "|  | bkg | cat | dog | mean |"
    assert md[2] == "| IoU | 50.0 | 50.0 | 50.0 | 50.0 |"
    rows = list(csv.reader(io.StringIO(cm.to_csv(["bkg", "cat", "dog"]))))
    assert rows[0] == ["class", "iou", "accuracy", "pixels"]
    assert rows[1] == ["bkg", "0.500000", "0.666667", "3"]
    assert rows[-2] == ["mean", "0.500000", "0.666667", "9"]
    assert rows[-1] == ["overall", "", "0.666667", "9"]


def test_summary_is_flat_floats():
    s = ConfusionMatrix(3).update(PRED, TARGET).summary(["bkg", "cat", "dog"])
    assert s["mean_iou"] == pytest.approx(0.5) and s["iou/dog"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in s.values())
