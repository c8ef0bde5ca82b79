"""Training crops: the paper's two stages, augmentation, class balance and the
sample stream every DDP rank draws from (section 3.3 of the paper; the
authors' training data layers in HyeonwooNoh/caffe `window_seg_data_layer`).

- Stage 1: crops centred on one ground-truth object: its tight box enlarged
  1.2x, only that object labelled, every other pixel background (0) except
  VOC's ignore band (255), which stays ignored. Objects come from
  SegmentationObject or, where an image has none, from the 4-connected
  components of each class (`geometry.find_instances`). Classes are balanced
  by repetition, as the paper says ("adding redundant examples"): an (image,
  class) pair is repeated about max_count / count times, where count is how
  many training images hold that class (`class_balanced_entries`), and its
  crop centres on an object of that class.
- Stage 2: crops of object proposals (the default inference mode's,
  `TrainConfig.stage2_proposals`) whose box overlaps
  a ground-truth object's box with IoU >= 0.5, every class labelled. The IoU is
  taken before the proposal's 1.2x enlargement, and the crop is the enlarged
  box, exactly the view the segmenter gives the network at inference. An image
  with no such proposal falls back to one of its objects' enlarged boxes.

Each crop is resized to 250x250 (image bilinear, labels nearest), randomly
cropped to 224x224 and mirrored with probability 1/2. Outside the image the
crop is zero after normalisation (the mean colour, as the segmenter's default
mode pads) and labelled 255.

Sampling: the stage's rule draws one of an item's objects or proposals with an
RNG keyed on (seed, stage, position in the sample stream), so a resumed run
draws the same crops as an uninterrupted one.

Why a torch Dataset + DataLoader with a `DistributedSampler` rather than Ray
Data: VOC is small (10,582 training images with SBD, about 2 GB), every
sample needs random access to one image and its label maps (a crop chosen per
draw, not a fixed row), and each epoch needs a new shuffle that every DDP rank
agrees on. A DistributedSampler gives exactly that with `set_epoch`, and its
position can be restored on resume, with no streaming executor, no object
store traffic and no per-epoch re-materialisation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data.geometry import Instance, enlarge_boxes, find_instances, integer_boxes, matching_proposals, object_labels
from ..inference.proposals import propose
from ..inference.segmenter import normalise
from ..data.voc import IGNORE_INDEX, VocDataset, VocSample
from ..weights import ModelInfo

if TYPE_CHECKING:
    from .recipe import TrainConfig

ANY_CLASS = -1  # an entry that centres on any of the image's objects


def class_balanced_entries(classes_per_image: Sequence[Sequence[int]]) -> np.ndarray:
    """Stage-1 entries (E, 2) int64 of (image index, class id), classes balanced
    by repetition: the pair (i, c) appears round(max_n / n_c) times (at least
    once), n_c being the number of images that hold class c. An image with no
    object class is one (i, ANY_CLASS) entry. Background (0) and ignore (255)
    are not object classes."""
    counts: dict[int, int] = {}
    for present in classes_per_image:
        for c in present:
            counts[c] = counts.get(c, 0) + 1
    most = max(counts.values(), default=1)
    entries: list[tuple[int, int]] = []
    for i, present in enumerate(classes_per_image):
        if not present:
            entries.append((i, ANY_CLASS))
        for c in sorted(present):
            entries.extend([(i, c)] * max(1, round(most / counts[c])))
    return np.array(entries, dtype=np.int64).reshape(-1, 2)


def crop_and_augment(image: torch.Tensor, labels: torch.Tensor, box: np.ndarray, resize: int,
                     size: int, rng: np.random.Generator, mirror: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One training crop: cut `box` (xyxy, may leave the image) from a normalised
    (3, H, W) image and its (H, W) labels, resize to resize x resize (image
    bilinear, labels nearest), take a random size x size window and mirror it
    with probability 1/2. Returns ((3, size, size) float32, (size, size) int64).

    Outside the image the crop is 0 (the mean colour) and labelled 255. The box
    is rounded as the segmenter rounds it (`integer_boxes`)."""
    x1, y1, x2, y2 = (int(v) for v in integer_boxes(np.asarray(box)[None])[0])
    _, h, w = image.shape
    patch = image.new_zeros((image.shape[0], y2 - y1, x2 - x1))  # (3, bh, bw)
    lab = torch.full((y2 - y1, x2 - x1), IGNORE_INDEX, dtype=torch.uint8)  # (bh, bw)
    ix1, iy1, ix2, iy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if ix1 < ix2 and iy1 < iy2:
        patch[:, iy1 - y1: iy2 - y1, ix1 - x1: ix2 - x1] = image[:, iy1:iy2, ix1:ix2]
        lab[iy1 - y1: iy2 - y1, ix1 - x1: ix2 - x1] = labels[iy1:iy2, ix1:ix2]
    img = F.interpolate(patch[None].float(), size=(resize, resize), mode="bilinear",
                        align_corners=False)[0]  # (3, resize, resize)
    lab = F.interpolate(lab[None, None].float(), size=(resize, resize),
                        mode="nearest-exact")[0, 0].long()  # (resize, resize)
    oy, ox = (int(v) for v in rng.integers(0, resize - size + 1, size=2))
    img, lab = img[:, oy: oy + size, ox: ox + size], lab[oy: oy + size, ox: ox + size]
    if mirror and rng.random() < 0.5:
        img, lab = img.flip(-1), lab.flip(-1)
    return img.contiguous(), lab.contiguous()


