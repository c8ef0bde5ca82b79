"""Crop, forward in mixed batches, paste back and merge (deconvnet.inference.segmenter)."""

import numpy as np
import pytest
import torch

from deconvnet.model import PRESETS, DeconvNet, preset
from deconvnet.data.geometry import integer_boxes
from deconvnet.inference.segmenter import MergedMap, Segmenter, SegmenterConfig, crop_boxes
from deconvnet.weights import ModelInfo


def one_hot_map(c: int, cls: int, s: int) -> torch.Tensor:
    m = torch.zeros(c, s, s)
    m[cls] = 1
    return m


def paste(m: MergedMap, one: torch.Tensor, box: tuple[int, int, int, int]) -> None:
    """One (C, s, s) map into its box, through the batched paste."""
    m.paste_many(one[None], np.asarray([box], dtype=np.int64))


def test_max_merge_of_a_corner_box_and_two_overlapping_boxes():
    m = MergedMap(3, 6, 8, "max", "cpu")
    corner = one_hot_map(3, 1, 4) * 0.9  # class 1 at 0.9 in the top-left corner
    paste(m, corner, (0, 0, 3, 2))
    a = torch.zeros(3, 4, 4); a[2] = 0.6; a[0] = 0.4
    b = torch.zeros(3, 4, 4); b[2] = 0.3; b[0] = 0.7
    paste(m, a, (2, 1, 6, 5))
    paste(m, b, (4, 3, 8, 6))
    s = m.scores
    assert torch.allclose(s[1, :2, :3], torch.tensor(0.9)) and s[1, 2:].sum() == 0
    assert torch.allclose(s[2, 1:5, 2:6], torch.tensor(0.6))  # box a, max over b's 0.3 where they overlap
    assert torch.allclose(s[2, 5, 6:8], torch.tensor(0.3))  # only b
    assert torch.allclose(s[0, 3:5, 4:6], torch.tensor(0.7))  # overlap: max(0.4, 0.7)
    assert s[:, 5, 0].sum() == 0  # uncovered pixels stay at zero
    p = m.result()
    assert torch.allclose(p[:, 3, 4], torch.tensor([0.7, 0.0, 0.6]) / 1.3)


def test_mean_merge_averages_over_covering_proposals_only():
    m = MergedMap(2, 4, 4, "mean", "cpu")
    a = torch.zeros(2, 2, 2); a[1] = 0.8; a[0] = 0.2
    b = torch.zeros(2, 2, 2); b[1] = 0.4; b[0] = 0.6
    paste(m, a, (0, 0, 4, 4))
    paste(m, b, (2, 2, 4, 4))
    p = m.result()
    assert torch.allclose(p[1, 0, 0], torch.tensor(0.8))  # covered once
    assert torch.allclose(p[1, 3, 3], torch.tensor(0.6))  # (0.8 + 0.4) / 2


