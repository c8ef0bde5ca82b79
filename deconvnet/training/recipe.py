"""Training DeconvNet the paper's way, in plain torch: the run's configuration
and recipes, the optimiser, the schedule, the loss, one training step, and
evaluation with the segmenter's own inference path. No Ray here; jobs/train.py
runs these on every Ray Train worker.

The rest of training lives beside it, one idea a module:
`deconvnet.data.voc` (the dataset layout and lists), `deconvnet.data.geometry` (objects
and boxes), `deconvnet.training.crops` (the two stages' crops, augmentation, class
balance, the sample stream) and `deconvnet.training.rundir` (checkpoints and everything
else under <storage>/<name>/).

Evaluation (`evaluate`) runs the exported model's own inference path with
the segment job's default inference mode (`deconvnet.inference.for_mode`:
its proposals, top N plus the whole image, its merge), then argmax, on whole
val images at their own size. So the val mean IoU is the number the segment
job's labels would score on the same images with the same proposals and
`--crf none`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import storage
from ..checks import Problems
from ..inference.crf import label_map
from ..inference.modes import NO_CRF, InferenceConfig, for_mode
from ..inference.proposals import PROPOSAL_METHODS, ProposalConfig, propose
from ..inference.segmenter import Segmenter
from ..metrics import ConfusionMatrix
from ..model import PRESETS, build_model, preset
from ..data.voc import IGNORE_INDEX, VOC_CLASSES, VocDataset
from ..weights import ModelInfo, load_model_dir


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; parsed from jobs/train.py's command
    line and recorded (secrets redacted) under <storage>/<name>/results/.

    Defaults are the paper's recipe (the authors' Caffe solvers,
    HyeonwooNoh/DeconvNet training/001_stage_1 and 002_stage_2); `RECIPES`
    holds what the tiny preset changes. Errors name the fields in backquotes
    (`batch_size`), so a job script can show its flag there instead.
    """

    data: str  # VOC-layout root URI
    storage: str  # checkpoints and results go under <storage>/<name>/
    name: str  # the run; the same name resumes
    extra_train_lists: tuple[str, ...] = ()  # more training lists (e.g. SBD ids)
    preset: str = "paper"  # architecture when there is no `init`, and the recipe
    init: str | None = None  # model directory to start from (its classes are used)
    # The paper's net from a random encoder trains poorly: without `init` a paper
    # run must say that this is what it wants.
    random_encoder: bool = False
    num_workers: int = 1  # DDP ranks; 0 runs the loop in the driver (Ray Train local mode)
    use_gpu: bool = False
    batch_size: int = 64  # global: the solvers' data batch 8 x iter_size 8
    # Crops per forward on a rank, so BatchNorm's statistics are over this many
    # crops: the solvers' data batch of 8 (gradients accumulate over iter_size 8).
    # None: the rank's whole share in one forward.
    micro_batch_size: int | None = 8
    stage1_steps: int = 20000  # stage-1 solver's max_iter
    stage2_steps: int = 40000  # stage-2 solver's max_iter
    lr: float = 0.01  # base_lr of both solvers; each stage starts at it
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv weights (and BN, see below), never on biases
    bias_lr_mult: float = 2.0  # the prototxts' `blobs_lr: 2` on every bias
    decay_bn: bool = True  # the prototxts' BN layers carry no multipliers, so Caffe decays them
    stage1_lr_step: int = 9000  # stage-1 solver's stepsize
    stage2_lr_step: int = 10000  # stage-2 solver's stepsize
    lr_gamma: float = 0.1
    balance_classes: bool = True  # stage 1: classes balanced by repetition (paper, section 3.3)
    eval_every: int = 500  # a checkpoint goes with every evaluation
    log_every: int = 20  # steps per logged (all-reduced) training loss
    export: str | None = None  # model directory to write at the end
    seed: int = 0
    input_size: int = 224  # the network's crop size, as at inference
    resize: int = 250  # crops are resized to this before the random input_size crop
    enlarge: float = 1.2  # object boxes and proposals grow 1.2x around their centre
    iou_threshold: float = 0.5  # stage 2: proposal box vs object box
    # Stage-2 and evaluation proposals: the default inference mode's, so val mIoU is the
    # segment job's number. None: the mode's (its method without an edge model: grid).
    proposals: str | None = None
    max_proposals: int | None = None  # stage-2 candidates per image; None: the mode's top N
    eval_max_proposals: int | None = None  # val proposals per image; None: the mode's, as the segment job
    # Objects whose tight box is narrower than this would be magnified more
    # than 28x to the 224 input: no context left, nothing to learn from.
    min_object_side: int = 8
    loader_workers: int = 6  # DataLoader processes per rank: JPEG decode + crops keep a GPU fed
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # the latest ones are kept in storage
    # Never in a repr: Ray Train shows the train loop config in its dashboard.
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        """Raise ValueError naming the fields, with a message a user can act on."""
        problems = Problems(self)
        problems.one_of("preset", sorted(RECIPES))
        problems.check("name", bool(self.name) and all(c.isalnum() or c in "._-" for c in self.name)
                       and self.name[0] != ".", "must be letters, digits, '.', '_' or '-'")
        if self.init is None and not self.random_encoder and self.preset == "paper":
            problems.add("a 'paper' run needs an ImageNet encoder: give `init` a model directory made with "
                         "`python -m deconvnet init --vgg16 ...` or `convert-caffe --kind vgg16`, "
                         "or set `random_encoder` to train from a random encoder on purpose")
        problems.at_least("num_workers", 0)
        problems.at_least("batch_size", 1)
        problems.at_least("micro_batch_size", 1, none_ok=True)
        if self.batch_size >= 1 and (self.micro_batch_size or 1) >= 1:
            if self.batch_size % self.world_size:
                problems.add(f"`batch_size` {self.batch_size} does not split evenly over {self.world_size} workers")
            # fc6's output is 1x1 per crop, so its BatchNorm needs 2 crops per forward to train.
            elif self.crops_per_forward < 2:
                problems.add(f"a forward needs at least 2 crops (BatchNorm after fc6 sees one value per crop), "
                             f"got {self.crops_per_forward} (`micro_batch_size` {self.micro_batch_size}, "
                             f"`batch_size` {self.batch_size} over {self.world_size} workers)")
            elif self.per_rank % self.crops_per_forward:
                problems.add(f"`micro_batch_size` {self.crops_per_forward} does not divide the per-worker batch "
                             f"{self.per_rank} (`batch_size` {self.batch_size} over {self.world_size} workers)")
        if not (self.stage1_steps >= 0 and self.stage2_steps >= 0 and self.total_steps >= 1):
            problems.add(f"`stage1_steps` and `stage2_steps` must be >= 0 with a positive sum, "
                         f"got {self.stage1_steps} and {self.stage2_steps}")
        problems.check("lr", math.isfinite(self.lr) and self.lr > 0, "must be > 0")
        problems.check("momentum", 0 <= self.momentum < 1, "must be in [0, 1)")
        problems.at_least("weight_decay", 0)
        problems.check("bias_lr_mult", self.bias_lr_mult > 0, "must be > 0")
        problems.at_least("stage1_lr_step", 1)
        problems.at_least("stage2_lr_step", 1)
        problems.check("lr_gamma", 0 < self.lr_gamma <= 1, "must be in (0, 1]")
        problems.at_least("eval_every", 1)
        problems.at_least("log_every", 1)
        if not (self.input_size % 32 == 0 and 32 <= self.input_size <= self.resize):
            problems.add(f"`input_size` must be a multiple of 32 and <= `resize`, got {self.input_size} "
                         f"and {self.resize}")
        problems.check("enlarge", self.enlarge >= 1, "must be >= 1")
        problems.check("iou_threshold", 0 < self.iou_threshold <= 1, "must be in (0, 1]")
        problems.one_of("proposals", TRAINING_PROPOSALS, none_ok=True)
        problems.at_least("max_proposals", 0, none_ok=True)
        problems.at_least("eval_max_proposals", 0, none_ok=True)
        problems.at_least("loader_workers", 0)
        problems.check("max_failures", self.max_failures >= -1, "must be >= -1 (-1: no limit)")
        problems.at_least("keep_checkpoints", 1)
        problems.raise_any()

    def evaluation(self) -> InferenceConfig:
        """Val inference: the segment job's default mode with `crf` none on
        `proposals` and `eval_max_proposals` (None: the mode's), so val mean
        IoU is the number its labels would score on the same images."""
        return for_mode("default", proposals=self.proposals, max_proposals=self.eval_max_proposals, crf=NO_CRF)

    def stage2_proposals(self) -> ProposalConfig:
        """Stage-2 candidates: the default mode's proposals, `max_proposals` of
        them, unenlarged (the IoU is taken before the enlargement: crops.py)."""
        return for_mode("default", proposals=self.proposals, max_proposals=self.max_proposals, enlarge=1.0).proposals

    @property
    def world_size(self) -> int:
        return max(1, self.num_workers)

    @property
    def per_rank(self) -> int:
        """Crops per step on each rank."""
        return self.batch_size // self.world_size

    @property
    def crops_per_forward(self) -> int:
        """Crops in one forward (BatchNorm's batch): `micro_batch_size`, at most the rank's share."""
        return min(self.micro_batch_size or self.per_rank, self.per_rank)

    @property
    def accumulation(self) -> int:
        """Forwards per rank and step (gradient accumulation)."""
        return self.per_rank // self.crops_per_forward

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def stage_of(self, step: int) -> int:
        """The stage that step `step` (0-based) trains in."""
        return 1 if step < self.stage1_steps else 2

    def record(self) -> dict[str, Any]:
        """JSON-able, secrets redacted: what the run's config.json records, with
        the proposal settings as the inference mode fills them in."""
        d = dataclasses.asdict(self)
        d["storage_options"] = storage.redact(self.storage_options)
        d["extra_train_lists"] = list(self.extra_train_lists)
        evaluation = self.evaluation().proposals
        d.update(proposals=evaluation.method, eval_max_proposals=evaluation.max_proposals,
                 max_proposals=self.stage2_proposals().max_proposals)
        return d


