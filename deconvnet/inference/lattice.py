"""The dense CRF's mean field in torch, on CPU or CUDA, giving pydensecrf's results.

Krahenbuhl and Koltun's inference (densecrf 2.x, which pydensecrf2 wraps)
filters Q with Gaussian kernels through a permutohedral lattice (Adams, Baek
and Davis 2010): every pixel's feature vector (position / std, colour / std)
is lifted onto the lattice, its value splatted with barycentric weights onto
the d+1 vertices of the simplex around it, the lattice blurred with [1/2 1 1/2]
along each of its d+1 axes, and the result sliced back at the pixel. This
module computes the same steps with the same float32 arithmetic (feature
scaling, elevation, rounding to the nearest 0-coloured point, ranks,
barycentric weights, blur order, the slice's `1 / (1 + 2**-d)`), so the lattice
is the same graph and Q differs from pydensecrf's only by the order of float
additions. Here the lattice is tensors: vertex ids come from `torch.unique`
over integer-coded keys instead of a hash table, neighbours from
`torch.searchsorted`, and splat, blur and slice are each one weighted sum of
rows (`F.embedding_bag`, no scatter), so the same code runs on either device
and on many images at once (each image's vertices carry its index in the
key, so images never share a vertex).

The mean field (densecrf.cpp `inference`, pairwise.cpp `DenseKernel::filter`,
Potts compatibility): Q0 = softmax(-U); then Q <- softmax(-U + sum_k w_k K_k Q)
with K_k Q the lattice filter of Q, by normalisation:
- `none` (NO_NORMALIZATION): the plain filter.
- `symmetric`: n = 1 / sqrt(K 1 + 1e-20); K Q becomes n * K(n * Q).
- `before` / `after`: n = 1 / (K 1 + 1e-20), applied before / after filtering.
The kernel type (const, diag, full) changes only which feature weights
pydensecrf can learn; inference starts them at 1, so all three filter alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .crf import CRFConfig

# Codes of lattice keys are int64; keep headroom for the neighbour offsets.
_MAX_CODE = 2 ** 62
_Q_FLOOR = 1e-30  # see _softmax


@dataclass(frozen=True)
class Lattice:
    """A permutohedral lattice over N points with d features (batched or not),
    as the three sparse operators of its filter, each a weighted sum of rows
    (`F.embedding_bag`), so no step scatters.

    Vertices are rows 0..M-1 of the lattice's values and row M stays zero.
    splat_points, splat_weights, splat_starts: for each vertex (M+1 bags,
    M's empty), the points around it, their barycentric weights; blur: (d+1,
    M+1, 3) int64 the vertex and its two neighbours along each axis, M where
    there is none, weighted by blur_weights (M+1, 3) = (1, 1/2, 1/2);
    slice_vertices, slice_weights: (N, d+1) the vertices of each point's
    simplex, the weights times the slice's scaling.
    """
    splat_points: torch.Tensor
    splat_weights: torch.Tensor
    splat_starts: torch.Tensor
    blur: torch.Tensor
    blur_weights: torch.Tensor
    slice_vertices: torch.Tensor
    slice_weights: torch.Tensor

    @property
    def num_vertices(self) -> int:
        return self.blur.shape[1] - 1


def _enclosing_simplex(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (N, d) point's simplex on the lattice, as densecrf's `Permutohedral::init`
    finds it: its 0-coloured corner (N, d+1) int64, the rank of each coordinate
    (N, d+1) int64 and the barycentric weights (N, d+1) float32."""
    n, d = features.shape
    device, f32 = features.device, torch.float32
    features = features.to(f32)
    # The elevation E (p.5 of Adams et al. 2010) scaled to the filter's std
    # (p.6): float32 constants as densecrf computes them.
    inv_std_dev = float(np.float32(np.sqrt(2.0 / 3.0) * (d + 1)))
    scale = [float(np.float32(1.0 / np.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]
    scale_t = torch.tensor(scale, dtype=f32, device=device)
    elevated = torch.empty(n, d + 1, dtype=f32, device=device)
    total = torch.zeros(n, dtype=f32, device=device)
    for j in range(d, 0, -1):  # the same order of float operations as densecrf
        cf = features[:, j - 1] * scale_t[j - 1]
        elevated[:, j] = total - float(j) * cf
        total = total + cf
    elevated[:, 0] = total

    # The closest 0-coloured lattice point: round to the nearest multiple of
    # d+1 (ties to even, as SSE's conversion does).
    down = torch.tensor(1.0 / (d + 1), dtype=f32, device=device)
    v = torch.round(elevated * down)  # (N, d+1)
    rem0 = v * float(d + 1)
    coord_sum = v.sum(dim=1).to(torch.int64)  # (N,)

    # rank[i]: the number of coordinates whose residual is larger, on a tie
    # the later coordinate counting as larger (densecrf's pairwise comparison).
    diff = elevated - rem0  # (N, d+1)
    less = diff[:, :, None] < diff[:, None, :]  # less[i, j]: diff_i < diff_j
    upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=device).triu(1)
    rank = (less & upper).sum(dim=2) + (~less & upper).sum(dim=1)  # j > i: di < dj; j < i: dj >= di
    rank = rank + coord_sum[:, None]  # (N, d+1); back onto the plane where sum != 0
    wrap = (rank < 0).to(torch.int64) - (rank > d).to(torch.int64)
    rank = rank + wrap * (d + 1)
    rem0 = rem0 + (wrap * (d + 1)).to(f32)

    # Barycentric weights (p.10): slot p takes +v of the coordinate ranked
    # d-p and -v of the one ranked d-p+1; slot 0 wraps around with 1 - v.
    v = (elevated - rem0) * down  # (N, d+1)
    by_rank = torch.empty_like(v).scatter_(1, rank, v)  # by_rank[:, r]: v of rank r
    weights = torch.empty_like(v)
    flipped = by_rank.flip(1)  # flipped[:, p]: v of rank d-p
    weights[:, 1:] = flipped[:, 1:] - flipped[:, :-1]
    weights[:, 0] = by_rank[:, d] + (1.0 - by_rank[:, 0])
    return rem0.to(torch.int64), rank, weights


def build_lattice(features: torch.Tensor, batch: torch.Tensor | None = None) -> Lattice:
    """The lattice of (N, d) float32 `features` (already divided by their stds).

    `batch`: (N,) int64 image index of each point, so points of different
    images never share a vertex; None: one image.
    """
    n, d = features.shape
    device = features.device
    rem0, rank, weights = _enclosing_simplex(features)
    # Vertex keys: the first d coordinates of rem0 + canonical[r][rank]
    # (canonical[r][j] = r, or r - (d+1) for j > d - r), coded as one int64.
    rem0_i = rem0[:, :d]  # (N, d)
    margin = 2 * d + 1  # vertices lie within d of rem0, their neighbours within d more
    low = rem0_i.min(dim=0).values - margin  # (d,)
    radix = rem0_i.max(dim=0).values + margin - low + 1  # (d,)
    radix_list = radix.tolist()
    images = 1 if batch is None else int(batch.max()) + 1
    strides, code_space = [], 1
    for r_k in reversed(radix_list):
        strides.insert(0, code_space)
        code_space *= r_k
    if code_space * images >= _MAX_CODE:
        raise ValueError(f"lattice keys do not fit an int64 code ({code_space * images}); "
                         "the kernel's stds are too small for the image")
    stride = torch.tensor(strides, dtype=torch.int64, device=device)  # (d,)
    base = ((rem0_i - low) * stride).sum(dim=1)  # (N,)
    if batch is not None:
        base = base + batch.to(torch.int64) * code_space
    ones = int(stride.sum())  # the code of (1, ..., 1)
    codes = torch.stack([base + r * ones - (d + 1) * ((rank[:, :d] > d - r).to(torch.int64)
                                                      * stride).sum(dim=1)
                         for r in range(d + 1)], dim=1).reshape(-1)  # (N*(d+1),), point-major
    # One sort gives the vertices (distinct codes), each pair's vertex, and the
    # pairs grouped by vertex for the splat.
    sorted_codes, order = torch.sort(codes, stable=True)
    first = torch.ones_like(sorted_codes, dtype=torch.bool)
    first[1:] = sorted_codes[1:] != sorted_codes[:-1]
    keys = sorted_codes[first]
    m = keys.numel()
    inverse = torch.empty_like(codes)
    inverse[order] = torch.cumsum(first, 0) - 1  # (N*(d+1),) vertex of each pair

    # Neighbours along axis j: key - 1 except key[j] + d (n1), its mirror (n2),
    # so n2 is n1 inverted; for j = d every stored coordinate moves by -1 / +1.
    vertex = torch.arange(m + 1, device=device)
    blur = torch.full((d + 1, m + 1, 3), m, dtype=torch.int64, device=device)
    blur[:, :, 0] = vertex
    for j in range(d + 1):
        wanted = keys + (-ones + ((d + 1) * strides[j] if j < d else 0))
        found = torch.searchsorted(keys, wanted).clamp_(max=m - 1)
        hit = keys[found] == wanted  # (M,)
        blur[j, :m, 1] = torch.where(hit, found, m)
        blur[j, found[hit], 2] = vertex[:m][hit]

    # Splat as bags per vertex, then an empty bag for row M.
    starts = torch.cat([first.nonzero()[:, 0], first.new_tensor([codes.numel()], dtype=torch.int64)])
    alpha = np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d))
    return Lattice(splat_points=order // (d + 1), splat_weights=weights.reshape(-1)[order],
                   splat_starts=starts, blur=blur,
                   blur_weights=torch.tensor([1.0, 0.5, 0.5], device=device).repeat(m + 1, 1),
                   slice_vertices=inverse.reshape(n, d + 1),
                   slice_weights=weights * float(alpha))


