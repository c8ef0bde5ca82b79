"""Instance-wise inference: crop every proposal, run the network in fixed-size
batches, paste the maps back and merge them per image (the paper, section 4).

    seg = Segmenter.from_model_dir("models/tiny")
    probs = seg.probabilities([image], [boxes])[0]      # (C, H, W) float32, sums to 1 over C

For each image (H, W, 3 uint8) and its boxes (K, 4 xyxy pixels, may leave the
image): every box is rounded to whole pixels, cropped from the image padded by
its own size on each side, resized bilinearly to 224x224, and the network's
output is resized back to the box and merged into an image-sized C x H x W map
by pixel-wise maximum (from zeros) or by mean over the proposals that cover
each pixel. Three fields choose the semantics (`deconvnet.inference` sets them
per mode):
- `merge`: "softmax" merges each proposal's softmax and renormalises the
  merged map over classes; "raw" merges the raw scores, so with "max" from a
  zero map a negative score never counts, and the softmax is taken once, of
  the aggregate (the release, HyeonwooNoh/DeconvNet
  inference/generate_EDeconvNet_CRF_results.m: `padded_prob_base(box) =
  max(padded_prob_base(box), segImg)` from zeros, softmax before the CRF).
- `pad`: "mean" pads with the mean colour (zeros after normalisation);
  "black" pads with 0 before the mean is subtracted, as the release's
  `padarray(I, ...)` then inference/util/preprocess_image_bb.m.
- `ensemble` (with FCN-8s): "mean" or "product" of the two probability maps;
  "relu-product" is the release's `ens_score = deconv_score .* max(0,
  fcn_score)` on raw scores, then softmax (needs merge "raw").

Proposals of many images are packed into forward batches of exactly
`batch_size` crops (the last one may be short), cropped lazily per batch, so
peak memory depends on `batch_size` and on the merged maps, never on how many
proposals there are. Crops are one `grid_sample` per image and batch; paste-back
is one `interpolate` + slice-max per proposal, whose cost is the box's area.
On CUDA the forward runs in bf16 autocast with channels_last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import Problems
from ..data.geometry import integer_boxes
from ..weights import ModelInfo, load_model_dir

AGGREGATES = ("max", "mean")
MERGES = ("softmax", "raw")
PADS = ("mean", "black")
ENSEMBLES = ("mean", "product", "relu-product")


@dataclass(frozen=True)
class SegmenterConfig:
    """How the segmenter crops, batches and merges. A field left None takes the
    default mode's value (`deconvnet.inference.modes.MODE_TABLE`)."""
    batch_size: int | None = None  # proposals per forward; bounds activation memory
    input_size: int = 224  # the network's proposal size, as trained
    aggregate: str | None = None  # "max" (the paper, from zeros) or "mean" over covering proposals
    merge: str | None = None  # what is merged: each proposal's "softmax", or "raw" scores (the release)
    pad: str | None = None  # outside the image: the "mean" colour, or "black" (0 before the mean, the release)
    ensemble: str | None = None  # with FCN-8s: "mean" (the paper's text), "product" or "relu-product" (the release)
    dtype: str = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or "fp32" / "bf16"
    channels_last: bool | None = None  # None = on for CUDA

    def __post_init__(self):
        from .modes import fill_defaults  # modes imports this module

        fill_defaults(self, "segmenter")
        problems = Problems(self)
        problems.one_of("aggregate", AGGREGATES)
        problems.one_of("merge", MERGES)
        problems.one_of("pad", PADS)
        problems.one_of("ensemble", ENSEMBLES)
        if self.ensemble == "relu-product" and self.merge != "raw":
            problems.add(f"`ensemble` 'relu-product' multiplies raw scores: it needs `merge` 'raw', "
                         f"got {self.merge!r}")
        problems.one_of("dtype", ("auto", "fp32", "bf16"))
        problems.at_least("batch_size", 1)
        problems.check("input_size", self.input_size % 32 == 0, "must be a multiple of 32")
        problems.raise_any()


