"""Training DeconvNet the paper's way, in plain torch: data, the two stages,
augmentation, optimiser, loss, evaluation and checkpoints. No Ray here;
jobs/train.py runs `train_step`, `evaluate` and the checkpoint functions on
every Ray Train worker.

Data is the PASCAL VOC layout under any URI (read through `deconvnet.storage`):
JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG of class ids,
255 = ignore), SegmentationObject/<id>.png (instance ids) when present, and
lists in ImageSets/Segmentation/. A list line is an id, or two paths relative
to the root ("/JPEGImages/x.jpg /SegmentationClassAug/x.png", the format of
the original code's lists and of SBD-augmented lists).

The paper's two stages (section 3.3 and the original Caffe solvers):
- Stage 1: crops centred on one ground-truth object: its tight box enlarged
  1.2x, only that object labelled, every other pixel background (0) except
  VOC's ignore band (255), which stays ignored. Objects come from
  SegmentationObject or, where an image has none, from the 4-connected
  components of each class in SegmentationClass (`connected_components`).
- Stage 2: crops of object proposals (`deconvnet.proposals`) whose box overlaps
  a ground-truth object's box with IoU >= 0.5, every class labelled. The IoU is
  taken before the proposal's 1.2x enlargement, and the crop is the enlarged
  box, exactly the view the segmenter gives the network at inference. An image
  with no such proposal falls back to one of its objects' enlarged boxes.
Each crop is resized to 250x250 (image bilinear, labels nearest), randomly
cropped to 224x224 and mirrored with probability 1/2. Outside the image the
crop is zero after normalisation (the mean colour, as the segmenter pads) and
labelled 255.

Sampling: every dataset item is an image; the stage's rule then draws one of
its objects or proposals with an RNG keyed on (seed, stage, position in the
sample stream), so a resumed run draws the same crops as an uninterrupted one.

Why a torch Dataset + DataLoader with a `DistributedSampler` rather than Ray
Data: VOC is small (10,582 training images with SBD, about 2 GB), every
sample needs random access to one image and its label maps (a crop chosen per
draw, not a fixed row), and each epoch needs a new shuffle that every DDP rank
agrees on. A DistributedSampler gives exactly that with `set_epoch`, and its
position can be restored on resume, with no streaming executor, no object
store traffic and no per-epoch re-materialisation.

Evaluation (`evaluate`) runs the exported model's own inference path: the
`Segmenter` over `propose()` boxes (the segment job's default: grid, top 50
plus the whole image, max-merged), then argmax, on whole val images at their
own size. So the val mean IoU is the number the segment job's labels would
score on the same images with the same proposals and `--crf none`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import storage
from .imageio import decode_image
from .metrics import ConfusionMatrix
from .model import PRESETS, build_model, preset
from .geometry import Instance, enlarge_boxes, find_instances, integer_boxes, matching_proposals, object_labels
from .proposals import PROPOSAL_METHODS, ProposalConfig, propose
from .segmenter import Segmenter, SegmenterConfig, normalise
from .voc import IGNORE_INDEX, VOC_CLASSES, decode_label_png
from .records import now_iso
from .weights import ModelInfo, load_model_dir, save_model_dir

TRAIN_LIST = "ImageSets/Segmentation/train.txt"
VAL_LIST = "ImageSets/Segmentation/val.txt"
RESULTS_DIR = "results"  # under <storage>/<name>/, beside Ray Train's checkpoint_* dirs
FINAL_FILE = "final.json"  # written last: its presence means the run is finished


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; parsed from jobs/train.py's command
    line and recorded (secrets redacted) under <storage>/<name>/results/.

    Defaults are the paper's recipe (the original Caffe solvers); `RECIPES`
    holds what the tiny preset changes.
    """

    data: str  # VOC-layout root URI
    storage: str  # checkpoints and results go under <storage>/<name>/
    name: str  # the run; the same name resumes
    extra_train_lists: tuple[str, ...] = ()  # more training lists (e.g. SBD ids)
    preset: str = "paper"  # architecture when there is no --init, and the recipe
    init: str | None = None  # model directory to start from (its classes are used)
    num_workers: int = 1  # DDP ranks; 0 runs the loop in the driver (Ray Train local mode)
    use_gpu: bool = False
    batch_size: int = 64  # global: the original's 8 crops x iter_size 8
    micro_batch_size: int | None = None  # per-rank forward size; None = the rank's whole share
    stage1_steps: int = 20000  # the original stage-1 solver's max_iter
    stage2_steps: int = 40000  # the original stage-2 solver's max_iter
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv weights only; biases and BN are not decayed
    lr_step: int = 10000  # step decay every lr_step steps of a stage (the original: 9000, then 10000)
    lr_gamma: float = 0.1
    eval_every: int = 500  # the original's test_interval; a checkpoint goes with every evaluation
    log_every: int = 20  # steps per logged (all-reduced) training loss
    export: str | None = None  # model directory to write at the end
    seed: int = 0
    input_size: int = 224  # the network's crop size, as at inference
    resize: int = 250  # crops are resized to this before the random input_size crop
    enlarge: float = 1.2  # object boxes and proposals grow 1.2x around their centre
    iou_threshold: float = 0.5  # stage 2: proposal box vs object box
    proposals: str = "grid"  # stage-2 and evaluation proposals; grid needs no model file
    max_proposals: int = 50  # stage-2 candidates per image, as inference's top 50
    eval_max_proposals: int = 50  # the segment job's default, so val mIoU is its number
    # Objects whose tight box is narrower than this would be magnified more
    # than 28x to the 224 input: no context left, nothing to learn from.
    min_object_side: int = 8
    loader_workers: int = 6  # DataLoader processes per rank: JPEG decode + crops keep a GPU fed
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # the latest ones are kept in storage
    # Never in a repr: Ray Train shows the train loop config in its dashboard.
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        """Raise ValueError with a message a user can act on."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.preset in RECIPES, f"--preset must be one of {sorted(RECIPES)}, got {self.preset!r}")
        need(bool(self.name) and all(c.isalnum() or c in "._-" for c in self.name) and self.name[0] != ".",
             f"--name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        need(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.batch_size % self.world_size == 0,
             f"--batch-size {self.batch_size} does not split evenly over {self.world_size} workers")
        per_rank = self.batch_size // self.world_size
        # fc6's output is 1x1 per crop, so its BatchNorm needs 2 crops per forward to train.
        need(self.micro_batch >= 2,
             f"a forward needs at least 2 crops (BatchNorm after fc6 sees one value per crop), got "
             f"--micro-batch-size {self.micro_batch} (--batch-size {self.batch_size} over {self.world_size} workers)")
        need(per_rank % self.micro_batch == 0,
             f"--micro-batch-size {self.micro_batch} does not divide the per-worker batch {per_rank} "
             f"(--batch-size {self.batch_size} over {self.world_size} workers)")
        need(self.stage1_steps >= 0 and self.stage2_steps >= 0 and self.total_steps >= 1,
             f"--stage1-steps and --stage2-steps must be >= 0 with a positive sum, "
             f"got {self.stage1_steps} and {self.stage2_steps}")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.lr_step >= 1, f"--lr-step must be >= 1, got {self.lr_step}")
        need(0 < self.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        need(self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        need(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        need(self.input_size % 32 == 0 and 32 <= self.input_size <= self.resize,
             f"input_size must be a multiple of 32 and <= resize, got {self.input_size} and {self.resize}")
        need(self.enlarge >= 1, f"enlarge must be >= 1, got {self.enlarge}")
        need(0 < self.iou_threshold <= 1, f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        need(self.proposals in PROPOSAL_METHODS and self.proposals != "edgeboxes",
             f"--proposals must be one of {sorted(set(PROPOSAL_METHODS) - {'edgeboxes'})}, "
             f"got {self.proposals!r}")
        need(self.max_proposals >= 0 and self.eval_max_proposals >= 0,
             "--eval-max-proposals and max_proposals must be >= 0")
        need(self.loader_workers >= 0, f"--loader-workers must be >= 0, got {self.loader_workers}")
        need(self.max_failures >= -1, f"--max-failures must be >= -1 (-1: no limit), got {self.max_failures}")
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")

    @property
    def world_size(self) -> int:
        return max(1, self.num_workers)

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size // self.world_size

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank and step (gradient accumulation)."""
        return self.batch_size // self.world_size // self.micro_batch

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def stage_of(self, step: int) -> int:
        """The stage that step `step` (0-based) trains in."""
        return 1 if step < self.stage1_steps else 2

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def results_uri(self) -> str:
        return storage.join(self.run_uri, RESULTS_DIR)

    def record(self) -> dict[str, Any]:
        """JSON-able, secrets redacted: what the run's config.json records."""
        d = dataclasses.asdict(self)
        d["storage_options"] = storage.redact(self.storage_options)
        d["extra_train_lists"] = list(self.extra_train_lists)
        return d


