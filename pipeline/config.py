"""The segment job's configuration: one frozen dataclass, parsed from the
command line by jobs/segment_dataset.py and recorded in the run's record.
It checks itself: a bad value is a ValueError that names each field at fault
in backquotes (`batch_size`), which the command line turns into its flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from deconvnet import storage
from deconvnet.checks import Problems
from deconvnet.inference import INFERENCE_MODES, InferenceConfig, for_mode
from deconvnet.inference.modes import RUN_SETTINGS, setting

CRF_DEVICES = ("cpu", "gpu")  # where the segment job's CRF runs: SegmentJobConfig.crf_device
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class SegmentJobConfig:
    input: str  # prefix or single file, any fsspec URI or local path
    output: str  # masks/, overlays/, predictions/, runs/, index.html go under it
    model: str  # DeconvNet model directory
    fcn_model: str | None = None  # FCN-8s model directory: EDeconvNet ensemble
    # "original": what the authors' release does; "default": the project's rules.
    # The inference settings below, None = the mode's: deconvnet/inference/modes.py's
    # MODE_TABLE is the one place their defaults are written (`for_mode`).
    inference: str = "default"
    ensemble: str | None = None  # EDeconvNet rule with fcn_model
    proposals: str | None = None  # the proposal method; the mode's: edgeboxes with an edge model, else grid
    edge_model: str | None = None  # structured-edge model for edgeboxes
    max_proposals: int | None = None  # boxes segmented per image
    aggregate: str | None = None  # merge of proposal maps
    crf: str | None = None  # a CRF preset ("paper": the release's parameters, "deeplab") or "none"
    crf_max_side: int | None = None  # run the CRF on at most this longer side; None: full size
    crf_exact: bool | None = None  # the CRF's full computation (no label pruning, no early stop)
    batch_size: int | None = None  # proposals per forward pass; bounds GPU memory
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
    # The CRF on "cpu" workers (pydensecrf), or on "gpu": the torch engine inside the segment
    # actor, on its device (the CPU in a CPU-only run), so no probability map leaves it.
    crf_device: str = "cpu"
    limit: int | None = None  # only the first N inputs (sorted), for trials
    incremental: bool = True  # skip inputs already labelled by this model with these settings
    overlays: bool = False  # also write colour overlays as JPEG
    gallery: bool = False  # write index.html: a sample, its overlays, a per-class pixel chart
    gallery_size: int = 48  # images on that page: a screenful or two, quick to load
    fail_on_error: bool = False  # exit 1 when any input is an error row
    rows_per_part: int = 5000  # Parquet rows per part file written by the driver
    # Images labelled per Ray Dataset: a run proceeds in segments of this many (listing.Segment),
    # which bounds what the driver holds (Ray Data keeps a record per block until a Dataset ends).
    segment_images: int = 200_000
    part_seconds: float = 60.0  # ...or a part at least this often: a killed run loses at most this much work
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = Problems(self)
        for name in ("input", "output", "model"):
            problems.check(name, bool(getattr(self, name)), "must be a URI or path")
        problems.one_of("inference", INFERENCE_MODES)
        problems.one_of("device", ("auto", "gpu", "cpu"))
        problems.one_of("crf_device", CRF_DEVICES)
        for name in ("images_per_batch", "gallery_size", "rows_per_part", "segment_images"):
            problems.at_least(name, 1)
        for name in ("crf_cpus", "limit"):
            problems.at_least(name, 1, none_ok=True)
        for name in ("gpus_per_actor", "part_seconds"):
            problems.check(name, getattr(self, name) > 0, "must be > 0")
        if self.crf_cpus is not None and self.crf_device == "gpu":
            problems.add("`crf_cpus` sets how many CRF tasks run at once; with `crf_device` 'gpu' the CRF runs "
                         "in the segment actor and there are none")
        problems.check("cpus_per_actor", self.cpus_per_actor is None or self.cpus_per_actor > 0, "must be > 0")
        problems.check("gpu_actors", self.gpu_actors is None or 1 <= self.gpu_actors[0] <= self.gpu_actors[1],
                       "need 1 <= MIN <= MAX")
        if self.inference in INFERENCE_MODES:
            try:  # the inference settings: checked where they are used
                self.inference_config()
            except ValueError as e:
                problems.add(str(e))
        problems.raise_any()

    def inference_config(self) -> InferenceConfig:
        """The proposal, segmenter and CRF configs of this run: its mode's, with
        the inference settings it gives on top. With `crf_device` "gpu" the CRF
        is the torch engine's, which computes every label and step: `exact`, so
        the labelling key says how the masks were made."""
        inference = for_mode(self.inference, **{name: getattr(self, name) for name in RUN_SETTINGS})
        if self.crf_device == "gpu" and inference.crf is not None and not inference.crf.exact:
            inference = dataclasses.replace(inference, crf=dataclasses.replace(inference.crf, exact=True))
        return inference

    def record(self) -> dict[str, Any]:
        """The config as written to runs/<id>.json: secrets redacted, and each
        inference setting left to the mode as the mode sets it."""
        d = dataclasses.asdict(self)
        d["storage_options"] = storage.redact(self.storage_options)
        for name in RUN_SETTINGS:
            if d[name] is None:
                d[name] = setting(name, self.inference)
        return d

