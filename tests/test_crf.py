"""Dense CRF: it sharpens a coarse probability map along colour edges; presets,
overrides and the reduced-resolution path; the exact computation against label
pruning and early stopping, and `--crf-exact` from both command lines;
`label_map`'s confidence and uncertainty."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.eigen as eigen
import pytest
import torch
from PIL import Image

from deconvnet.inference import for_mode
from deconvnet.inference.crf import (BOUND_SLACK, CRF_PRESETS, PRUNE_EPS, UNCERTAIN_BELOW, KERNELS, NORMALIZATIONS,
                                     CRFConfig, _pairwise_bound, crf_config, dense_crf, label_map, mean_field,
                                     prunable, unary_energy)

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


@pytest.mark.parametrize("preset", sorted(CRF_PRESETS))
def test_the_torch_engine_gives_pydensecrfs_labels(two_regions, preset):
    """engine "torch" (lattice.py, here on the CPU; every label and step) against
    pydensecrf's exact computation on the CPU, full size and through max_side;
    pydensecrf runs on the CPU only."""
    image, _, probs = two_regions
    for config in (crf_config(preset, exact=True), crf_config(preset, exact=True, max_side=48)):
        expected, confidence = dense_crf(image, probs, config)
        labels, torch_confidence = dense_crf(image, probs, config, engine="torch")
        assert (labels == expected).mean() >= 0.999
        np.testing.assert_allclose(torch_confidence, confidence, atol=1e-3)
    with pytest.raises(ValueError, match="`engine` 'pydensecrf' on `device` 'cuda'"):
        dense_crf(image, probs, crf_config(preset), device="cuda", engine="pydensecrf")


def test_presets_differ_and_match_their_sources():
    assert CRF_PRESETS["paper"] == CRFConfig(gauss_sxy=3, gauss_compat=3, bilateral_sxy=20,
                                             bilateral_srgb=3, bilateral_compat=5, iterations=10,
                                             kernel="const", normalization="none", unary_clip=None)
    assert CRF_PRESETS["deeplab"] == CRFConfig(gauss_sxy=1, gauss_compat=3, bilateral_sxy=67,
                                               bilateral_srgb=3, bilateral_compat=4, iterations=10,
                                               kernel="diag", normalization="symmetric", unary_clip=1e-5)
    assert not CRF_PRESETS["paper"].exact and not CRF_PRESETS["deeplab"].exact  # a preset prunes unless told
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


# --- exact vs label pruning and early stopping -------------------------------

SH, SW, CLASSES = 72, 96, 21


@pytest.fixture(scope="module")
def three_classes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A structured 21-class map: a sky, a ground and a round object of their own
    colours (classes 0, 15, 7), the one-hot map blurred 8x as a network's, with
    smooth noise on those three and on two absent, confusable classes (3, 9), the
    other 16 classes far below: (image, truth, (21, H, W) probabilities)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:SH, :SW]
    truth = np.where(yy < SH * 0.45 + 6 * np.sin(xx / 9), 0, 15).astype(np.uint8)
    truth[(yy - 44) ** 2 + (xx - 60) ** 2 < 15 ** 2] = 7
    colours = np.zeros((CLASSES, 3))
    colours[[0, 15, 7]] = [[90, 150, 230], [80, 120, 50], [200, 60, 60]]
    image = np.clip(colours[truth] + rng.normal(0, 8, (SH, SW, 3)), 0, 255).astype(np.uint8)
    one_hot = torch.from_numpy(np.eye(CLASSES, dtype=np.float32)[truth].transpose(2, 0, 1))[None]
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(one_hot, 8), size=(SH, SW),
                                              mode="bilinear", align_corners=False)[0].numpy()
    noisy = [0, 3, 7, 9, 15]
    logits = np.full_like(blurred, -8.0)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.normal(0, 1, (1, 5, 4, 5)).astype(np.float32)),
                                             size=(SH, SW), mode="bicubic", align_corners=False)[0].numpy()
    logits[noisy] = 12 * blurred[noisy] + 1.5 * smooth
    return image, truth, torch.softmax(torch.from_numpy(logits), 0).numpy()


def crf_of(image: np.ndarray, config: CRFConfig, c: int) -> dcrf.DenseCRF2D:
    """A pydensecrf CRF with `config`'s two kernels on `image`, no unary yet."""
    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, c)
    kernel, norm = KERNELS[config.kernel], NORMALIZATIONS[config.normalization]
    crf.addPairwiseGaussian(sxy=config.gauss_sxy, compat=config.gauss_compat, kernel=kernel, normalization=norm)
    crf.addPairwiseBilateral(sxy=config.bilateral_sxy, srgb=config.bilateral_srgb, rgbim=np.array(image),
                             compat=config.bilateral_compat, kernel=kernel, normalization=norm)
    return crf


