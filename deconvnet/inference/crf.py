"""Fully connected CRF (Krahenbuhl and Koltun, NIPS 2011) on a merged probability map.

The last step of DeconvNet's inference: the class probabilities merged over
all proposals become unary potentials (-log p), a Gaussian kernel over pixel
positions and a bilateral kernel over positions and RGB colours pull nearby,
similar pixels to the same label, and a few mean-field iterations give a
refined distribution whose argmax is the label map. Runs on the CPU through
pydensecrf2 (imported as `pydensecrf`), which wraps the same C++ (Krahenbuhl's
densecrf 2.x) as the release's MATLAB wrapper johannesu/meanfield-matlab.

Besides the kernels' stds and weights, a preset fixes three things the two
wrappers default differently:
- `normalization`: meanfield-matlab's `Densecrf.m` defaults to
  `NormalizationType = 'NO_NORMALIZATION'`: a pixel's message is the plain
  (lattice-approximated) Gaussian-weighted sum of its neighbours' Q, so the
  pairwise pull grows with how many similar pixels surround it.
  pydensecrf defaults to `NORMALIZE_SYMMETRIC` (divide by sqrt(kernel sum) on
  both sides; the pull is a weighted average, at most the kernel's weight).
- `kernel`: meanfield-matlab's `densecrf_mex.cpp` hard-codes `CONST_KERNEL`,
  pydensecrf defaults to `DIAG_KERNEL`. The two differ only in which feature
  weights are learnable; inference gives the same result (DIAG starts at 1).
- `unary_clip`: the release passes `-log(p)` unclipped
  (inference/generate_EDeconvNet_CRF_results.m: `unary = -log(prob_map)`);
  pydensecrf's `unary_from_softmax` clips p at 1e-5 (unary <= 11.5). With
  None, p is floored only at float32's smallest normal, 2**-126, so the unary
  stays finite (<= 87.3): a p of exactly 0, e.g. a probability under 2**-25
  rounded to 0 in the pipeline's float16 maps, would otherwise give +inf.

`max_side` trades accuracy for speed on big images: the CRF then runs on the
image and probabilities downscaled to that longer side, and its output
distribution is upsampled bilinearly to full size before the argmax, so labels
and confidence come back at full size. The kernel parameters stay in pixels of
the image the CRF runs on: at 500 px that is the size of a PASCAL VOC image,
for which the presets were tuned. Scaling the spatial stds with the image
instead ran slower and agreed less with the full-size CRF (bench/crf.py).

`exact` False (what `--inference default` runs) saves work without changing
the model, two ways (`mean_field`):
- Label pruning. Under the Potts model label l's update at pixel i is
  Q_l(i) = exp(-U_l(i) + g_l(i)) / Z(i), with the pairwise gain
  g_l(i) = sum over kernels k of w_k (K_k Q_l)(i). Each K_k here (the
  permutohedral lattice's splat, blur and slice, with any normalisation's
  positive diagonal scaling) is linear with nonnegative weights, so
  Q_l <= eps everywhere gives 0 <= g_l(i) <= eps B(i), where
  B(i) = sum_k w_k (K_k 1)(i) is the kernels' filtered ones, computed with
  the same lattice (one step of a one-label CRF from Q = 1), not estimated.
  Under NORMALIZE_SYMMETRIC, B(i) is about sum_k w_k but not at most it
  (d_i^-1/2 sum_j k_ij d_j^-1/2 exceeds 1 where a pixel's neighbours have
  fewer similar pixels than it has: 0.47 to 1.22 sum_k w_k, median 1.00, on
  bench/crf.py's photographs at 500x375), hence B measured per pixel.
  The bound: with d_l(i) = U_l(i) - U_b(i), b the pixel's best (lowest)
  unary, if for one eps in (0, 1)
      d_l(i) >= eps B(i) + ln(1/eps)   at every pixel i,
  then in the exact CRF Q_l(i) <= eps at every pixel after every step, and
  l wins no pixel. By induction: the first Q is softmax(-U), so
  Q_l(i) <= exp(-d_l(i)) <= eps; if Q_l <= eps everywhere, g_l <= eps B,
  and Z(i) >= exp(-U_b(i) + g_b(i)) >= exp(-U_b(i)) (gains are >= 0), so
  the next Q_l(i) <= exp(-d_l(i) + eps B(i)) <= eps; and l's logit is
  below b's by at least d_l - eps B >= ln(1/eps) > 0. eps = 1 is the
  plain bound d_l(i) > B(i) (then only "never wins" holds). Labels meet
  through Z alone, so each label takes its own eps: `prunable` tries
  PRUNE_EPS, 1/eps near B first, where the threshold is lowest, about
  1 + ln B (3.1 for B = 8, where the plain bound needs 8). B carries a
  rounding slack (BOUND_SLACK). Labels that meet it are left out of the CRF;
  afterwards each gets back the probability exp(-U_l) of a label with no
  pairwise support, and the distribution is renormalised over all C.
  Without the left-out labels the kept ones are normalised without their
  mass (at most eps each), so their result can differ from the exact CRF's
  slightly (bench/crf.py measures how much); the pruned labels never win.
  Carrying that mass as one more row (unary -log sum_l exp(-U_l)) changed
  no label after the early stop on bench/crf.py's `demo` and `peaked` maps
  (at most 0.01% of them after 10 steps; 2026-12-01), for the cost of a row
  and its exp, so it is not done.
- Early stopping: the steps stop as soon as one (the second or later)
  changes a share of the labels that, times the steps still to run, is at
  most `stop_changed` (0: stop only at a step that changes none). The
  exact CRF runs all `iterations` steps, so what stopping costs is the
  labels the steps left would still change; a step's changes shrink as the
  labels settle, so the last step's share times the steps left estimates
  that from above (on bench/crf.py's `demo` maps; it is no bound). With
  the default 0.005 a step changing 0.1% of the labels stops with 5 steps
  left, not with 6 or more. Mean-field labels settle with a long thin tail
  (a few pixels along edges flip for several steps), so 0 rarely stops
  before the last step. On bench/crf.py's `demo` maps (a trained
  network's) 99.64% or more of the labels were the exact CRF's on each
  photograph at both sizes, 6-8 steps (docs/performance.md, 2026-12-01).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.eigen as eigen
import torch
import torch.nn.functional as F

from ..checks import Problems
from ..data.imageio import downscale
from .lattice import torch_mean_field

KERNELS = {"const": dcrf.CONST_KERNEL, "diag": dcrf.DIAG_KERNEL, "full": dcrf.FULL_KERNEL}
NORMALIZATIONS = {"none": dcrf.NO_NORMALIZATION, "before": dcrf.NORMALIZE_BEFORE,
                  "after": dcrf.NORMALIZE_AFTER, "symmetric": dcrf.NORMALIZE_SYMMETRIC}
# The mean-field engines: the release's C++ through pydensecrf (CPU), or lattice.py's torch port.
CRF_ENGINES = ("pydensecrf", "torch")
# The floor of p when the unary is not clipped: float32's smallest normal, so
# -log p <= 87.34 instead of +inf for p == 0.
UNCLIPPED_FLOOR = float(np.finfo(np.float32).tiny)
# Added to the pairwise bound before pruning: float32 rounding of the lattice's
# sums of Q against its sum of ones (relative and absolute).
BOUND_SLACK = (1e-3, 1e-3)
# The eps the pruning bound tries per label (module docstring): 1, 2**-0.5, ..., 2**-12,
# so that 1/eps comes within a factor 1.42 of any B(i) up to 4096.
PRUNE_EPS = tuple(2.0 ** -k for k in np.arange(0, 12.5, 0.5))


@dataclass(frozen=True)
class CRFConfig:
    """One CRF's settings; `CRF_PRESETS` holds the named ones, and each
    inference mode says what it changes in them (`deconvnet.inference.modes`)."""
    gauss_sxy: float               # smoothness kernel: position std, pixels
    gauss_compat: float            # smoothness kernel weight
    bilateral_sxy: float           # appearance kernel: position std, pixels
    bilateral_srgb: float          # appearance kernel: colour std, 0-255 units
    bilateral_compat: float        # appearance kernel weight
    iterations: int                # mean-field steps; 10 in the release and in DeepLab
    kernel: str                    # a key of KERNELS (module docstring)
    normalization: str             # a key of NORMALIZATIONS
    unary_clip: float | None       # floor of p before -log p; None: unclipped, as the release
    max_side: int | None = None    # run at most this longer side (module docstring); None: full
    exact: bool = False            # True: every label, every step (the release's computation);
                                   # False: prune labels that cannot win, stop when labels settle
    stop_changed: float | None = 0.005  # not exact: stop after a step whose share of labels changed,
                                        # times the steps left, is at most this; None: run every step

    def __post_init__(self) -> None:
        problems = Problems(self)
        problems.one_of("kernel", sorted(KERNELS))
        problems.one_of("normalization", sorted(NORMALIZATIONS))
        problems.check("unary_clip", self.unary_clip is None or 0 < self.unary_clip < 1, "must be in (0, 1) or None")
        problems.at_least("iterations", 0)
        problems.at_least("max_side", 1, none_ok=True)
        problems.check("stop_changed", self.stop_changed is None or 0 <= self.stop_changed < 1,
                       "must be in [0, 1) or None")
        problems.raise_any()


CRF_PRESETS: dict[str, CRFConfig] = {
    # The DeconvNet release (HyeonwooNoh/DeconvNet inference/generate_EDeconvNet_CRF_results.m):
    # Gaussian xy 3 / weight 3, bilateral xy 20, rgb 3, weight 5, 10 iterations, unary
    # -log(prob_map) unclipped; johannesu/meanfield-matlab (Densecrf.m, include/densecrf_mex.cpp):
    # NO_NORMALIZATION, CONST_KERNEL.
    "paper": CRFConfig(gauss_sxy=3, gauss_compat=3, bilateral_sxy=20, bilateral_srgb=3, bilateral_compat=5,
                       iterations=10, kernel="const", normalization="none", unary_clip=None),
    # DeepLab's published defaults, weight/std: pos 3/1, bilateral 4/67/3
    # (pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3). Kernel,
    # normalisation and unary clip are pydensecrf's defaults.
    "deeplab": CRFConfig(gauss_sxy=1, gauss_compat=3, bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4,
                         iterations=10, kernel="diag", normalization="symmetric", unary_clip=1e-5),
}


def crf_config(preset: str, **overrides: float | int | None) -> CRFConfig:
    """A preset from `CRF_PRESETS` with any of its fields replaced."""
    if preset not in CRF_PRESETS:
        raise ValueError(f"unknown CRF preset {preset!r}; choose one of {sorted(CRF_PRESETS)}")
    return dataclasses.replace(CRF_PRESETS[preset], **overrides)


# A pixel is uncertain when the probability of its label, the top one of the
# distribution the labels are the argmax of, is under this.
UNCERTAIN_BELOW = 0.5


class LabelMap(NamedTuple):
    """What `label_map` gives: the labels and two per-image figures."""
    labels: np.ndarray      # (H, W) uint8
    mean_confidence: float  # mean over pixels of the label's probability
    uncertainty: float      # share of pixels whose label's probability is under UNCERTAIN_BELOW


def label_map(image: np.ndarray | None, probs: np.ndarray, crf: CRFConfig | None,
              device: str | torch.device = "cpu", engine: str | None = None) -> LabelMap:
    """The last step of inference, the one place it is chosen: (C, H, W)
    probabilities -> (H, W) uint8 labels with their mean confidence and
    uncertainty, through the dense CRF on the (H, W, 3) uint8 `image` (`device`,
    `engine`: dense_crf's), or, with `crf` None, the argmax of `probs` (no image
    needed). Both figures come from the distribution the labels are the argmax
    of: the CRF's, or `probs`."""
    if crf is None:
        labels, confidence = probs.argmax(0).astype(np.uint8), probs.max(0)
    else:
        labels, confidence = dense_crf(image, probs, crf, device=device, engine=engine)
    return LabelMap(labels, float(confidence.mean()), float((confidence < UNCERTAIN_BELOW).mean()))


