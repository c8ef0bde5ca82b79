"""Inference modes (deconvnet.inference): each rule of `original` against numbers
worked out by hand, on tiny images and a scripted stand-in for the network."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from deconvnet.inference.crf import crf_config, dense_crf, unary_energy
from deconvnet.inference import for_mode
from deconvnet.model import preset
from deconvnet.inference.proposals import PROPOSAL_METHODS, propose
from deconvnet.inference.segmenter import Segmenter
from deconvnet.weights import ModelInfo

ORIGINAL, DEFAULT = for_mode("original"), for_mode("default")
# Normalisation chosen so normalised values are easy by hand: (v - 255 * mean) / (255 * std).
INFO = ModelInfo(config=preset("tiny", num_classes=3), classes=("a", "b", "c"),
                 mean=(0.5, 0.25, 0.75), std=(0.5, 0.5, 0.5))
FCN_INFO = dataclasses.replace(INFO, config=preset("fcn8s-tiny", num_classes=3))


class Scripted(nn.Module):
    """A stand-in network: crop k of a forward call gets the constant raw scores
    `scores[k]` (C,) over its whole map. Records its inputs."""

    def __init__(self, scores):
        super().__init__()
        self.register_buffer("scores", torch.tensor(scores, dtype=torch.float32))  # (K, C)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):  # (B, 3, h, w) -> (B, C, h, w)
        self.inputs.append(x.detach().clone())
        b, _, h, w = x.shape
        return self.scores[:b, :, None, None].expand(b, -1, h, w).clone()


def segment(mode, scores, image, boxes, fcn_scores=None):
    cfg = mode.segmenter
    fcn = (Scripted([fcn_scores]), FCN_INFO) if fcn_scores is not None else None
    model = Scripted(scores)
    probs = Segmenter(model, INFO, cfg, "cpu", fcn=fcn).probabilities([image], [np.asarray(boxes, np.float32)])[0]
    return probs, model


# ------------------------------------------------------------------ merge

def test_original_max_merges_raw_scores_into_zero_and_softmaxes_once():
    image = np.zeros((4, 7, 3), np.uint8)
    # Box A covers columns 0-3, box B columns 2-5; column 6 is covered by neither.
    probs, _ = segment(ORIGINAL, [[2, -1, -3], [-2, 1, 0.5]], image, [[0, 0, 4, 4], [2, 0, 6, 4]])
    # Columns 0-1: max(A, 0) = (2, 0, 0): the negative scores never count.
    # softmax = (e^2, 1, 1) / (e^2 + 2)
    np.testing.assert_allclose(probs[:, 1, 0], [0.786986, 0.106507, 0.106507], atol=1e-5)
    # Columns 2-3: max(A, B, 0) = (2, 1, 0.5) -> (e^2, e, e^0.5) / 11.756059
    np.testing.assert_allclose(probs[:, 2, 3], [0.628534, 0.231224, 0.140243], atol=1e-5)
    # Columns 4-5: max(B, 0) = (0, 1, 0.5) -> (1, e, e^0.5) / 5.367003
    np.testing.assert_allclose(probs[:, 0, 5], [0.186324, 0.506480, 0.307196], atol=1e-5)
    # Column 6: nothing, so the zero map's softmax: uniform.
    np.testing.assert_allclose(probs[:, 3, 6], [1 / 3] * 3, atol=1e-6)


def test_default_max_merges_per_proposal_softmax_and_renormalises():
    image = np.zeros((4, 7, 3), np.uint8)
    probs, _ = segment(DEFAULT, [[2, -1, -3], [-2, 1, 0.5]], image, [[0, 0, 4, 4], [2, 0, 6, 4]])
    # Columns 0-1: softmax(2, -1, -3) = (e^2, e^-1, e^-3) / 7.806699
    np.testing.assert_allclose(probs[:, 1, 0], [0.946500, 0.047123, 0.006377], atol=1e-5)
    # Columns 2-3: max(softmax A, softmax B); softmax B = (e^-2, e, e^0.5) / 4.502285
    # = (.030060, .603758, .366190); max = (.946500, .603758, .366190), renormalised by 1.916448.
    np.testing.assert_allclose(probs[:, 2, 3], [0.493883, 0.315040, 0.191078], atol=1e-5)


# ---------------------------------------------------------------- padding

@pytest.mark.parametrize("mode, outside", [(ORIGINAL, [-1.0, -0.5, -1.5]), (DEFAULT, [0.0, 0.0, 0.0])])
def test_a_crop_half_outside_the_image_sees_black_minus_mean_in_original(mode, outside):
    image = np.full((8, 8, 3), 102, np.uint8)  # 102 = 0.4 * 255
    _, model = segment(mode, [[0, 0, 0]], image, [[-8, 0, 8, 8]])  # the left half is outside
    crop = model.inputs[0][0]  # (3, 224, 224)
    # Outside: original pads with raw 0 before the mean: (0 - 255 * mean) / (255 * std)
    # = (-1, -0.5, -1.5); default pads with the mean colour, 0 after normalisation.
    np.testing.assert_allclose(crop[:, 100, 0].numpy(), outside, atol=1e-6)
    # Inside (column 200 samples image x = 5.8): (102 - 255 * mean) / (255 * std).
    np.testing.assert_allclose(crop[:, 100, 200].numpy(), [-0.2, 0.3, -0.7], atol=1e-5)


# --------------------------------------------------------------- ensemble

def test_original_ensemble_is_softmax_of_deconv_score_times_relu_fcn_score():
    image = np.zeros((4, 5, 3), np.uint8)
    probs, _ = segment(ORIGINAL, [[2, -1, 0.5]], image, [[0, 0, 5, 4]], fcn_scores=[-1, 3, 2])
    # deconv = max(0, (2, -1, 0.5)) = (2, 0, 0.5); max(0, fcn) = (0, 3, 2);
    # product (0, 0, 1) -> softmax (1, 1, e) / (2 + e)
    np.testing.assert_allclose(probs[:, 2, 2], [0.211942, 0.211942, 0.576117], atol=1e-5)


def test_default_ensemble_is_the_mean_of_the_two_probability_maps():
    image = np.zeros((4, 5, 3), np.uint8)
    probs, _ = segment(DEFAULT, [[2, -1, 0.5]], image, [[0, 0, 5, 4]], fcn_scores=[-1, 3, 2])
    # (softmax(2, -1, 0.5) + softmax(-1, 3, 2)) / 2
    # = ((.785597, .039112, .175290) + (.013212, .721399, .265388)) / 2
    np.testing.assert_allclose(probs[:, 1, 1], [0.399405, 0.380256, 0.220339], atol=1e-5)


# -------------------------------------------------------------- proposals

@pytest.fixture
def photo() -> np.ndarray:
    return np.zeros((400, 500, 3), np.uint8)


def _generator(monkeypatch, boxes):
    monkeypatch.setitem(PROPOSAL_METHODS, "grid", lambda img, cfg, opts=None: np.asarray(boxes, float))


def test_original_skips_enlarged_boxes_under_112_px_and_adds_no_whole_image(photo, monkeypatch):
    # Enlarged 1.2x around the centre and rounded: a 93-px side becomes
    # [-9.3, 102.3] -> [-9, 102], 111 px: skipped; 94 px -> [-9.4, 103.4] -> [-9, 103], 112 px: kept.
    _generator(monkeypatch, [[0, 0, 93, 200], [0, 0, 94, 200], [0, 0, 500, 400]])
    boxes = propose(photo, ORIGINAL.proposals)
    np.testing.assert_array_equal(boxes, [[-9, -20, 103, 220], [-50, -40, 550, 440]])
    # The same boxes, not enlarged: 111 px goes, 112 px stays; the generator's
    # own whole-image box is an ordinary (enlarged) box, and none is added.
    _generator(monkeypatch, [[0, 0, 111, 200], [0, 0, 112, 200]])
    plain = dataclasses.replace(ORIGINAL.proposals, enlarge=1.0)
    np.testing.assert_array_equal(propose(photo, plain), [[0, 0, 112, 200]])
    # The default keeps boxes down to 16 px and appends the whole image.
    np.testing.assert_array_equal(propose(photo, dataclasses.replace(DEFAULT.proposals, enlarge=1.0)),
                                  [[0, 0, 111, 200], [0, 0, 112, 200], [0, 0, 500, 400]])


def test_original_processes_the_first_50_boxes_that_pass(photo, monkeypatch):
    big = [[x, 0, x + 200, 200] for x in range(55)]  # 55 distinct boxes that pass
    small = [[0, 0, 50, 50]] * 5  # skipped: they do not count towards the 50
    ranked = small[:2] + big[:10] + small[2:] + [big[0]] + big[10:]  # a duplicate of the first big box
    _generator(monkeypatch, ranked)
    boxes = propose(photo, dataclasses.replace(ORIGINAL.proposals, enlarge=1.0))
    # The release keeps the duplicate (it takes a slot), so the 50 are big[0:10], big[0], big[10:49].
    expect = np.asarray(big[:10] + [big[0]] + big[10:49], np.float32)
    np.testing.assert_array_equal(boxes, expect)
    assert len(boxes) == 50 and not np.any(np.all(boxes == [0, 0, 500, 400], axis=1))


# -------------------------------------------------------------------- CRF

def _mean_field_reference(image: np.ndarray, probs: np.ndarray, iterations: int) -> np.ndarray:
    """The release's update rule with exact Gaussian sums, no normalisation:
    Q <- softmax(-U + sum_k w_k K_k Q) (Potts), U = -log p, K over all pixel
    pairs including the pixel itself. (C, H*W)."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[:h, :w]
    pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    rgb = image.reshape(-1, 3).astype(float)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    c2 = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
    k = 3 * np.exp(-d2 / (2 * 3 ** 2)) + 5 * np.exp(-d2 / (2 * 20 ** 2) - c2 / (2 * 3 ** 2))
    u = -np.log(probs.reshape(len(probs), -1))
    q = np.exp(-u) / np.exp(-u).sum(0)
    for _ in range(iterations):
        m = -u + q @ k.T
        q = np.exp(m - m.max(0))
        q /= q.sum(0)
    return q


