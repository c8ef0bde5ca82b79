"""Inference modes: the one place that says what `original` and `default` mean,
and the one place inference defaults are written (`MODE_TABLE`).

    from deconvnet.inference import for_mode
    from deconvnet.inference.crf import label_map
    cfg = for_mode("original", edge_model="model.yml.gz")
    boxes = propose(image, cfg.proposals, storage_options)
    probs = Segmenter.from_model_dir(uri, cfg.segmenter).probabilities([image], [boxes])[0]
    labels, mean_confidence, uncertainty = label_map(image, probs, cfg.crf)  # the CRF, or argmax without one

`original` is what the authors' release does (HyeonwooNoh/DeconvNet
inference/generate_EDeconvNet_CRF_results.m, inference/util/preprocess_image_bb.m;
the CRF through johannesu/meanfield-matlab), on the boxes of whatever proposal
method is chosen (the release used cached EdgeBoxes boxes):
- proposals: enlarged boxes whose shorter side is under 112 px are skipped
  (`if min(box_wd, box_ht) < 112, continue; end`), the first 50 that pass are
  processed (`if cnt_process >= config.max_proposal_num, break`), no whole-image
  box, no dedupe;
- crops: the image is padded with black (`padarray(I, ...)`, zeros) before the
  mean is subtracted;
- merge: raw `seg-score` maps, resized to the box, max-merged into a zero map;
  softmax of the aggregate;
- EDeconvNet: `softmax(deconv_score .* max(0, fcn_score))`;
- CRF: the chosen preset as it stands ("paper" is the release's:
  CONST_KERNEL, NO_NORMALIZATION, unclipped -log p), every label, every
  mean-field step (`exact`).

`default` is the project's choice where it serves users better: the whole image
is added so every pixel is covered, boxes under 16 px (before enlarging) are
skipped and duplicates dropped, each proposal's softmax is merged and the merged
map renormalised, padding is the mean colour (what the network sees at a real
image border after normalisation, rather than a black frame), the ensemble is
the mean of the two probability maps (the paper's text), and the CRF's kernels
are normalised (NORMALIZE_SYMMETRIC, DIAG_KERNEL, p clipped at 1e-5:
pydensecrf's defaults) with the preset's stds and weights, and labels that
cannot win are left out and the steps stop when the labels settle
(`exact` False: deconvnet/inference/crf.py). On tests/test_crf.py's
coarse map the normalised "paper" CRF reaches IoU 0.998 where the release's
unnormalised one reaches 0.973.

Everyone who runs inference builds its configs here: the segment job, both
command lines (their flags' defaults are read from the table), training's
evaluation (default mode, so its val mean IoU is the segment job's) and
training's stage-2 proposals. A `ProposalConfig` or `SegmenterConfig` built
directly takes what it is not given from the default mode's row too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .crf import CRF_PRESETS, CRFConfig, crf_config
from .proposals import PROPOSAL_METHODS, ProposalConfig
from .segmenter import SegmenterConfig

INFERENCE_MODES = ("default", "original")
NO_CRF = "none"  # the `crf` setting that runs no CRF (argmax of the merged map)

# The mode table. `default` sets every default inference has, `original` only
# what the release does otherwise (its values are fixed: `for_mode` refuses
# others). "crf" is the CRF preset (or "none"); "crf_rules" what the mode
# changes in the preset, not inherited: `original` runs the preset as it is,
# exactly (its `exact` is fixed too, as `crf_exact`).
# Fields of the configs that no mode sets (enlarge, max_side, input_size,
# dtype, the CRF's stds and weights, ...) are the configs' own defaults.
MODE_TABLE: dict[str, dict[str, Any]] = {
    "default": {
        "proposals": dict(max_proposals=50, min_side=16, min_side_enlarged=False, whole_image=True, dedupe=True),
        "segmenter": dict(batch_size=32, aggregate="max", merge="softmax", pad="mean", ensemble="mean"),
        "crf": "paper",
        "crf_rules": dict(kernel="diag", normalization="symmetric", unary_clip=1e-5, exact=False),
    },
    "original": {
        "proposals": dict(min_side=112, min_side_enlarged=True, whole_image=False, dedupe=False,
                          candidates=1000),  # EdgeBoxes: enough boxes for 50 to pass 112 px
        "segmenter": dict(aggregate="max", merge="raw", pad="black", ensemble="relu-product"),
        "crf_rules": dict(exact=True),
    },
}

# The settings a run chooses: the segment job's config fields and both command
# lines' flags of these names (--max-proposals, ...), passed to `for_mode`.
RUN_SETTINGS = ("proposals", "edge_model", "max_proposals", "aggregate", "ensemble", "crf", "crf_max_side",
                "crf_exact", "batch_size")

_PROPOSAL_FIELDS = {f.name for f in dataclasses.fields(ProposalConfig)}
_SEGMENTER_FIELDS = {f.name for f in dataclasses.fields(SegmenterConfig)}
_CRF_FIELDS = {f.name for f in dataclasses.fields(CRFConfig)}


@dataclass(frozen=True)
class InferenceConfig:
    """Everything one mode fixes: proposals, segmenter, CRF (None: no CRF, argmax)."""
    mode: str
    proposals: ProposalConfig
    segmenter: SegmenterConfig
    crf: CRFConfig | None


def mode_row(mode: str = "default") -> dict[str, Any]:
    """A mode's whole row of the table: the default row with the mode's own on top."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"`inference` must be one of {', '.join(INFERENCE_MODES)}, got {mode!r}")
    base, own = MODE_TABLE["default"], MODE_TABLE[mode]
    return {**base, **own, "proposals": {**base["proposals"], **own["proposals"]},
            "segmenter": {**base["segmenter"], **own["segmenter"]}}