def exact_steps(image: np.ndarray, unary: np.ndarray, config: CRFConfig):
    """The exact CRF's (C, N) Q before its first step and after each of `config.iterations`."""
    crf = crf_of(image, config, len(unary))
    crf.setUnaryEnergy(unary)
    q, tmp1, tmp2 = crf.startInference()
    yield np.asarray(q).copy()
    for _ in range(config.iterations):
        crf.stepInference(q, tmp1, tmp2)
        yield np.asarray(q).copy()


def todays_crf(image: np.ndarray, probs: np.ndarray, config: CRFConfig) -> np.ndarray:
    """The computation before pruning existed, written out: every label, `iterations` steps."""
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary_energy(probs, config.unary_clip))
    kernel, norm = KERNELS[config.kernel], NORMALIZATIONS[config.normalization]
    crf.addPairwiseGaussian(sxy=config.gauss_sxy, compat=config.gauss_compat, kernel=kernel, normalization=norm)
    crf.addPairwiseBilateral(sxy=config.bilateral_sxy, srgb=config.bilateral_srgb, rgbim=np.array(image),
                             compat=config.bilateral_compat, kernel=kernel, normalization=norm)
    return np.asarray(crf.inference(config.iterations), dtype=np.float32).reshape(c, h, w)


@pytest.mark.parametrize("mode", ["default", "original"])
@pytest.mark.parametrize("preset", sorted(CRF_PRESETS))
def test_exact_and_original_are_todays_computation_bit_for_bit(three_classes, preset, mode):
    image, _, probs = three_classes
    config = dataclasses.replace(for_mode(mode, crf=preset).crf, exact=True)
    if mode == "original":
        assert for_mode(mode, crf=preset).crf == config  # original is exact without being told
    q = todays_crf(image, probs, config)
    labels, confidence = dense_crf(image, probs, config)
    np.testing.assert_array_equal(labels, q.argmax(0))
    np.testing.assert_array_equal(confidence, q.max(0))
    assert mean_field(image, probs, config).steps == config.iterations


def test_pruning_and_early_stopping_agree_with_exact(three_classes):
    image, truth, probs = three_classes
    fast = for_mode("default").crf
    assert not fast.exact and fast.stop_changed is not None
    result = mean_field(image, probs, fast)
    exact = todays_crf(image, probs, dataclasses.replace(fast, exact=True))
    assert set(result.kept) <= {0, 3, 7, 9, 15} and len(result.kept) < CLASSES  # the 16 far-off are pruned
    assert result.steps < fast.iterations
    assert (result.q.argmax(0) == exact.argmax(0)).mean() >= 0.995
    np.testing.assert_allclose(result.q.sum(0), 1, atol=1e-5)  # a distribution over all 21 classes again
    labels, confidence = dense_crf(image, probs, fast)
    assert labels.shape == (SH, SW) and confidence.dtype == np.float32
    assert (labels == truth).mean() > (probs.argmax(0) == truth).mean() - 0.01