# What each preset changes in TrainConfig's (the paper's) defaults, and why.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        # 16 crops at 224 take about a second per step on 2 CPU cores, 64 would take 4.
        "batch_size": 16,
        # From scratch (no VGG16) on the synthetic set, the tiny net reaches
        # its plateau in a few hundred steps; 60k would take a CPU a day.
        "stage1_steps": 150,
        "stage2_steps": 250,
        "lr_step": 200,  # one decay late in each stage, as 9000/20000 and 10000/40000 do
        "eval_every": 100,
        "log_every": 10,
        "loader_workers": 0,  # a CPU-bound run: loader processes would only compete for cores
    },
}


def config_for(preset_name: str, **values: Any) -> TrainConfig:
    """A TrainConfig from the preset's recipe, with `values` (not None) on top."""
    if preset_name not in RECIPES:
        raise ValueError(f"--preset must be one of {sorted(RECIPES)}, got {preset_name!r}")
    given = {k: v for k, v in values.items() if v is not None}
    return TrainConfig(**{**RECIPES[preset_name], **given, "preset": preset_name})


# ------------------------------------------------------------------ VOC data

@dataclass(frozen=True)
class VocItem:
    """Where one sample's files are."""

    id: str
    image: str  # JPEG URI
    classes: str  # SegmentationClass PNG URI
    objects: str | None  # SegmentationObject PNG URI; None: derive objects from classes