class CropDataset(Dataset):
    """Training crops of one stage. Item `(position, key)`: entry `position`,
    an (image index, class id) pair (`entries`; by default one per image, any
    class), with the crop drawn by an RNG seeded from (seed, stage, key).
    Returns ((3, S, S) float32 image, (S, S) int64 labels)."""

    def __init__(self, voc: VocDataset, stage: int, config: TrainConfig, info: ModelInfo,
                 entries: np.ndarray | None = None):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.voc, self.stage, self.config = voc, stage, config
        self.info = info
        self.entries = (np.stack([np.arange(len(voc)), np.full(len(voc), ANY_CLASS)], axis=1)
                        if entries is None else np.asarray(entries, np.int64))  # (E, 2)
        self.num_classes = info.config.num_classes
        self.proposal_config = config.stage2_proposals()  # unenlarged: IoU before enlargement (module docstring)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        position, draw = key
        index, class_id = (int(v) for v in self.entries[position])
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.stage, draw])
        sample = self.voc.load(index)
        bad = (sample.classes >= self.num_classes) & (sample.classes != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"{self.voc.items[index].classes}: class id {int(sample.classes[bad].max())} "
                             f"but the model has {self.num_classes} classes")
        objs = find_instances(sample.classes, sample.objects, cfg.min_object_side)
        box, labels = self.target(sample, objs, rng, class_id)
        pixels = torch.tensor(sample.image).permute(2, 0, 1).float()  # (3, H, W); a copy: decoded images are read-only
        return crop_and_augment(normalise(pixels, self.info), torch.from_numpy(labels),
                                box, cfg.resize, cfg.input_size, rng)

    def target(self, sample: VocSample, objs: list[Instance], rng: np.random.Generator,
               class_id: int = ANY_CLASS) -> tuple[np.ndarray, np.ndarray]:
        """(crop box xyxy (4,), (H, W) uint8 labels) of this stage's rule; in
        stage 1 centred on an object of `class_id` when the image has one."""
        h, w = sample.classes.shape
        whole = np.array([0, 0, w, h], np.float64)
        if not objs:  # nothing to centre on: the whole image, as labelled
            return whole, sample.classes
        if self.stage == 1:
            of_class = [o for o in objs if o.class_id == class_id] or objs
            obj = of_class[rng.integers(len(of_class))]
            return enlarge_boxes(obj.box[None], self.config.enlarge)[0], object_labels(sample.classes, obj)
        props = propose(sample.image, self.proposal_config).astype(np.float64)  # (K, 4), whole image last
        ok = np.flatnonzero(matching_proposals(props, np.stack([o.box for o in objs]),
                                               self.config.iou_threshold))
        if len(ok) == 0:  # no proposal fits any object: one of the objects' own boxes
            return enlarge_boxes(objs[rng.integers(len(objs))].box[None], self.config.enlarge)[0], sample.classes
        box = props[ok[rng.integers(len(ok))]]
        if not np.array_equal(box, whole):  # the segmenter enlarges every proposal but the whole image
            box = enlarge_boxes(box[None], self.config.enlarge)[0]
        return box, sample.classes


class StreamSampler(Sampler):
    """An endless stream of a DistributedSampler's epochs, from sample `start`
    of this rank's stream on. Yields (index, key) with a key unique to every
    draw of every rank, which seeds that draw's crop (`CropDataset`)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, start: int = 0):
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.num_replicas, self.rank, self.start = num_replicas, rank, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = len(self.sampler)
        epoch, offset = divmod(self.start, per_epoch)
        position = self.start
        while True:
            self.sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
            for index in islice(iter(self.sampler), offset, None):
                yield index, position * self.num_replicas + self.rank
                position += 1
            epoch, offset = epoch + 1, 0


def crop_loader(dataset: CropDataset, config: TrainConfig, rank: int, world_size: int,
                start: int, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless forward batches ((B, 3, S, S), (B, S, S)), B = crops_per_forward,
    of this rank's share of the stage's stream, from this rank's sample `start` on."""
    sampler = StreamSampler(dataset, world_size, rank, config.seed, start)
    loader = DataLoader(dataset, batch_size=config.crops_per_forward, sampler=sampler,
                        num_workers=config.loader_workers, pin_memory=pin_memory,
                        persistent_workers=config.loader_workers > 0)
    return iter(loader)
