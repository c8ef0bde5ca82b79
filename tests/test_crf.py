"""Dense CRF: it sharpens a coarse probability map along colour edges; presets,
overrides and the reduced-resolution path; `label_map`'s confidence and uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deconvnet.inference.crf import CRF_PRESETS, UNCERTAIN_BELOW, CRFConfig, crf_config, dense_crf, label_map

H, W = 80, 96


@pytest.fixture(scope="module")
def two_regions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red region under a wavy boundary in a blue image, its true mask, and a
    (2, H, W) probability map as coarse as a network's: the mask downsampled
    8x, upsampled bilinearly, with pixel noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    mask = yy > H / 2 + 10 * np.sin(xx / 7)  # (H, W)
    image = np.where(mask[..., None], [200, 60, 50], [50, 90, 190])
    image = np.clip(image + rng.integers(-15, 16, image.shape), 0, 255).astype(np.uint8)
    coarse = Image.fromarray(mask.astype(np.float32)).resize((W // 8, H // 8), Image.BILINEAR)
    p = np.asarray(coarse.resize((W, H), Image.BILINEAR)) * 0.8 + 0.1
    p = np.clip(p + rng.normal(0, 0.1, p.shape), 0.02, 0.98)
    return image, mask, np.stack([1 - p, p]).astype(np.float32)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return (pred & truth).sum() / (pred | truth).sum()


@pytest.mark.parametrize("preset", sorted(CRF_PRESETS))
def test_crf_improves_a_coarse_map_along_colour_edges(two_regions, preset):
    image, mask, probs = two_regions
    before = iou(probs.argmax(axis=0) == 1, mask)
    labels, confidence = dense_crf(image, probs, crf_config(preset))
    assert labels.shape == (H, W) and labels.dtype == np.uint8
    assert confidence.shape == (H, W) and confidence.dtype == np.float32
    # The release's unnormalised kernels ("paper") gain less here (0.950 -> 0.973)
    # than normalised ones (-> 0.998).
    assert iou(labels == 1, mask) > before + 0.02
    assert 0.5 <= confidence.min() and confidence.max() <= 1.0 + 1e-6


def test_read_only_inputs_are_accepted(two_regions):
    """Images decoded by PIL come as read-only arrays; pydensecrf wants writable ones."""
    image, _, probs = two_regions
    image, probs = image.copy(), probs.copy()
    image.flags.writeable = probs.flags.writeable = False
    expected, _ = dense_crf(image.copy(), probs.copy(), crf_config("paper"))
    np.testing.assert_array_equal(dense_crf(image, probs, crf_config("paper"))[0], expected)


def test_max_side_returns_full_size_labels_that_mostly_agree(two_regions):
    image, mask, probs = two_regions
    full, _ = dense_crf(image, probs, crf_config("paper"))
    labels, confidence = dense_crf(image, probs, crf_config("paper", max_side=48))
    assert labels.shape == (H, W) and confidence.shape == (H, W)
    assert (labels == full).mean() > 0.97
    assert iou(labels == 1, mask) > iou(probs.argmax(axis=0) == 1, mask)


def test_presets_differ_and_match_their_sources():
    assert CRF_PRESETS["paper"] == CRFConfig(gauss_sxy=3, gauss_compat=3, bilateral_sxy=20,
                                             bilateral_srgb=3, bilateral_compat=5, iterations=10,
                                             kernel="const", normalization="none", unary_clip=None)
    assert CRF_PRESETS["deeplab"] == CRFConfig(gauss_sxy=1, gauss_compat=3, bilateral_sxy=67,
                                               bilateral_srgb=3, bilateral_compat=4, iterations=10,
                                               kernel="diag", normalization="symmetric", unary_clip=1e-5)
    assert CRF_PRESETS["paper"] != CRF_PRESETS["deeplab"]


def test_overrides_apply_to_the_preset():
    config = crf_config("deeplab", iterations=5, max_side=500)
    assert (config.iterations, config.max_side, config.bilateral_sxy) == (5, 500, 67)
    with pytest.raises(TypeError):
        crf_config("paper", no_such_field=1)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="deeplab") as err:
        crf_config("fast")
    assert "paper" in str(err.value)


def test_probs_must_match_the_image():
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="probs"):
        dense_crf(image, np.full((2, 12, 10), 0.5, np.float32), crf_config("paper"))


def test_uncertainty_is_the_share_of_pixels_whose_label_is_under_half():
    """6 of 20 pixels have a top probability of 0.4: uncertainty 0.3, from the
    argmax and from a CRF of no iterations (its distribution is `probs`); a real
    CRF gives the figure of its own, smoothed, distribution."""
    assert UNCERTAIN_BELOW == 0.5
    probs = np.zeros((3, 4, 5), np.float32)
    probs[:] = np.array([0.7, 0.2, 0.1], np.float32)[:, None, None]  # certain: 0.7, class 0
    low = [(0, 0), (0, 4), (1, 2), (2, 2), (3, 1), (3, 3)]
    for y, x in low:
        probs[:, y, x] = [0.35, 0.4, 0.25]  # class 1 with 0.4: uncertain
    image = np.full((4, 5, 3), 128, np.uint8)
    argmax = label_map(None, probs, None)
    assert argmax.uncertainty == pytest.approx(0.3) and argmax.labels.sum() == len(low)
    assert argmax.mean_confidence == pytest.approx((14 * 0.7 + 6 * 0.4) / 20)
    unrefined = label_map(image, probs, crf_config("paper", iterations=0))
    assert unrefined.uncertainty == pytest.approx(0.3)
    np.testing.assert_array_equal(unrefined.labels, argmax.labels)
    refined = label_map(image, probs, crf_config("deeplab"))  # the flat image pulls the odd pixels to class 0
    assert refined.uncertainty < 0.3 and (refined.labels == 0).all()
    labels, confidence, uncertainty = refined  # unpacks like a tuple
    assert uncertainty == pytest.approx(float((dense_crf(image, probs, crf_config("deeplab"))[1] < 0.5).mean()))