@dataclass(frozen=True)
class VocSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    classes: np.ndarray  # (H, W) uint8 class ids, 255 = ignore
    objects: np.ndarray | None  # (H, W) uint8 instance ids, 0 background, 255 ignore


def read_list(root: str, list_uri: str, has_objects: bool,
              storage_options: storage.StorageOptions | None = None) -> list[VocItem]:
    """The items of one list file (ids, or 'IMAGE LABEL' paths relative to `root`)."""
    text = storage.read_bytes(list_uri, storage_options).decode()
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            i = fields[0]
            items.append(VocItem(i, storage.join(root, "JPEGImages", f"{i}.jpg"),
                                 storage.join(root, "SegmentationClass", f"{i}.png"),
                                 storage.join(root, "SegmentationObject", f"{i}.png") if has_objects else None))
        elif len(fields) == 2:
            image, label = fields
            i = image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            items.append(VocItem(i, storage.join(root, image), storage.join(root, label), None))
        else:
            raise ValueError(f"{list_uri} line {n}: expected an id or 'IMAGE LABEL', got {line!r}")
    return items


class VocDataset:
    """A list of VOC items under one root; `load(i)` reads and decodes one."""

    def __init__(self, items: Sequence[VocItem], storage_options: storage.StorageOptions | None = None):
        self.items = list(items)
        self.storage_options = dict(storage_options or {})

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> VocSample:
        item = self.items[index]
        opts = self.storage_options
        image = decode_image(storage.read_bytes(item.image, opts))
        classes = decode_label_png(storage.read_bytes(item.classes, opts))
        objects = None
        if item.objects is not None:
            try:
                objects = decode_label_png(storage.read_bytes(item.objects, opts))
            except FileNotFoundError:
                objects = None  # this id has no instance annotation: components instead
        for what, arr in (("labels", classes), ("objects", objects)):
            if arr is not None and arr.shape != image.shape[:2]:
                raise ValueError(f"{item.id}: {what} are {arr.shape[1]}x{arr.shape[0]} but the image is "
                                 f"{image.shape[1]}x{image.shape[0]}")
        return VocSample(image, classes, objects)