# Proposal generators training can use: EdgeBoxes needs a model file, which a
# training run does not take.
TRAINING_PROPOSALS = tuple(m for m in PROPOSAL_METHODS if m != "edgeboxes")

# What each preset changes in TrainConfig's (the paper's) defaults, and why.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        # A small net for CPUs and tests: no ImageNet encoder to start from.
        "random_encoder": True,
        # 16 crops at 224 take about a second per step on 2 CPU cores, 64 would take 4.
        "batch_size": 16,
        "micro_batch_size": None,  # one forward per rank and step
        # From scratch (no VGG16) on the synthetic set, the tiny net reaches
        # its plateau in a few hundred steps; 60k would take a CPU a day.
        "stage1_steps": 150,
        "stage2_steps": 250,
        # One decay late in each stage, as 9000/20000 and 10000/40000 do.
        "stage1_lr_step": 200,
        "stage2_lr_step": 200,
        # The synthetic scenes' classes are about equally frequent, and the
        # learning check (README) was measured with uniform sampling.
        "balance_classes": False,
        # Measured on that check: with the prototxts' 2x bias lr and decayed BN,
        # 400 steps from scratch reached val mean IoU 0.650 instead of about 0.9.
        "bias_lr_mult": 1.0,
        "decay_bn": False,
        "eval_every": 100,
        "log_every": 10,
        "loader_workers": 0,  # a CPU-bound run: loader processes would only compete for cores
    },
}


