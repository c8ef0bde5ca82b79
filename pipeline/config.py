"""The segment job's configuration: one frozen dataclass, parsed from the
command line by jobs/segment_dataset.py and recorded in the run's record.
It checks itself: a bad value is a ValueError that names each field at fault
in backquotes (`batch_size`), which the command line turns into its flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from deconvnet import storage
from deconvnet.inference.crf import CRF_PRESETS
from deconvnet.inference import INFERENCE_MODES, InferenceConfigs, inference_configs
from deconvnet.inference.proposals import PROPOSAL_METHODS
from deconvnet.inference.segmenter import AGGREGATES, ENSEMBLES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class SegmentJobConfig:
    input: str  # prefix or single file, any fsspec URI or local path
    output: str  # masks/, overlays/, predictions/, runs/, index.html go under it
    model: str  # DeconvNet model directory
    fcn_model: str | None = None  # FCN-8s model directory: EDeconvNet ensemble
    # "original": what the authors' release does; "default": the project's rules
    # (deconvnet/inference/modes.py has the one table of differences).
    inference: str = "default"
    ensemble: str | None = None  # None: the mode's (mean of probabilities; original: its relu-product)
    proposals: str | None = None  # None: edgeboxes with an edge model, else grid (needs no model file)
    edge_model: str | None = None  # structured-edge model for edgeboxes
    max_proposals: int = 50  # the paper's top 50
    aggregate: str | None = None  # None: the mode's (pixel-wise max)
    crf: str = "paper"  # "paper" (the release's parameters), "deeplab" or "none"
    crf_max_side: int | None = None  # run the CRF on at most this longer side
    batch_size: int = 32  # proposals per forward pass; bounds GPU memory
    images_per_batch: int = 8  # images handed to a segment actor per call
    gpu_actors: tuple[int, int] | None = None  # (min, max); None = one per GPU, 1 on CPU
    # Segment actors on "gpu" or "cpu"; "auto": GPUs when the cluster has some now. An
    # autoscaling cluster at zero GPU nodes needs "gpu", which asks for them.
    device: str = "auto"
    gpus_per_actor: float = 1.0
    # CPU actors (no GPU): CPUs reserved = torch threads. None: reserve 1 and let torch use
    # the node's cores, shared by the pool's actors (the model is a CPU-only job's bottleneck).
    cpus_per_actor: float | None = None
    crf_cpus: int | None = None  # CRF tasks at once; None = as many as free CPUs
    limit: int | None = None  # only the first N inputs (sorted), for trials
    incremental: bool = True  # skip inputs already labelled by this model
    overlays: bool = False  # also write colour overlays as JPEG
    gallery: bool = False  # write index.html: a sample, its overlays, a per-class pixel chart
    gallery_size: int = 48  # images on that page: a screenful or two, quick to load
    fail_on_error: bool = False  # exit 1 when any input is an error row
    rows_per_part: int = 5000  # Parquet rows per part file written by the driver
    part_seconds: float = 60.0  # ...or a part at least this often: a killed run loses at most this much work
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems: list[str] = []

        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                problems.append(f"`{name}` {what}, got {getattr(self, name)!r}")

        for name in ("input", "output", "model"):
            check(name, bool(getattr(self, name)), "must be a URI or path")
        check("inference", self.inference in INFERENCE_MODES, f"must be one of {', '.join(INFERENCE_MODES)}")
        check("ensemble", self.ensemble in (None, *ENSEMBLES), f"must be one of {', '.join(ENSEMBLES)}")
        check("proposals", self.proposals in (None, *PROPOSAL_METHODS),
              f"must be one of {', '.join(sorted(PROPOSAL_METHODS))}")
        check("aggregate", self.aggregate in (None, *AGGREGATES), f"must be one of {', '.join(AGGREGATES)}")
        check("crf", self.crf in (*CRF_PRESETS, "none"), f"must be one of {', '.join([*sorted(CRF_PRESETS), 'none'])}")
        check("device", self.device in ("auto", "gpu", "cpu"), "must be auto, gpu or cpu")
        check("max_proposals", self.max_proposals >= 0, "must be >= 0")
        for name in ("batch_size", "images_per_batch", "gallery_size", "rows_per_part"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        for name in ("crf_max_side", "crf_cpus", "limit"):
            check(name, getattr(self, name) is None or getattr(self, name) >= 1, "must be >= 1")
        for name in ("gpus_per_actor", "part_seconds"):
            check(name, getattr(self, name) > 0, "must be > 0")
        check("cpus_per_actor", self.cpus_per_actor is None or self.cpus_per_actor > 0, "must be > 0")
        check("gpu_actors", self.gpu_actors is None or 1 <= self.gpu_actors[0] <= self.gpu_actors[1],
              "need 1 <= MIN <= MAX")
        if problems:
            raise ValueError("; ".join(problems))
        try:
            self.inference_configs()
        except ValueError as e:  # a rule the mode fixes, or edgeboxes without a model
            raise ValueError(f"`inference` {self.inference}: {e}") from None

    def inference_configs(self) -> InferenceConfigs:
        """The proposal, segmenter and CRF configs of this run's inference mode."""
        return inference_configs(self.inference, proposals=self.proposals, max_proposals=self.max_proposals,
                                 edge_model=self.edge_model, batch_size=self.batch_size, aggregate=self.aggregate,
                                 ensemble=self.ensemble, crf=self.crf, crf_max_side=self.crf_max_side)

    def record(self) -> dict[str, Any]:
        """The config as written to runs/<id>.json: secrets redacted."""
        d = dataclasses.asdict(self)
        d["storage_options"] = storage.redact(self.storage_options)
        return d