def fixed_by(mode: str) -> dict[str, Any]:
    """The settings a mode other than `default` fixes (the release's rules),
    with their values: proposal and segmenter fields, and `crf_<field>` for
    its CRF rules; `for_mode` refuses others."""
    own = MODE_TABLE[mode]
    return {} if mode == "default" else {**own["proposals"], **own["segmenter"],
                                         **{f"crf_{k}": v for k, v in own["crf_rules"].items()}}


def fill_defaults(config: ProposalConfig | SegmenterConfig, section: str) -> None:
    """Give a config built directly (not by `for_mode`) the default mode's
    value of each field of `section` ("proposals" or "segmenter") left None."""
    for name, value in MODE_TABLE["default"][section].items():
        if getattr(config, name) is None:
            object.__setattr__(config, name, value)  # frozen: this is part of its construction


def setting(name: str, mode: str = "default") -> Any:
    """What `for_mode(mode)` uses for one of its settings (`max_proposals`,
    `batch_size`, `crf`, ...) when it is not given; None when no mode sets it."""
    row = mode_row(mode)
    if name == "crf":
        return row["crf"]
    if name.startswith("crf_"):
        return row["crf_rules"].get(name[4:])
    return row["proposals"].get(name, row["segmenter"].get(name))


def for_mode(mode: str = "default", **overrides: Any) -> InferenceConfig:
    """The proposal, segmenter and CRF configs of one inference mode.

    mode: "default" or "original" (module docstring). overrides, each None =
    the mode's: `proposals` (the proposal method; by default "edgeboxes" when
    `edge_model` is given, else "grid"), `crf` (a CRF preset or "none"),
    `crf_<field>` (a CRFConfig field, e.g. `crf_max_side`), and any other
    ProposalConfig or SegmenterConfig field (`max_proposals`, `batch_size`,
    `aggregate`, `ensemble`, `edge_model`, `dtype`, ...). In `original` the
    fields its row sets are the release's and cannot be changed.
    ValueError names the setting at fault in backquotes.
    """
    row = mode_row(mode)
    given = {k: v for k, v in overrides.items() if v is not None}
    proposals, segmenter, crf_fields = dict(row["proposals"]), dict(row["segmenter"]), {}
    preset = given.pop("crf", row["crf"])
    if "proposals" in given:
        proposals["method"] = given.pop("proposals")
    fixed = fixed_by(mode)
    problems = []
    for name, value in given.items():
        if name in fixed and value != fixed[name]:
            problems.append(f"`inference` {mode}: `{name}`: inference {mode!r} uses {fixed[name]!r} "
                            f"(the release's), got {value!r}; use inference 'default' for other rules")
        elif name in _PROPOSAL_FIELDS:
            proposals[name] = value
        elif name in _SEGMENTER_FIELDS:
            segmenter[name] = value
        elif name.startswith("crf_") and name[4:] in _CRF_FIELDS:
            crf_fields[name[4:]] = value
        else:
            problems.append(f"`{name}` is not an inference setting")
    if proposals.get("method", "grid") not in PROPOSAL_METHODS:  # the config would call it `method`
        problems.append(f"`proposals` must be one of {', '.join(sorted(PROPOSAL_METHODS))}, "
                        f"got {proposals.pop('method')!r}")
    if preset != NO_CRF and preset not in CRF_PRESETS:
        problems.append(f"`crf` must be one of {', '.join([*sorted(CRF_PRESETS), NO_CRF])}, got {preset!r}")

    def build(make, rename=lambda message: message):
        try:
            return make()
        except ValueError as e:
            problems.append(rename(str(e)))

    config = InferenceConfig(
        mode, build(lambda: ProposalConfig(**proposals)), build(lambda: SegmenterConfig(**segmenter)),
        None if preset == NO_CRF or preset not in CRF_PRESETS else build(
            lambda: dataclasses.replace(crf_config(preset), **{**row["crf_rules"], **crf_fields}),
            lambda message: re.sub(r"`(\w+)`", r"`crf_\1`", message)))  # here CRF fields are crf_<field>
    if problems:
        raise ValueError("; ".join(problems))
    return config


# Fields that choose how the arithmetic is done, not what is computed: left out
# of the labelling key. The batch only groups the same crops; dtype ("auto":
# bf16 on CUDA, fp32 on CPU) and memory layout move a probability by rounding,
# which can flip a pixel where two classes tie but decides no setting's mask.
EXECUTION_FIELDS = {"segmenter": ("batch_size", "dtype", "channels_last")}


def labelling_key(inference: InferenceConfig, model_id: str, fcn_model_id: str | None = None) -> str:
    """The id of everything that decides a mask: the model, the FCN-8s model of
    the ensemble (and the ensemble rule, which only counts with one), the mode,
    and every field of the proposal, segmenter and CRF configs (the CRF None:
    none runs) but EXECUTION_FIELDS. A field at its declared default is left
    out, so a field added later whose default keeps today's masks leaves every
    key as it was, and one set otherwise changes it. 16 hex digits of a SHA-256
    of canonical JSON: two runs with one key make the same masks."""
    def changed(config, section: str) -> dict[str, Any] | None:
        if config is None:
            return None
        skip = set(EXECUTION_FIELDS.get(section, ())) | ({"ensemble"} if fcn_model_id is None else set())
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if f.name not in skip and getattr(config, f.name) != f.default}

    settings = {"model_id": model_id, "fcn_model_id": fcn_model_id, "mode": inference.mode,
                **{s: changed(getattr(inference, s), s) for s in ("proposals", "segmenter", "crf")}}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def default_labelling_key(model_id: str) -> str:
    """The key of the default settings with this model and no FCN-8s: what rows
    written before rows had keys were labelled with, when they count as done."""
    return labelling_key(for_mode("default"), model_id)
