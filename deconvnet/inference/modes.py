"""Inference modes: the one place that says what `original` and `default` mean.

    from deconvnet.inference import inference_configs
    cfg = inference_configs("original", edge_model="model.yml.gz", crf="paper")
    boxes = propose(image, cfg.proposals, storage_options)
    probs = Segmenter.from_model_dir(uri, cfg.segmenter).probabilities([image], [boxes])[0]
    labels, conf = dense_crf(image, probs, cfg.crf) if cfg.crf else labels_and_confidence(probs)

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
  CONST_KERNEL, NO_NORMALIZATION, unclipped -log p).

`default` is the project's choice where it serves users better: the whole image
is added so every pixel is covered, boxes under 16 px (before enlarging) are
skipped and duplicates dropped, each proposal's softmax is merged and the merged
map renormalised, padding is the mean colour (what the network sees at a real
image border after normalisation, rather than a black frame), the ensemble is
the mean of the two probability maps (the paper's text), and the CRF's kernels
are normalised (NORMALIZE_SYMMETRIC, DIAG_KERNEL, p clipped at 1e-5:
pydensecrf's defaults) with the preset's stds and weights. On tests/test_crf.py's
coarse map the normalised "paper" CRF reaches IoU 0.998 where the release's
unnormalised one reaches 0.973.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .crf import CRFConfig, crf_config
from .proposals import ProposalConfig
from .segmenter import SegmenterConfig

INFERENCE_MODES = ("default", "original")


@dataclass(frozen=True)
class InferenceConfigs:
    """Everything one mode fixes: proposals, segmenter, CRF (None: no CRF)."""
    mode: str
    proposals: ProposalConfig
    segmenter: SegmenterConfig
    crf: CRFConfig | None


# The fields each mode sets. Everything else (proposal method, max_proposals,
# batch size, CRF preset and max_side, ...) is the caller's choice in both.
_MODE_FIELDS = {
    "original": {
        "proposals": dict(min_side=112, min_side_enlarged=True, whole_image=False, dedupe=False,
                          candidates=1000),  # EdgeBoxes: enough boxes for 50 to pass 112 px
        "segmenter": dict(aggregate="max", merge="raw", pad="black", ensemble="relu-product"),
        "crf": {},  # the preset as it is
    },
    "default": {
        "proposals": dict(min_side=16, min_side_enlarged=False, whole_image=True, dedupe=True),
        "segmenter": dict(merge="softmax", pad="mean"),
        "crf": dict(kernel="diag", normalization="symmetric", unary_clip=1e-5),
    },
}


def inference_configs(mode: str = "default", *, proposals: str | None = None, max_proposals: int = 50,
                      edge_model: str | None = None, batch_size: int = 32, aggregate: str | None = None,
                      ensemble: str | None = None, crf: str = "paper", crf_max_side: int | None = None,
                      **segmenter_fields) -> InferenceConfigs:
    """The proposal, segmenter and CRF configs of one inference mode.

    mode: "default" or "original" (module docstring). proposals: a proposal
    method; None = "edgeboxes" when `edge_model` is given, else "grid".
    aggregate, ensemble: None = the mode's ("max"; "mean" or, in original,
    "relu-product"); `original` accepts no other. crf: a CRF preset or "none".
    segmenter_fields: other SegmenterConfig fields (dtype, channels_last, ...).
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {mode!r}")
    fields = _MODE_FIELDS[mode]
    method = proposals or ("edgeboxes" if edge_model else "grid")
    proposal_config = ProposalConfig(method=method, max_proposals=max_proposals, edge_model=edge_model,
                                     **fields["proposals"])
    seg = dict(aggregate=aggregate or "max", ensemble=ensemble or "mean")
    for name, value in (("aggregate", aggregate), ("ensemble", ensemble)):
        fixed = fields["segmenter"].get(name)
        if value is not None and fixed is not None and value != fixed:
            raise ValueError(f"`{name}`: inference 'original' uses {fixed!r} (the release's), got {value!r}; "
                             f"use inference 'default' for other rules")
    seg.update(fields["segmenter"])
    for name in seg:
        if name in segmenter_fields:
            raise ValueError(f"{name}: set by the inference mode or its own argument, not segmenter_fields")
    segmenter_config = SegmenterConfig(batch_size=batch_size, **seg, **segmenter_fields)
    crf_cfg = None
    if crf != "none":
        crf_cfg = dataclasses.replace(crf_config(crf, max_side=crf_max_side), **fields["crf"])
    return InferenceConfigs(mode, proposal_config, segmenter_config, crf_cfg)