@pytest.mark.parametrize("preset", sorted(CRF_PRESETS))
def test_a_pruned_label_never_wins(three_classes, preset):
    """A label the bound prunes gets no pixel from the exact CRF, and every
    label's pairwise gain (logit + unary after a step) is within [0, B(i)] at
    every pixel."""
    image, _, probs = three_classes
    config = dataclasses.replace(for_mode("default", crf=preset).crf, stop_changed=None)
    kept = mean_field(image, probs, config).kept
    pruned = sorted(set(range(CLASSES)) - set(kept))
    assert pruned
    exact = todays_crf(image, probs, dataclasses.replace(config, exact=True))
    assert not np.isin(exact.argmax(0), pruned).any()
    # Every label's gain after steps of the exact CRF, against B(i).
    c, h, w = probs.shape
    unary = unary_energy(probs, config.unary_clip)
    crf = crf_of(image, config, c)
    bound = _pairwise_bound(crf, h * w)
    crf.setUnaryEnergy(unary)
    q, logits, scratch = crf.startInference()
    logits = eigen.matrixXf(np.zeros((c, h * w), np.float32))
    for _ in range(3):
        crf.stepInference(q, logits, scratch)
        gain = np.asarray(logits) + unary
        assert gain.min() >= -1e-4 and (gain <= bound * (1 + BOUND_SLACK[0]) + BOUND_SLACK[1]).all()