def config_for(preset_name: str, **values: Any) -> TrainConfig:
    """A TrainConfig from the preset's recipe, with `values` (not None) on top."""
    if preset_name not in RECIPES:
        raise ValueError(f"`preset` must be one of {sorted(RECIPES)}, got {preset_name!r}")
    given = {k: v for k, v in values.items() if v is not None}
    return TrainConfig(**{**RECIPES[preset_name], **given, "preset": preset_name})


# ------------------------------------------------------------ optimisation

def param_groups(model: nn.Module, weight_decay: float, bias_lr_mult: float = 2.0,
                 decay_bn: bool = True) -> list[dict[str, Any]]:
    """SGD groups: conv weights, biases, BN scale/shift. The defaults are the
    multipliers of the authors' training prototxts (HyeonwooNoh/DeconvNet
    training/001_stage_1/stage_1_train.prototxt): every conv/deconv layer has
    `blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0`, so weights learn
    at lr and decay, biases learn at 2 x lr and do not decay; BN layers carry
    no multipliers, so their scale and shift learn at lr and decay.
    `lr_mult` is applied by `train_step`."""
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters()}
    weights, biases, bn = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (bn if id(p) in norm else biases if p.ndim <= 1 else weights).append(p)
    return [{"params": weights, "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": biases, "weight_decay": 0.0, "lr_mult": bias_lr_mult},
            {"params": bn, "weight_decay": weight_decay if decay_bn else 0.0, "lr_mult": 1.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    groups = param_groups(model, config.weight_decay, config.bias_lr_mult, config.decay_bn)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Step decay within each stage: each stage starts at `lr` and decays every
    `stage<k>_lr_step` steps, as each of the two solvers does (`lr_policy: step`)."""
    if step < config.stage1_steps:
        return config.lr * config.lr_gamma ** (step // config.stage1_lr_step)
    return config.lr * config.lr_gamma ** ((step - config.stage1_steps) // config.stage2_lr_step)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over the non-ignored pixels (0 if none).
    logits (B, C, H, W), labels (B, H, W) int64 with 255 = ignore."""
    valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / valid


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               forwards: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float,
               device: torch.device) -> torch.Tensor:
    """One SGD step over several forward batches (gradient accumulation; DDP
    all-reduces only on the last). bf16 autocast on CUDA. Returns the mean loss
    as a 0-d tensor on `device` (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    optimizer.zero_grad(set_to_none=True)
    n = len(forwards)
    total = torch.zeros((), device=device)
    for k, (x, y) in enumerate(forwards):
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

def evaluate(model: nn.Module, dataset: VocDataset, info: ModelInfo, inference: InferenceConfig,
             device: torch.device | str = "cpu", indices: Sequence[int] | None = None,
             images_per_batch: int = 4) -> ConfusionMatrix:
    """Confusion matrix of the model's labels on (some of) a VOC dataset.

    The labels are the segment job's with the same inference config
    (`TrainConfig.evaluation`: default mode, no CRF): the `Segmenter` over
    `propose()` boxes, merged at each image's own size, then `label_map`.
    Restores the model's train/eval mode afterwards; channels_last is left off
    so a training model's memory format is not changed.
    """
    was_training = model.training
    seg = Segmenter(model, info, dataclasses.replace(inference.segmenter, channels_last=False), device)
    cm = ConfusionMatrix(info.config.num_classes)
    order = list(range(len(dataset)) if indices is None else indices)
    for start in range(0, len(order), images_per_batch):
        samples = [dataset.load(i) for i in order[start: start + images_per_batch]]
        images = [s.image for s in samples]
        probs = seg.probabilities(images, [propose(im, inference.proposals) for im in images])  # (C, H, W) each
        for image, p, s in zip(images, probs, samples):
            cm.update(label_map(image, p, inference.crf)[0], s.classes)
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