def open_voc(config: TrainConfig) -> tuple[VocDataset, VocDataset]:
    """(train, val): train.txt plus the extra lists, without duplicates and
    without any val image (SBD's lists include some of VOC's val images)."""
    opts = config.storage_options
    has_objects = storage.isdir(storage.join(config.data, "SegmentationObject"), opts)
    val = read_list(config.data, storage.join(config.data, VAL_LIST), has_objects, opts)
    val_ids = {v.id for v in val}
    train: dict[str, VocItem] = {}
    for uri in (storage.join(config.data, TRAIN_LIST), *config.extra_train_lists):
        for item in read_list(config.data, uri, has_objects, opts):
            if item.id not in val_ids:
                train.setdefault(item.id, item)
    assert train, f"{config.data}: no training images left after removing the val images"
    assert val, f"{config.data}: {VAL_LIST} is empty"
    return VocDataset(list(train.values()), opts), VocDataset(val, opts)


# -------------------------------------------------------------- augmentation

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
    """Training crops of one stage. Item `(index, key)`: image `index` of the
    VOC dataset, with the crop drawn by an RNG seeded from (seed, stage, key).
    Returns ((3, S, S) float32 image, (S, S) int64 labels)."""

    def __init__(self, voc: VocDataset, stage: int, config: TrainConfig, info: ModelInfo):
        assert stage in (1, 2), f"stage must be 1 or 2, got {stage}"
        self.voc, self.stage, self.config = voc, stage, config
        self.info = info
        self.num_classes = info.config.num_classes
        self.proposal_config = ProposalConfig(method=config.proposals, max_proposals=config.max_proposals,
                                              enlarge=1.0)  # IoU before enlargement; see module docstring

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, draw = key
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.stage, draw])
        sample = self.voc.load(index)
        bad = (sample.classes >= self.num_classes) & (sample.classes != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"{self.voc.items[index].classes}: class id {int(sample.classes[bad].max())} "
                             f"but the model has {self.num_classes} classes")
        objs = find_instances(sample.classes, sample.objects, cfg.min_object_side)
        box, labels = self.target(sample, objs, rng)
        pixels = torch.tensor(sample.image).permute(2, 0, 1).float()  # (3, H, W); a copy: decoded images are read-only
        return crop_and_augment(normalise(pixels, self.info), torch.from_numpy(labels),
                                box, cfg.resize, cfg.input_size, rng)

    def target(self, sample: VocSample, objs: list[Instance],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(crop box xyxy (4,), (H, W) uint8 labels) of this stage's rule."""
        h, w = sample.classes.shape
        whole = np.array([0, 0, w, h], np.float64)
        if not objs:  # nothing to centre on: the whole image, as labelled
            return whole, sample.classes
        if self.stage == 1:
            obj = objs[rng.integers(len(objs))]
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
    """Endless micro-batches ((B, 3, S, S), (B, S, S)) of this rank's share of the
    stage's stream, from this rank's sample `start` on."""
    sampler = StreamSampler(dataset, world_size, rank, config.seed, start)
    loader = DataLoader(dataset, batch_size=config.micro_batch, sampler=sampler,
                        num_workers=config.loader_workers, pin_memory=pin_memory,
                        persistent_workers=config.loader_workers > 0)
    return iter(loader)


# ------------------------------------------------------------ optimisation

def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """SGD groups: conv weights decayed; biases and BN parameters (all the
    1-D tensors) not, as the original's `weight_decay: 0` on biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr,
                           momentum=config.momentum)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Step decay within each stage: each stage starts at `lr`, as each of the
    original's two solvers did."""
    in_stage = step if step < config.stage1_steps else step - config.stage1_steps
    return config.lr * config.lr_gamma ** (in_stage // config.lr_step)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over the non-ignored pixels (0 if none).
    logits (B, C, H, W), labels (B, H, W) int64 with 255 = ignore."""
    valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / valid


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float,
               device: torch.device) -> torch.Tensor:
    """One SGD step over several micro-batches (gradient accumulation; DDP
    all-reduces only on the last). bf16 autocast on CUDA. Returns the mean loss
    as a 0-d tensor on `device` (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for k, (x, y) in enumerate(micro_batches):
        x = x.to(device, non_blocking=True)  # (B, 3, S, S)
        y = y.to(device, non_blocking=True)  # (B, S, S)
        last = k == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)  # (B, C, S, S)
            loss = segmentation_loss(logits, y) / n
            loss.backward()
        total += loss.detach()
    optimizer.step()
    return total


def autotune_convolutions(device: torch.device) -> None:
    """Let cuDNN pick its fastest kernels: every training crop has the same size."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the model)."""
    return getattr(model, "module", model)


def initial_model(config: TrainConfig) -> tuple[nn.Module, ModelInfo]:
    """The model a run starts from: --init's directory, or the preset with
    VOC's 21 classes and a random (He normal) encoder, seeded."""
    if config.init:
        model, info = load_model_dir(config.init, storage_options=config.storage_options)
        return model.train(), info
    arch = preset(config.preset, num_classes=len(VOC_CLASSES))
    torch.manual_seed(config.seed)
    return build_model(arch).train(), ModelInfo(config=arch, provenance={"encoder_init": "random (He normal)"})


def init_matches_preset(info: ModelInfo, preset_name: str) -> bool:
    """Whether a model directory's architecture is the preset's (any class count)."""
    return info.config == dataclasses.replace(PRESETS[preset_name], num_classes=info.config.num_classes)


# --------------------------------------------------------------- evaluation

def evaluate(model: nn.Module, dataset: VocDataset, info: ModelInfo, proposals: ProposalConfig,
             device: torch.device | str = "cpu", indices: Sequence[int] | None = None,
             images_per_batch: int = 4, batch_size: int = 32) -> ConfusionMatrix:
    """Confusion matrix of the model's labels on (some of) a VOC dataset.

    The labels are the segment job's with `--crf none`: the `Segmenter` over
    `propose(image, proposals)`, max-merged at each image's own size, argmax.
    Restores the model's train/eval mode afterwards; channels_last is left off
    so a training model's memory format is not changed.
    """
    was_training = model.training
    seg = Segmenter(model, info, SegmenterConfig(batch_size=batch_size, channels_last=False), device)
    cm = ConfusionMatrix(info.config.num_classes)
    order = list(range(len(dataset)) if indices is None else indices)
    for start in range(0, len(order), images_per_batch):
        samples = [dataset.load(i) for i in order[start: start + images_per_batch]]
        images = [s.image for s in samples]
        probs = seg.segment(images, [propose(im, proposals) for im in images])  # (C, H, W) each
        for p, s in zip(probs, samples):
            cm.update(p.argmax(0), s.classes)
    model.train(was_training)
    return cm


def broadcast_buffers_(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics): each rank
    updates its own in its last forward, and the exported model is rank 0's."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the DDP ranks in place (nothing to do with one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


# -------------------------------------------------------- state and results

@dataclass
class TrainState:
    """What a checkpoint restores besides the weights, and the curves so far."""

    step: int = 0  # steps done
    log: list[dict[str, float]] = field(default_factory=list)  # {step, stage, lr, loss}
    evals: list[dict[str, float]] = field(default_factory=list)  # {step, mean_iou, pixel_accuracy, mean_accuracy}
    resumed_from: list[int] = field(default_factory=list)  # the step of every resume

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrainState:
        return cls(step=int(d["step"]), log=list(d["log"]), evals=list(d["evals"]),
                   resumed_from=list(d["resumed_from"]))


OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


def save_checkpoint(directory: str, model: nn.Module, info: ModelInfo, optimizer: torch.optim.Optimizer,
                    state: TrainState) -> None:
    """Write a checkpoint directory: a model directory (`model.safetensors` +
    `config.json`, loadable by `load_model_dir`), the optimizer's tensors as
    safetensors, and the step, curves and optimizer settings as JSON. No pickle."""
    save_model_dir(unwrap(model), directory, info)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    storage.write_bytes(storage.join(directory, OPTIMIZER_FILE), st_save(tensors))
    payload = {"state": state.to_json(),
               "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    storage.write_bytes(storage.join(directory, STATE_FILE), json.dumps(payload, indent=1).encode())


def load_checkpoint(directory: str) -> tuple[nn.Module, ModelInfo, TrainState, dict[str, Any]]:
    """(model in train mode, its info, the train state, an optimizer state dict
    to load once the optimizer exists) from a `save_checkpoint` directory."""
    model, info = load_model_dir(directory)
    payload = json.loads(storage.read_bytes(storage.join(directory, STATE_FILE)))
    state: dict[int, dict[str, Any]] = {}
    for key, value in st_load(storage.read_bytes(storage.join(directory, OPTIMIZER_FILE))).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in payload["optimizer"]["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer_state = {"state": state, "param_groups": payload["optimizer"]["param_groups"]}
    return model.train(), info, TrainState.from_json(payload["state"]), optimizer_state


def history_csv(state: TrainState) -> str:
    """One row per logged step: step, stage, lr, loss, and the val scores where evaluated."""
    evals = {int(e["step"]): e for e in state.evals}
    steps = sorted({int(r["step"]) for r in state.log} | set(evals))
    logs = {int(r["step"]): r for r in state.log}
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["step", "stage", "lr", "loss", "val_mean_iou", "val_pixel_accuracy"])
    for s in steps:
        r, e = logs.get(s, {}), evals.get(s, {})
        out.writerow([s, r.get("stage", ""), _num(r.get("lr")), _num(r.get("loss")),
                      _num(e.get("mean_iou")), _num(e.get("pixel_accuracy"))])
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def plot_curves(state: TrainState, stage1_steps: int) -> bytes:
    """PNG: training loss and val mean IoU over steps, the stage change marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    ax_loss, ax_iou = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in state.log], [r["loss"] for r in state.log], lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_iou.plot([e["step"] for e in state.evals], [e["mean_iou"] for e in state.evals], marker="o", lw=1)
    ax_iou.set(xlabel="step", ylabel="val mean IoU", title="val mean IoU", ylim=(0, 1))
    for ax in (ax_loss, ax_iou):
        if 0 < stage1_steps < state.step:
            ax.axvline(stage1_steps, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_results(config: TrainConfig, state: TrainState, cm: ConfusionMatrix,
                  class_names: Sequence[str]) -> None:
    """Under <storage>/<name>/results/: the latest val table (the paper's Table 1
    layout) and per-class CSV, the history CSV and the curves PNG."""
    uri, opts = config.results_uri, config.storage_options
    step = state.step
    header = (f"val after step {step} (stage {config.stage_of(step - 1)}): mean IoU {cm.mean_iou():.4f}, "
              f"pixel accuracy {cm.pixel_accuracy():.4f}, {int(cm.matrix.sum())} pixels\n\n")
    storage.write_bytes(storage.join(uri, "val_iou.txt"),
                        (header + cm.table(class_names, name=f"step {step}") + "\n").encode(), opts)
    storage.write_bytes(storage.join(uri, "val_iou.csv"), cm.to_csv(class_names).encode(), opts)
    storage.write_bytes(storage.join(uri, "history.csv"), history_csv(state).encode(), opts)
    storage.write_bytes(storage.join(uri, "curves.png"), plot_curves(state, config.stage1_steps), opts)


def export_model(model: nn.Module, info: ModelInfo, config: TrainConfig, state: TrainState) -> ModelInfo:
    """Write the trained model directory to --export, with its provenance."""
    last = state.evals[-1] if state.evals else {}
    provenance = {
        "created": now_iso(), "created_by": "jobs/train.py", "run_name": config.name,
        "data": config.data, "extra_train_lists": list(config.extra_train_lists),
        "preset": config.preset, "init": config.init,
        "steps": state.step, "stage1_steps": config.stage1_steps, "stage2_steps": config.stage2_steps,
        "batch_size": config.batch_size, "val_mean_iou": last.get("mean_iou"),
        "val_pixel_accuracy": last.get("pixel_accuracy"),
        "val_proposals": f"{config.proposals} top {config.eval_max_proposals} + whole image",
        "encoder_init": info.provenance.get("encoder_init"),
    }
    out = dataclasses.replace(info, provenance=provenance, model_id="")
    return save_model_dir(unwrap(model), config.export, out, config.storage_options)


def read_final(config: TrainConfig) -> dict[str, Any] | None:
    """The run's final.json (written when it finished), or None."""
    try:
        return json.loads(storage.read_bytes(storage.join(config.results_uri, FINAL_FILE),
                                             config.storage_options))
    except FileNotFoundError:
        return None


def write_final(config: TrainConfig, state: TrainState, export_info: ModelInfo | None) -> dict[str, Any]:
    final = {"run": config.name, "finished": now_iso(), "step": state.step,
             "stage1_steps": config.stage1_steps, "stage2_steps": config.stage2_steps,
             "val": state.evals[-1] if state.evals else None, "resumed_from": state.resumed_from,
             "export": config.export, "model_id": export_info.model_id if export_info else None}
    storage.write_bytes(storage.join(config.results_uri, FINAL_FILE),
                        json.dumps(final, indent=2).encode(), config.storage_options)
    return final