@pytest.fixture(scope="module")
def far_labels() -> tuple[np.ndarray, np.ndarray]:
    """A random 40x48 image and a (9, H, W) map: 3 labels with smooth random
    logits, and 6 whose logit is 1.5, 2.5, 3.5, 5, 6.5 and 8 (plus up to 0.5)
    under the best of those 3 at every pixel: what a trained network gives
    classes it did not see (models/demo's are 4.0-4.3 under the best)."""
    rng = np.random.default_rng(3)
    h, w = 40, 48
    image = torch.nn.functional.interpolate(torch.from_numpy(rng.uniform(0, 255, (1, 3, 5, 6)).astype(np.float32)),
                                            size=(h, w), mode="bicubic", align_corners=False)[0]
    image = np.clip(image.numpy().transpose(1, 2, 0) + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    near = 3 * torch.nn.functional.interpolate(torch.from_numpy(rng.normal(0, 1, (1, 3, 4, 5)).astype(np.float32)),
                                               size=(h, w), mode="bicubic", align_corners=False)[0].numpy()
    far = near.max(0) - (np.array([1.5, 2.5, 3.5, 5, 6.5, 8])[:, None, None] + rng.uniform(0, 0.5, (6, h, w)))
    logits = np.concatenate([near, far]).astype(np.float32)
    return image, torch.softmax(torch.from_numpy(logits), 0).numpy()


@pytest.mark.parametrize("preset", sorted(CRF_PRESETS))
def test_the_eps_bound_is_sound(far_labels, preset):
    """`prunable` leaves out the labels the bound names, more than the plain bound
    (d_l > B everywhere); in the exact CRF each has Q <= eps at every pixel before
    and after every step (eps: the smallest of PRUNE_EPS its unary meets) and
    never the largest Q; and the pruned CRF's labels are the exact ones."""
    image, probs = far_labels
    config = dataclasses.replace(for_mode("default", crf=preset).crf, normalization=CRF_PRESETS[preset].normalization,
                                 stop_changed=None, iterations=6)
    c, h, w = probs.shape
    unary = unary_energy(probs, config.unary_clip)
    bound = _pairwise_bound(crf_of(image, config, c), h * w)
    pruned = np.flatnonzero(prunable(unary, bound))
    gap = unary - unary.min(0)
    slacked = bound * (1 + BOUND_SLACK[0]) + BOUND_SLACK[1]
    plain = (gap > slacked).all(1)
    meets = {int(l): [e for e in PRUNE_EPS if e < 1 and (gap[l] >= e * slacked + np.log(1 / e)).all()]
             for l in range(c)}
    assert set(pruned) == {l for l in range(c) if meets[l] or plain[l]}
    assert set(pruned) > set(np.flatnonzero(plain)) and {0, 1, 2, 3, 4}.isdisjoint(pruned)
    eps = {l: min(meets[l]) for l in pruned if meets[l]}
    assert max(eps.values()) < 0.5
    for q in exact_steps(image, unary, config):
        assert not np.isin(q.argmax(0), pruned).any()
        for label, e in eps.items():
            assert q[label].max() <= e * (1 + 1e-4)
    exact = todays_crf(image, probs, dataclasses.replace(config, exact=True)).argmax(0)
    assert (mean_field(image, probs, config).q.argmax(0) == exact).mean() >= 0.999


def test_early_stopping_stops_when_labels_settle(two_regions):
    image, _, probs = two_regions
    config = crf_config("deeplab", stop_changed=0.0)  # stop at the first step that changes no label
    stopped = mean_field(image, probs, config)
    assert 1 <= stopped.steps < config.iterations
    full = mean_field(image, probs, dataclasses.replace(config, stop_changed=None))
    assert full.steps == config.iterations
    before = mean_field(image, probs, dataclasses.replace(config, stop_changed=None, iterations=stopped.steps - 1))
    np.testing.assert_array_equal(stopped.q.argmax(0), before.q.argmax(0))  # its last step changed nothing
    assert (stopped.q.argmax(0) == full.q.argmax(0)).mean() > 0.99


def test_early_stopping_weighs_a_steps_changes_by_the_steps_left(three_classes):
    """The default stops after the first step whose share of labels changed, times
    the steps still to run, is at most `stop_changed`: not at one step earlier."""
    image, _, probs = three_classes
    config = for_mode("default").crf
    stopped = mean_field(image, probs, config)
    assert 2 <= stopped.steps < config.iterations
    labels = [mean_field(image, probs, dataclasses.replace(config, stop_changed=None, iterations=k)).q.argmax(0)
              for k in range(1, stopped.steps + 1)]
    np.testing.assert_array_equal(labels[-1], stopped.q.argmax(0))
    weighed = [(a != b).mean() * (config.iterations - k) for k, (a, b) in enumerate(zip(labels, labels[1:]), 2)]
    assert weighed[-1] <= config.stop_changed < min(weighed[:-1], default=np.inf)


def test_config_checks_stop_changed():
    with pytest.raises(ValueError, match="`stop_changed`"):
        crf_config("paper", stop_changed=1.5)


def test_crf_exact_reaches_the_config_from_both_command_lines(tmp_path, tiny_model, monkeypatch):
    from deconvnet.__main__ import main
    from deconvnet.inference import crf
    from jobs import segment_dataset

    Image.new("RGB", (40, 30), (120, 80, 40)).save(tmp_path / "a.jpg")
    base = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", tiny_model]
    assert segment_dataset.parse_config(base).inference_config().crf.exact is False
    job = segment_dataset.parse_config([*base, "--crf-exact"])
    assert job.crf_exact is True and job.inference_config().crf.exact is True
    assert job.record()["crf_exact"] is True
    assert segment_dataset.parse_config([*base, "--inference", "original"]).record()["crf_exact"] is True

    seen = []
    real = crf.label_map
    monkeypatch.setattr(crf, "label_map", lambda image, probs, config: seen.append(config) or real(
        image, probs, dataclasses.replace(config, iterations=1)))
    for extra in ([], ["--crf-exact"]):
        assert main(["segment", str(tmp_path / "a.jpg"), "--model", tiny_model, "--out", str(tmp_path / "o.png"),
                     "--max-proposals", "1", *extra]) == 0
    assert [c.exact for c in seen] == [False, True]


def test_one_class_left_needs_no_step():
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    probs = np.full((CLASSES, 20, 24), 1e-7, np.float32)
    probs[4] = 1 - 20e-7
    result = mean_field(image, probs, crf_config("deeplab"))
    assert list(result.kept) == [4] and result.steps == 0
    assert (result.q.argmax(0) == 4).all() and np.allclose(result.q.sum(0), 1)