def lattice_filter(lattice: Lattice, values: torch.Tensor) -> torch.Tensor:
    """Splat (N, C) `values`, blur along each axis, slice: (N, C), approximately
    sum_j exp(-|f_i - f_j|^2 / 2) values_j over all points j, i included."""
    grid = F.embedding_bag(lattice.splat_points, values, lattice.splat_starts, mode="sum",
                           per_sample_weights=lattice.splat_weights)  # (M+1, C)
    for neighbours in lattice.blur:  # v + (left + right) / 2 along each axis in turn
        grid = F.embedding_bag(neighbours, grid, mode="sum",
                               per_sample_weights=lattice.blur_weights)
    return F.embedding_bag(lattice.slice_vertices, grid, mode="sum",
                           per_sample_weights=lattice.slice_weights)


def _pairwise(features: torch.Tensor, batch: torch.Tensor | None, weight: float,
              normalization: str) -> Lattice:
    """One Gaussian pairwise term as a lattice whose filter gives w K Q: the
    normalisation's per-point factors and the Potts weight folded into the
    splat and slice weights, so a mean-field step adds no pass over Q."""
    if normalization not in ("none", "before", "after", "symmetric"):
        raise ValueError(f"unknown `normalization` {normalization!r}")
    lattice = build_lattice(features, batch)
    pre = post = None
    if normalization != "none":
        ones = features.new_ones(features.shape[0], 1)
        total = lattice_filter(lattice, ones)[:, 0].double() + 1e-20  # (N,), as densecrf
        norm = (1.0 / (total.sqrt() if normalization == "symmetric" else total)).float()
        pre = norm if normalization in ("symmetric", "before") else None
        post = norm if normalization in ("symmetric", "after") else None
    splat = lattice.splat_weights
    if pre is not None:
        splat = splat * pre[lattice.splat_points]
    scale = weight if post is None else post[:, None] * weight
    return dataclasses.replace(lattice, splat_weights=splat,
                               slice_weights=lattice.slice_weights * scale)


