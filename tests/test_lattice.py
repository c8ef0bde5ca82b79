"""The torch dense-CRF engine gives pydensecrf's labels and Q, for every
normalisation the presets use, clipped and unclipped unaries, one image or a
batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.inference import crf
from deconvnet.inference.crf import crf_config, unary_energy
from deconvnet.inference.lattice import build_lattice, lattice_filter, mean_field, torch_mean_field

CLASSES = 5
# Largest |Q_torch - Q_pydensecrf| measured on these maps is 2.3e-5 (1.9e-4 on
# the 500x375 photo of bench/crf_engines.py): float additions in another order.
Q_ATOL = 1e-4


def exact_pydensecrf(image, probs, config):
    """pydensecrf's (C, H, W) distribution, every label and step: what the torch engine computes."""
    return crf.mean_field(image, probs, dataclasses.replace(config, exact=True)).q


def scene(width: int, height: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) uint8 image of a few noisy coloured shapes and a (C, H, W)
    probability map as coarse as a network's: the one-hot labels downsampled
    8x, upsampled bilinearly, with noise on the logits; float16-rounded, so
    some probabilities are exactly 0 (the unclipped unary's 2**-126 floor)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width] / np.array([height, width])[:, None, None]
    labels = np.zeros((height, width), np.int64)
    labels[yy > 0.6 + 0.08 * np.sin(xx * 11)] = 1
    labels[(yy - 0.35) ** 2 + (xx - 0.3) ** 2 < 0.04] = 2
    labels[(np.abs(yy - 0.5) < 0.2) & (np.abs(xx - 0.72) < 0.12)] = 3
    labels[(yy > 0.75) & (np.abs(xx - 0.45) < 0.06)] = 4
    palette = rng.integers(0, 256, (CLASSES, 3))
    image = palette[labels] + rng.normal(0, 12, (height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    coarse = np.stack([np.asarray(Image.fromarray((labels == c).astype(np.float32))
                                  .resize((width // 8, height // 8), Image.BILINEAR)
                                  .resize((width, height), Image.BILINEAR))
                       for c in range(CLASSES)])  # (C, H, W)
    logits = 12 * coarse + rng.normal(0, 1.5, coarse.shape)
    probs = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    return image, probs.astype(np.float16).astype(np.float32)


SETTINGS = {
    # The release as `--inference original` runs it: no normalisation, const
    # kernel, unclipped -log p.
    "paper": crf_config("paper"),
    "paper clipped": crf_config("paper", unary_clip=1e-5),
    # The normalisation `--inference default` uses, pydensecrf's kernel default.
    "paper symmetric": crf_config("paper", normalization="symmetric", kernel="diag"),
    "deeplab": crf_config("deeplab"),
}


@pytest.mark.parametrize("size", [(64, 48), (120, 90)])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_torch_engine_gives_pydensecrfs_labels_and_q(size, setting):
    image, probs = scene(*size)
    config = SETTINGS[setting]
    expected = exact_pydensecrf(image, probs, config)  # (C, H, W), pydensecrf
    q = torch_mean_field(image, probs, config)
    assert q.shape == expected.shape and q.dtype == np.float32
    assert (q.argmax(0) == expected.argmax(0)).mean() >= 0.999
    np.testing.assert_allclose(q, expected, rtol=0, atol=Q_ATOL)
    # The CRF did something: the labels are not the unary's.
    assert (expected.argmax(0) != probs.argmax(0)).any()


@pytest.mark.parametrize("normalization", ["before", "after"])
def test_the_other_normalisations_match_too(normalization):
    image, probs = scene(64, 48, seed=1)
    config = crf_config("paper", normalization=normalization, iterations=5)
    expected = exact_pydensecrf(image, probs, config)
    np.testing.assert_allclose(torch_mean_field(image, probs, config), expected, atol=Q_ATOL)


def test_a_batch_gives_each_images_result():
    """Images batched share no lattice vertex: each comes out as it does alone."""
    config = crf_config("paper", iterations=3)
    scenes = [scene(64, 48, seed) for seed in (2, 3)]
    images = torch.from_numpy(np.stack([image for image, _ in scenes]))  # (2, H, W, 3)
    unary = torch.from_numpy(np.stack([unary_energy(p, None).reshape(p.shape)
                                       for _, p in scenes]))  # (2, C, H, W)
    batched = mean_field(images, unary, config)
    for i in range(2):
        alone = mean_field(images[i:i + 1], unary[i:i + 1], config)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=0, atol=1e-6)


def test_zero_iterations_is_the_softmax_of_the_unary():
    image, probs = scene(64, 48)
    config = crf_config("deeplab", iterations=0)
    np.testing.assert_allclose(torch_mean_field(image, probs, config),
                               exact_pydensecrf(image, probs, config), atol=1e-6)


def test_lattice_filter_approximates_the_gaussian_sum():
    """On points spread well apart the filter is about sum_j exp(-|f_i - f_j|^2 / 2)."""
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.uniform(0, 6, (300, 3)).astype(np.float32))
    approx = lattice_filter(build_lattice(features), torch.ones(300, 1))[:, 0]
    d2 = ((features[:, None] - features[None]) ** 2).sum(-1)
    exact = torch.exp(-d2 / 2).sum(1)
    assert torch.corrcoef(torch.stack([approx, exact]))[0, 1] > 0.9
    assert 0.5 < (approx / exact).median() < 2


def test_shapes_must_match():
    image, probs = scene(64, 48)
    unary = torch.from_numpy(unary_energy(probs, None).reshape(probs.shape))[None]
    with pytest.raises(ValueError, match="images"):
        mean_field(torch.from_numpy(image)[None, :40], unary, crf_config("paper"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_result():
    image, probs = scene(120, 90)
    for config in SETTINGS.values():
        cpu = torch_mean_field(image, probs, config)
        cuda = torch_mean_field(image, probs, config, device="cuda")
        assert (cpu.argmax(0) == cuda.argmax(0)).mean() >= 0.999
        np.testing.assert_allclose(cuda, cpu, atol=Q_ATOL)