def dense_crf(image: np.ndarray, probs: np.ndarray, config: CRFConfig, device: str | torch.device = "cpu",
              engine: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Refine class probabilities with a dense CRF.

    image: (H, W, 3) uint8 RGB. probs: (C, H, W) probabilities summing to 1
    over C, C <= 255. Returns `(labels, confidence)`: the (H, W) uint8 argmax of
    the CRF's output distribution and the (H, W) float32 probability it gives
    that label, so `confidence.mean()` is the image's mean confidence.
    engine: a key of CRF_ENGINES; None: "pydensecrf" on the CPU, "torch" on any
    other `device` ("cuda", "cuda:1", ...). "pydensecrf" runs `mean_field`
    (pruned and stopped early unless `config.exact`) on the CPU only; "torch"
    runs lattice.py's engine on `device`, CPU included, every label and step.
    """
    engine = engine or ("pydensecrf" if torch.device(device).type == "cpu" else "torch")
    if engine not in CRF_ENGINES or (engine == "pydensecrf" and torch.device(device).type != "cpu"):
        raise ValueError(f"`engine` {engine!r} on `device` {str(device)!r}: pydensecrf runs on the CPU, "
                         f"torch on any device; engines: {sorted(CRF_ENGINES)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, "
                         f"got {probs.shape}")
    if not 1 <= probs.shape[0] <= 255:
        raise ValueError("1 to 255 classes fit a uint8 label map (255 = ignore), "
                         f"got {probs.shape[0]}")

    def run(image: np.ndarray, probs: np.ndarray) -> np.ndarray:  # the engine's (C, h, w) distribution
        if engine == "torch":
            return torch_mean_field(image, probs, config, device=device)
        return mean_field(image, probs, config).q

    h, w = image.shape[:2]
    if config.max_side is None or max(h, w) <= config.max_side:
        q = run(image, probs)  # (C, H, W)
    else:
        small, _ = downscale(image, config.max_side)
        q = run(small, _resize(probs, small.shape[:2], antialias=True))  # (C, h, w)
        q = _resize(q, (h, w), antialias=False)  # (C, H, W)
    return q.argmax(axis=0).astype(np.uint8), q.max(axis=0)


def unary_energy(probs: np.ndarray, clip: float | None) -> np.ndarray:
    """(C, H, W) probabilities -> (C, H*W) float32 unary -log p, p floored at
    `clip` (None: at UNCLIPPED_FLOOR, so p == 0 stays finite)."""
    p = np.asarray(probs, dtype=np.float32).reshape(probs.shape[0], -1)
    floor = UNCLIPPED_FLOOR if clip is None else clip
    return np.ascontiguousarray(-np.log(np.clip(p, floor, 1.0)))


class MeanField(NamedTuple):
    """`mean_field`'s result: the (C, H, W) float32 distribution, the steps run
    and the labels the CRF ran over (all C when nothing was pruned)."""
    q: np.ndarray
    steps: int
    kept: np.ndarray


def mean_field(image: np.ndarray, probs: np.ndarray, config: CRFConfig) -> MeanField:
    """pydensecrf's inference on (C, H, W) probabilities: with `config.exact`,
    all `config.iterations` steps over every label, as the release; else over
    the labels that can win, stopping when the labels settle (module docstring)."""
    c, h, w = probs.shape
    unary = unary_energy(probs, config.unary_clip)  # (C, H*W)
    crf = dcrf.DenseCRF2D(w, h, c)
    kernel, norm = KERNELS[config.kernel], NORMALIZATIONS[config.normalization]
    crf.addPairwiseGaussian(sxy=config.gauss_sxy, compat=config.gauss_compat,
                            kernel=kernel, normalization=norm)
    # pydensecrf takes C-contiguous, writable buffers only (an image decoded by PIL is read-only).
    rgb = np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])  # (H, W, 3)
    crf.addPairwiseBilateral(sxy=config.bilateral_sxy, srgb=config.bilateral_srgb,
                             rgbim=rgb, compat=config.bilateral_compat,
                             kernel=kernel, normalization=norm)
    if config.exact:
        crf.setUnaryEnergy(unary)
        q = np.asarray(crf.inference(config.iterations), dtype=np.float32).reshape(c, h, w)
        return MeanField(q, config.iterations, np.arange(c))
    # The lattices are built once; each unary below is a ConstUnary of its own label
    # count (pydensecrf's stepInference works on whatever rows Q and the unary have).
    bound = _pairwise_bound(crf, h * w)  # (H*W,)
    kept = np.flatnonzero(~prunable(unary, bound))
    crf.setUnary(dcrf.ConstUnary(np.ascontiguousarray(unary[kept])))
    q, _, scratch = crf.startInference()
    logits = eigen.matrixXf(-unary[kept])  # our own, sized, so numpy sees the logits stepInference writes
    labels, steps = None, 0
    while steps < config.iterations and len(kept) > 1:  # one label left: it is the answer
        crf.stepInference(q, logits, scratch)
        steps += 1
        if config.stop_changed is None:
            continue
        settled = np.asarray(q).argmax(axis=0)  # about 1/10 of a 21-label step
        # The labels the steps left could still change, at this step's rate (module docstring).
        if labels is not None and (settled != labels).mean() * (config.iterations - steps) <= config.stop_changed:
            break
        labels = settled
    full = -unary  # pruned labels: no pairwise gain
    full[kept] = np.asarray(logits)
    full -= full.max(axis=0)
    np.exp(full, out=full)
    full /= full.sum(axis=0)
    return MeanField(full.reshape(c, h, w), steps, kept)


def prunable(unary: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """(C,) bool: the labels the bound leaves out (module docstring). unary: (C, N)
    float32; bound: (N,) B(i). Label l goes when, for one eps of PRUNE_EPS,
    d_l(i) = U_l(i) - min_m U_m(i) >= eps B'(i) + ln(1/eps) at every pixel i
    (> B'(i) for eps = 1), with B' = B plus BOUND_SLACK."""
    slack_rel, slack_abs = BOUND_SLACK
    bound = bound * (1 + slack_rel) + slack_abs
    best, gap = unary.min(axis=0), np.empty_like(bound)  # (N,) each

    def gap_of(label: int) -> np.ndarray:  # d_l(i), in one reused buffer
        return np.subtract(unary[label], best, out=gap)

    # No eps serves a label whose smallest gap is under every eps's threshold at the smallest B.
    floor = min(_threshold(e, bound.min()) for e in PRUNE_EPS)
    todo = [label for label in range(len(unary)) if gap_of(label).min() >= floor]
    out = np.zeros(len(unary), bool)
    middle = np.median(bound)  # eps near 1/B(i) gives the lowest threshold, 1 + ln B: tried first
    for eps in sorted(PRUNE_EPS, key=lambda e: abs(np.log(e * middle))):
        if not todo:
            break
        threshold = _threshold(eps, bound)  # (N,)
        for label in list(todo):
            d = gap_of(label)
            if (d > threshold).all() if eps == 1 else (d >= threshold).all():
                out[label] = True
                todo.remove(label)
    return out


def _threshold(eps: float, bound: float | np.ndarray) -> float | np.ndarray:
    """The bound's smallest gap for `eps` (module docstring): eps B + ln(1/eps), or B for eps = 1."""
    return bound if eps == 1 else eps * bound + np.log(1 / eps)


def _pairwise_bound(crf: dcrf.DenseCRF2D, n: int) -> np.ndarray:
    """B(i) = sum_k w_k (K_k 1)(i), (N,) float32: the logit of one step of a
    one-label CRF with zero unary from Q = 1, through `crf`'s own kernels."""
    crf.setUnary(dcrf.ConstUnary(np.zeros((1, n), np.float32)))
    ones, out = eigen.matrixXf(np.ones((1, n), np.float32)), eigen.matrixXf(np.zeros((1, n), np.float32))
    crf.stepInference(ones, out, eigen.MatrixXf())
    return np.asarray(out)[0].copy()


def _resize(maps: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Bilinear resize of (C, H, W) float maps to (C, *size); a convex combination,
    so probabilities still sum to 1."""
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]  # (1, C, H, W)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return x[0].numpy()