def normalise(pixels: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """(3, H, W) RGB pixel values 0..255 (any float dtype, any device) -> what the
    network was trained on: (pixels - mean * 255) / (std * 255), the model
    directory's normalisation. Training crops go through this too."""
    mean = torch.tensor(info.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1) * 255
    std = torch.tensor(info.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1) * 255
    return (pixels - mean) / std


def crop_boxes(image: torch.Tensor, boxes: np.ndarray, size: int,
               fill: torch.Tensor | None = None) -> torch.Tensor:
    """Crop integer boxes from a normalised (3, H, W) image and resize each to
    size x size bilinearly: (K, 3, size, size). Outside the image is zero, or
    the (3,) `fill` colour (bilinear weights sum to 1, so cropping image - fill
    and adding fill back pads with fill).

    Output pixel u of a box [x1, x2) samples image coordinate
    x1 + (u + 0.5) * (x2 - x1) / size - 0.5, i.e. the box's own pixels resized
    with half-pixel centres, the same convention `interpolate` uses.
    """
    _, h, w = image.shape
    if fill is not None:
        fill = fill.to(image.dtype).view(3, 1, 1)
        return crop_boxes(image - fill, boxes, size) + fill
    b = torch.as_tensor(boxes, dtype=torch.float32, device=image.device)  # (K, 4)
    x1, y1, x2, y2 = b.unbind(1)
    theta = torch.zeros(len(b), 2, 3, device=image.device)
    theta[:, 0, 0] = (x2 - x1) / w
    theta[:, 0, 2] = (x1 + x2) / w - 1
    theta[:, 1, 1] = (y2 - y1) / h
    theta[:, 1, 2] = (y1 + y2) / h - 1
    grid = F.affine_grid(theta, [len(b), 3, size, size], align_corners=False)  # (K, size, size, 2)
    # One image, all its boxes: stack the K grids vertically instead of copying the image K times.
    out = F.grid_sample(image[None], grid.reshape(1, len(b) * size, size, 2).to(image.dtype),
                        mode="bilinear", padding_mode="zeros", align_corners=False)  # (1, 3, K*size, size)
    return out.reshape(3, len(b), size, size).transpose(0, 1)  # (K, 3, size, size)


class MergedMap:
    """Accumulates proposal maps into one (C, H, W) image map."""

    def __init__(self, num_classes: int, height: int, width: int, aggregate: str, device):
        self.aggregate = aggregate
        self.scores = torch.zeros(num_classes, height, width, device=device)  # (C, H, W)
        self.count = torch.zeros(1, height, width, device=device) if aggregate == "mean" else None

    def paste_many(self, probs: torch.Tensor, boxes: np.ndarray) -> None:
        """Resize (K, C, s, s) maps (probabilities or raw scores) to their (K, 4)
        integer boxes and merge the part of each box that lies inside the image,
        with no loop over proposals: boxes of one size (a grid proposal generator gives a
        handful of sizes) are resized in one `interpolate` and merged in one
        scatter. Pixels outside the image are sent to pixel 0 with weight 0,
        which neither max (the scores start at 0) nor mean notices, so nothing
        waits on a boolean mask's size."""
        c, h, w = self.scores.shape
        flat = self.scores.view(c, h * w)
        dev = self.scores.device
        sizes = boxes[:, 2:4] - boxes[:, 0:2]  # (K, 2): box width, height
        for bw, bh in np.unique(sizes, axis=0):
            same = np.flatnonzero((sizes[:, 0] == bw) & (sizes[:, 1] == bh))
            b = torch.as_tensor(boxes[same], device=dev)
            up = F.interpolate(probs[torch.as_tensor(same, device=probs.device)].float(), size=(int(bh), int(bw)),
                               mode="bilinear", align_corners=False)  # (G, C, bh, bw)
            ys = b[:, 1, None] + torch.arange(int(bh), device=dev)  # (G, bh)
            xs = b[:, 0, None] + torch.arange(int(bw), device=dev)  # (G, bw)
            inside = (((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :])  # (G, bh, bw)
            index = (ys.clamp(0, h - 1)[:, :, None] * w + xs.clamp(0, w - 1)[:, None, :]) * inside
            weight = inside[:, None].to(up.dtype)  # (G, 1, bh, bw)
            src = (up * weight).transpose(0, 1).reshape(c, -1)  # (C, G*bh*bw)
            index = index.reshape(1, -1)
            if self.count is None:
                flat.scatter_reduce_(1, index.expand(c, -1), src, reduce="amax")
            else:
                flat.scatter_add_(1, index.expand(c, -1), src)
                self.count.view(1, h * w).scatter_add_(1, index, weight.reshape(1, -1))

    def merged(self) -> torch.Tensor:
        """(C, H, W): the max, or the mean over covering proposals; 0 where none covers."""
        return self.scores if self.count is None else self.scores / self.count.clamp(min=1)

    def result(self) -> torch.Tensor:
        """(C, H, W) probabilities from merged probabilities: renormalised over classes."""
        s = self.merged()
        return s / s.sum(0, keepdim=True).clamp(min=1e-12)


class Segmenter:
    """A loaded model that turns images and their proposals into merged maps.
    Used as is by the CLI and inside the pipeline's GPU actors."""

    def __init__(self, model: nn.Module, info: ModelInfo, config: SegmenterConfig | None = None,
                 device: str | torch.device | None = None,
                 fcn: tuple[nn.Module, ModelInfo] | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = config = config or SegmenterConfig()  # None: the default mode's
        self.info = info
        cuda = self.device.type == "cuda"
        self.dtype = {"auto": torch.bfloat16 if cuda else torch.float32,
                      "bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]
        self.channels_last = cuda if config.channels_last is None else config.channels_last
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=fmt)
        self.fcn = None
        if fcn is not None:
            fcn_model, fcn_info = fcn
            if fcn_info.classes != info.classes:
                raise ValueError(f"FCN-8s classes {fcn_info.classes} differ from DeconvNet's {info.classes}")
            if fcn_info.config.arch != "fcn8s":
                raise ValueError(f"`fcn_model` must be an FCN-8s model, got arch {fcn_info.config.arch!r}")
            self.fcn = fcn_model.eval().to(self.device, memory_format=fmt)
            self.fcn_info = fcn_info

    @classmethod
    def from_model_dir(cls, uri: str, config: SegmenterConfig | None = None,
                       device: str | torch.device | None = None, fcn_uri: str | None = None,
                       storage_options=None) -> Segmenter:
        model, info = load_model_dir(uri, storage_options=storage_options)
        fcn = load_model_dir(fcn_uri, storage_options=storage_options) if fcn_uri else None
        return cls(model, info, config, device, fcn)

    @property
    def num_classes(self) -> int:
        return self.info.config.num_classes

    def _to_device(self, image: np.ndarray) -> torch.Tensor:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, \
            f"expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
        t = torch.from_numpy(np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t.permute(2, 0, 1).float()  # (3, H, W), 0..255

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Raw scores (B, C, h, w), float32."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = model(x)
        return logits.float()

    def _pad_fill(self) -> torch.Tensor | None:
        """The normalised colour outside the image: None (zeros, the mean colour)
        or black, raw 0 minus the mean ("padarray" before preprocess_image_bb.m
        subtracts the mean, in the release)."""
        if self.config.pad == "mean":
            return None
        return normalise(torch.zeros(3, 1, 1, device=self.device), self.info).view(3)

    @torch.inference_mode()
    def probabilities(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Merged (C, H, W) float32 probability maps, one per image."""
        assert len(images) == len(boxes), f"{len(images)} images but {len(boxes)} box arrays"
        cfg, s = self.config, self.config.input_size
        raw = [self._to_device(im) for im in images]  # (3, H, W) each
        normed = [normalise(r, self.info) for r in raw]
        fill = self._pad_fill()
        merged = [MergedMap(self.num_classes, r.shape[1], r.shape[2], cfg.aggregate, self.device) for r in raw]
        int_boxes = [integer_boxes(b) for b in boxes]
        # Every (image, box) pair in order, cut into forward batches of batch_size.
        owner = np.concatenate([np.full(len(b), i) for i, b in enumerate(int_boxes)]) if int_boxes else np.zeros(0)
        flat = np.concatenate(int_boxes) if int_boxes else np.zeros((0, 4), np.int64)
        for start in range(0, len(flat), cfg.batch_size):
            idx = slice(start, start + cfg.batch_size)
            who, bx = owner[idx], flat[idx]  # `who` is sorted: images are contiguous
            crops = torch.cat([crop_boxes(normed[i], bx[who == i], s, fill)
                               for i in np.unique(who)])  # (B, 3, s, s)
            maps = self._forward(self.model, crops)  # (B, C, s, s), rows in the order of bx
            if cfg.merge == "softmax":
                maps = maps.softmax(1)
            for i in np.unique(who):
                mine = np.flatnonzero(who == i)
                merged[i].paste_many(maps[mine[0]: mine[-1] + 1], bx[mine])  # contiguous rows
        out = []
        for m, r in zip(merged, raw):
            scores = m.merged()  # (C, H, W) merged probabilities or raw scores
            if self.fcn is not None:
                out.append(self._ensemble(scores, r))
            else:
                out.append(scores.softmax(0) if cfg.merge == "raw" else m.result())
        return [p.cpu().numpy() for p in out]

    def _ensemble(self, merged: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """EDeconvNet: combine the merged map with FCN-8s run on the whole image."""
        cfg = self.config
        fcn = self._forward(self.fcn, normalise(raw, self.fcn_info)[None])[0]  # (C, H, W) raw scores
        if cfg.ensemble == "relu-product":
            # The release (inference/generate_EDeconvNet_CRF_results.m): fcn_score = max(0, fcn_score);
            # ens_score = deconv_score .* fcn_score; prob_map = softmax(ens_score).
            return (merged * fcn.clamp(min=0)).softmax(0)
        probs = merged.softmax(0) if cfg.merge == "raw" else merged / merged.sum(0, keepdim=True).clamp(min=1e-12)
        fcn = fcn.softmax(0)
        if cfg.ensemble == "mean":  # the paper's text: the mean of the two outputs
            return (probs + fcn) / 2
        prod = probs * fcn  # a product of probabilities, renormalised
        return prod / prod.sum(0, keepdim=True).clamp(min=1e-12)