def test_release_crf_sums_unnormalised_messages_and_flips_a_lone_pixel():
    # One pixel sure of class 1 (0.98) amid 80 pixels of the same colour mildly
    # for class 0 (0.6). Unnormalised, the 80 neighbours' pull (weights 3 and 5
    # times ~80 x 0.2) outweighs its unary gap log(0.98/0.02) + log(0.6/0.4) = 4.3;
    # normalised, the pull is a weighted average, at most (3 + 5) x 0.2 = 1.6.
    image = np.full((9, 9, 3), 128, np.uint8)
    probs = np.zeros((2, 9, 9), np.float32)
    probs[0], probs[1] = 0.6, 0.4
    probs[:, 4, 4] = 0.02, 0.98
    release, _ = dense_crf(image, probs, crf_config("paper", iterations=1))
    reference = _mean_field_reference(image, probs, 1).argmax(0).reshape(9, 9)
    np.testing.assert_array_equal(release, reference)
    assert release[4, 4] == 0
    default, _ = dense_crf(image, probs, dataclasses.replace(DEFAULT.crf, iterations=1))
    assert default[4, 4] == 1
    assert DEFAULT.crf.normalization == "symmetric" and ORIGINAL.crf.normalization == "none"
    assert ORIGINAL.crf == crf_config("paper", exact=True)  # the preset as it is, computed exactly