def paste_one_by_one(scores: torch.Tensor, count, probs: torch.Tensor, boxes: np.ndarray) -> None:
    """The definition: resize each map to its box, merge the part inside the image."""
    _, h, w = scores.shape
    for p, (x1, y1, x2, y2) in zip(probs, boxes.tolist()):
        ix1, iy1, ix2, iy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if ix1 >= ix2 or iy1 >= iy2:
            continue
        up = torch.nn.functional.interpolate(p[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                             align_corners=False)[0]
        part = up[:, iy1 - y1: iy2 - y1, ix1 - x1: ix2 - x1]
        if count is None:
            torch.maximum(scores[:, iy1:iy2, ix1:ix2], part, out=scores[:, iy1:iy2, ix1:ix2])
        else:
            scores[:, iy1:iy2, ix1:ix2] += part
            count[:, iy1:iy2, ix1:ix2] += 1


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_batched_paste_equals_pasting_one_proposal_at_a_time(aggregate):
    rng = np.random.default_rng(0)
    h, w, k = 37, 53, 40
    xy = rng.integers(-15, 50, (k, 2))
    wh = rng.choice([[8, 8], [16, 12], [30, 30], [5, 23]], k) + rng.integers(0, 2, (k, 2))  # repeated sizes
    boxes = np.concatenate([xy, xy + wh], 1)
    boxes[0] = (-30, -30, -10, -10)  # entirely outside
    probs = torch.rand(k, 4, 14, 14, generator=torch.Generator().manual_seed(0))
    batched = MergedMap(4, h, w, aggregate, "cpu")
    batched.paste_many(probs, boxes)
    ref = MergedMap(4, h, w, aggregate, "cpu")
    paste_one_by_one(ref.scores, ref.count, probs, boxes)
    if aggregate == "max":
        assert torch.equal(batched.scores, ref.scores)
    else:
        assert torch.equal(batched.count, ref.count)
        assert torch.allclose(batched.scores, ref.scores, atol=1e-5)
    assert torch.allclose(batched.result(), ref.result(), atol=1e-6)


def ramp(c: int, s: int) -> torch.Tensor:
    """(c, s, s) map whose value at (y, x) is 100*y + x, so positions are readable."""
    y, x = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    return (100 * y + x).float().expand(c, s, s).clone()


def test_paste_back_is_exact_for_a_box_touching_the_border():
    m = MergedMap(1, 10, 12, "max", "cpu")
    paste(m, ramp(1, 4), (8, 6, 12, 10))  # bottom-right corner, same size: no resampling
    assert torch.equal(m.scores[0, 6:10, 8:12], ramp(1, 4)[0])
    assert m.scores[0, :6].sum() == 0 and m.scores[0, :, :8].sum() == 0


def test_paste_back_is_exact_for_a_box_leaving_the_image():
    m = MergedMap(1, 10, 12, "max", "cpu")
    paste(m, ramp(1, 8) + 1, (-3, 5, 5, 13))  # 3 columns left of the image, 3 rows below it
    expect = ramp(1, 8)[0, :5, 3:] + 1  # rows 0..4 (image rows 5..9), columns 3..7 (image cols 0..4)
    assert torch.equal(m.scores[0, 5:10, 0:5], expect)
    assert m.scores.sum() == expect.sum()


def test_crop_outside_the_image_is_zero_and_inside_is_the_image():
    img = torch.arange(1, 3 * 16 * 16 + 1, dtype=torch.float32).reshape(3, 16, 16)
    crop = crop_boxes(img, np.array([[-4, -4, 12, 12], [2, 3, 10, 11]]), 16)[0]
    assert crop[:, :4].abs().sum() == 0 and crop[:, :, :4].abs().sum() == 0
    torch.testing.assert_close(crop[:, 4:, 4:], img[:, :12, :12], rtol=0, atol=1e-3)
    same = crop_boxes(img, np.array([[2, 3, 10, 11]]), 8)[0]
    torch.testing.assert_close(same, img[:, 3:11, 2:10], rtol=0, atol=1e-3)


def test_integer_boxes_round_and_keep_one_pixel():
    b = integer_boxes(np.array([[0.4, 0.6, 0.45, 10.5], [-3.2, 1, 7.7, 9]]))
    assert b.tolist() == [[0, 1, 1, 10], [-3, 1, 8, 9]]


@pytest.fixture(scope="module")
def tiny_segmenter():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = DeconvNet(cfg)
    with torch.no_grad():  # a non-trivial scorer so maps differ between proposals
        model.score.weight.normal_(std=1.0)
        model.score.bias.normal_()
    return lambda batch_size, aggregate="max": Segmenter(
        model, ModelInfo(config=cfg), SegmenterConfig(batch_size=batch_size, aggregate=aggregate), "cpu")


def _images_and_boxes():
    rng = np.random.default_rng(0)
    sizes = [(70, 90), (64, 64), (100, 50)]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
    boxes = []
    for h, w in sizes:
        xy = rng.uniform(-10, min(h, w) / 2, (4, 2))
        wh = rng.uniform(10, min(h, w) / 2, (4, 2))
        boxes.append(np.concatenate([np.c_[xy, xy + wh], [[0, 0, w, h]]]).astype(np.float32))
    return images, boxes


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_mixed_batches_equal_images_alone(tiny_segmenter, aggregate):
    images, boxes = _images_and_boxes()
    mixed = tiny_segmenter(batch_size=4, aggregate=aggregate).probabilities(images, boxes)  # batches span images
    alone = [tiny_segmenter(batch_size=5, aggregate=aggregate).probabilities([im], [b])[0]
             for im, b in zip(images, boxes)]
    for m, a, im in zip(mixed, alone, images):
        assert m.shape == (21, *im.shape[:2])
        np.testing.assert_allclose(m, a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.sum(0), 1, rtol=1e-5)


def test_same_input_gives_the_same_labels(tiny_segmenter):
    images, boxes = _images_and_boxes()
    seg = tiny_segmenter(batch_size=3)
    a = [p.argmax(0) for p in seg.probabilities(images, boxes)]
    b = [p.argmax(0) for p in seg.probabilities(images, boxes)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="aggregate"):
        SegmenterConfig(aggregate="median")
    with pytest.raises(ValueError, match="ensemble"):
        SegmenterConfig(ensemble="vote")


def test_segment_command_on_a_real_photograph(tmp_path):
    import subprocess
    import sys

    from corpus import PHOTO
    from PIL import Image

    from deconvnet.data.voc import decode_label_png
    from deconvnet.weights import save_model_dir
    save_model_dir(DeconvNet(PRESETS["tiny"]), str(tmp_path / "m"), ModelInfo(config=PRESETS["tiny"]))
    r = subprocess.run([sys.executable, "-m", "deconvnet", "segment", str(PHOTO), "--model", str(tmp_path / "m"),
                        "--max-proposals", "10", "--out", str(tmp_path / "p.png"),
                        "--overlay", str(tmp_path / "o.jpg")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    w, h = Image.open(PHOTO).size
    assert decode_label_png((tmp_path / "p.png").read_bytes()).shape == (h, w)
    assert Image.open(tmp_path / "o.jpg").size == (w, h)
    assert "11 proposals" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "deconvnet", "segment", str(tmp_path / "p.png.missing"),
                          "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("rule", ["mean", "product"])
def test_edeconvnet_combines_with_fcn8s_by_the_named_rule(rule):
    from deconvnet.model import FCN8s
    torch.manual_seed(0)
    cfg, fcfg = PRESETS["tiny"], PRESETS["fcn8s-tiny"]
    deconv, fcn = DeconvNet(cfg).eval(), FCN8s(fcfg).eval()
    with torch.no_grad():
        fcn.score_fr.weight.normal_(std=1.0)  # FCN-8s scores start at zero: make them say something
    images, boxes = _images_and_boxes()
    config = SegmenterConfig(batch_size=4, ensemble=rule)
    alone = Segmenter(deconv, ModelInfo(config=cfg), config, "cpu").probabilities(images, boxes)
    both = Segmenter(deconv, ModelInfo(config=cfg), config, "cpu",
                     fcn=(fcn, ModelInfo(config=fcfg))).probabilities(images, boxes)
    for a, b, im in zip(alone, both, images):
        x = torch.from_numpy(im).permute(2, 0, 1).float()[None]
        mean = torch.tensor(ModelInfo(config=fcfg).mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(ModelInfo(config=fcfg).std).view(1, 3, 1, 1) * 255
        with torch.inference_mode():
            f = fcn((x - mean) / std).softmax(1)[0].numpy()  # (C, H, W)
        expect = (a + f) / 2 if rule == "mean" else a * f / (a * f).sum(0, keepdims=True)
        np.testing.assert_allclose(b, expect, rtol=1e-4, atol=1e-6)
        assert not np.allclose(a, b, atol=1e-3)


def test_fcn_model_with_other_classes_is_refused():
    from deconvnet.model import FCN8s
    fcfg = preset("fcn8s-tiny", num_classes=3)
    with pytest.raises(ValueError, match="classes"):
        Segmenter(DeconvNet(PRESETS["tiny"]), ModelInfo(config=PRESETS["tiny"]), SegmenterConfig(), "cpu",
                  fcn=(FCN8s(fcfg), ModelInfo(config=fcfg, classes=("a", "b", "c"))))