def _features(images: torch.Tensor, config: CRFConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) uint8 -> Gaussian (B*H*W, 2) and bilateral (B*H*W, 5) features,
    divided by their stds in float32 as densecrf's DenseCRF2D does."""
    b, h, w, _ = images.shape
    device, f32 = images.device, torch.float32
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=f32),
                            torch.arange(w, device=device, dtype=f32), indexing="ij")
    pos = torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).expand(b, -1, -1)  # (B, H*W, 2)
    gauss_sxy, sxy, srgb = torch.tensor(  # float32 stds, as densecrf's float arguments
        [config.gauss_sxy, config.bilateral_sxy, config.bilateral_srgb], dtype=f32, device=device)
    gauss = pos / gauss_sxy
    bilateral = torch.cat([pos / sxy, images.reshape(b, h * w, 3).to(f32) / srgb], dim=-1)
    return gauss.reshape(-1, 2), bilateral.reshape(-1, 5)


def mean_field(images: torch.Tensor, unary: torch.Tensor, config: CRFConfig,
               iterations: int | None = None) -> torch.Tensor:
    """Dense-CRF mean field on a batch: (B, H, W, 3) uint8 images, (B, C, H, W)
    float32 unary energies -> (B, C, H, W) float32 Q after `iterations`
    (None: `config.iterations`) steps, on the tensors' device."""
    b, c, h, w = unary.shape
    if images.shape != (b, h, w, 3):
        raise ValueError(f"images must be (B, H, W, 3) = {(b, h, w, 3)}, got {tuple(images.shape)}")
    steps = config.iterations if iterations is None else iterations
    batch = None
    if b > 1:
        batch = torch.arange(b, device=unary.device).repeat_interleave(h * w)
    gauss, bilateral = _features(images, config)
    kernels = [_pairwise(gauss, batch, config.gauss_compat, config.normalization),
               _pairwise(bilateral, batch, config.bilateral_compat, config.normalization)]
    neg_unary = -unary.to(torch.float32).permute(0, 2, 3, 1).reshape(b * h * w, c)  # (N, C)
    q = _softmax(neg_unary)
    for _ in range(steps):
        # Potts: -U - (-w K Q) for each kernel in turn, w folded into the lattice.
        energy = torch.add(neg_unary, lattice_filter(kernels[0], q))
        for kernel in kernels[1:]:
            energy += lattice_filter(kernel, q)
        q = _softmax(energy)
    return q.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def _softmax(energy: torch.Tensor) -> torch.Tensor:
    """Q over dim 1, with Q < 1e-30 set to 0: no message changes by as much as
    float32 resolves, and the lattice stays free of subnormal floats, which
    x86 computes many times slower (a quarter of the time of `paper` at 500x375)."""
    return F.threshold_(torch.softmax(energy, dim=1), _Q_FLOOR, 0.0)


def torch_mean_field(image: np.ndarray, probs: np.ndarray, config: CRFConfig,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """The torch engine with pydensecrf's semantics (crf.py's `mean_field` with `exact`: every label, every step):
    (H, W, 3) uint8 image, (C, H, W) probabilities -> (C, H, W) float32 Q."""
    from .crf import unary_energy  # crf.py may import this module for its engines

    c, h, w = probs.shape
    unary = torch.from_numpy(unary_energy(probs, config.unary_clip)).reshape(1, c, h, w)
    rgb = torch.from_numpy(np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))[None]
    with torch.inference_mode():
        q = mean_field(rgb.to(device), unary.to(device), config)
    return q[0].cpu().numpy()