def test_release_unary_is_unclipped_and_finite_for_zero_probability():
    p = np.array([0.0, 1e-6, 0.5], np.float16).reshape(3, 1, 1)  # 0: a probability lost to float16
    # -log p, with p == 0 floored at 2**-126: 126 * ln 2 = 87.336
    np.testing.assert_allclose(unary_energy(p, None)[:, 0], [87.336544, 13.8155, 0.693147], rtol=1e-3)
    # pydensecrf's unary_from_softmax clips at 1e-5: -log 1e-5 = 11.5129
    np.testing.assert_allclose(unary_energy(p, 1e-5)[:, 0], [11.512925, 11.512925, 0.693147], rtol=1e-5)
    image = np.zeros((1, 1, 3), np.uint8)
    labels, confidence = dense_crf(image, np.array([0.0, 0.0, 1.0], np.float32).reshape(3, 1, 1),
                                   crf_config("paper"))
    assert labels[0, 0] == 2 and np.isfinite(confidence).all()


# ------------------------------------------------------------ the one call

def test_modes_are_defined_in_one_place_and_clash_loudly():
    assert ORIGINAL.proposals.whole_image is False and ORIGINAL.proposals.min_side == 112
    assert (ORIGINAL.segmenter.merge, ORIGINAL.segmenter.pad, ORIGINAL.segmenter.ensemble) == \
        ("raw", "black", "relu-product")
    assert (DEFAULT.segmenter.merge, DEFAULT.segmenter.pad, DEFAULT.segmenter.ensemble) == \
        ("softmax", "mean", "mean")
    assert for_mode("original", edge_model="m.yml.gz").proposals.method == "edgeboxes"
    assert for_mode("default", crf="none").crf is None
    with pytest.raises(ValueError, match="ensemble"):
        for_mode("original", ensemble="mean")
    with pytest.raises(ValueError, match="aggregate"):
        for_mode("original", aggregate="mean")
    with pytest.raises(ValueError, match="inference"):
        for_mode("paper")
    with pytest.raises(ValueError, match="merge"):
        for_mode("default", ensemble="relu-product")


def test_segment_command_with_original_inference(tmp_path):
    import re
    import subprocess
    import sys

    from corpus import PHOTO

    from deconvnet.model import PRESETS, DeconvNet
    from deconvnet.weights import save_model_dir
    save_model_dir(DeconvNet(PRESETS["tiny"]), str(tmp_path / "m"), ModelInfo(config=PRESETS["tiny"]))
    r = subprocess.run([sys.executable, "-m", "deconvnet", "segment", str(PHOTO), "--model", str(tmp_path / "m"),
                        "--inference", "original", "--max-proposals", "5", "--crf", "none",
                        "--out", str(tmp_path / "p.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "5 proposals" in r.stdout  # no whole-image box
    assert re.search(r"mean confidence 0\.\d{3}, uncertain pixels \d+\.\d%", r.stdout), r.stdout
    bad = subprocess.run([sys.executable, "-m", "deconvnet", "segment", str(PHOTO), "--model", str(tmp_path / "m"),
                          "--inference", "original", "--ensemble", "mean", "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "ensemble" in bad.stderr and "Traceback" not in bad.stderr
