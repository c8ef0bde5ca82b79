"""The authors' Caffe weights: read, map to our layout, write a model directory.

    python -m deconvnet convert-caffe DeconvNet_trainval_inference.caffemodel --out models/deconvnet-voc

A `.caffemodel` is a protobuf `NetParameter`, read by `deconvnet.caffe.proto`
(no Caffe, no generated protobuf code, no pickle).

One pure function per foreign layout maps Caffe blobs to a state dict (the way
timm's `_convert_vgg` does): `deconvnet_from_caffe`, `fcn8s_from_caffe`,
`vgg16_from_caffe` (to torchvision's layout, then `weights.init_from_vgg16`).
Their layer tables are derived from `model.cfgs`, the one VGG16 layout.

Input convention: Caffe nets take BGR, 0-255, minus the mean B, G, R =
104.00698793, 116.66876762, 122.67891434 (inference/util/preprocess_image_bb.m in
HyeonwooNoh/DeconvNet), no scaling. A converted model has conv1_1's input
channels reversed (so it takes RGB) and records mean = that mean in RGB order
/ 255, std = 1/255, so every consumer of a model directory feeds it exactly
what it was trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import storage
from .proto import CaffeNet, read_caffemodel
from ..model import DeconvNetConfig, build_model, vgg_stages
from ..data.voc import VOC_CLASSES
from ..weights import (ModelInfo, diff_state, fc6_kernel, init_from_vgg16, torchvision_conv_indices,
                       write_model_dir)

# The release's Caffe mean, B, G, R (inference/util/preprocess_image_bb.m).
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
CAFFE_MEAN_RGB01 = tuple(m / 255 for m in reversed(CAFFE_MEAN_BGR))  # what config.json records
CAFFE_STD01 = (1 / 255,) * 3  # Caffe does not scale: (x - mean) / 1 on 0..255
INPUT_CONVENTION = ("Caffe: BGR, 0-255, minus mean B,G,R = 104.00698793, 116.66876762, 122.67891434, "
                    "no scaling; stored as RGB mean/std on 0..1 with conv1_1's input channels reversed")
BN_EPS = 1e-5  # nn.BatchNorm2d's default; running_var = 1 - eps makes sqrt(var + eps) == 1 in float32

KINDS = ("deconvnet", "fcn8s", "vgg16")
BN_MODES = ("inference", "learn")

# --- layer tables: the release's names and ours -----------------------------

STAGES = tuple(tuple(name for name, _ in stage) for stage in vgg_stages())  # ("conv1_1", "conv1_2"), ...
VGG_CONVS = tuple(name for stage in STAGES for name in stage)  # our features.0 .. 12
# The decoder walks the stages backwards, each stage's convs mirrored: decoder.0
# mirrors conv5_3 and is called deconv5_1, decoder.12 mirrors conv1_1 (deconv1_2).
DECONVS = tuple(f"de{name}" for stage in reversed(STAGES) for name in stage)


@dataclass(frozen=True)
class TableEntry:
    layer: str  # Caffe layer name
    prefix: str  # our module
    bias: bool = True
    bn_layer: str | None = None  # the fork's BN layer that follows (in place)
    bn_prefix: str | None = None


# model/DeconvNet/DeconvNet_inference_deploy.prototxt (HyeonwooNoh/DeconvNet): each
# conv/deconv is followed by BN (bn1_1.., bnfc6, bnfc7, fc6-deconv-bn, debn5_1..)
# and ReLU; the decoder's deconvs run deconv5_1 .. deconv1_2, ours decoder.0 .. 12.
DECONVNET_TABLE = (
    *(TableEntry(c, f"features.{i}.conv", True, f"bn{c.removeprefix('conv')}", f"features.{i}.bn")
      for i, c in enumerate(VGG_CONVS)),
    TableEntry("fc6", "fc6.conv", True, "bnfc6", "fc6.bn"),
    TableEntry("fc7", "fc7.conv", True, "bnfc7", "fc7.bn"),
    TableEntry("fc6-deconv", "deconv_fc6.conv", True, "fc6-deconv-bn", "deconv_fc6.bn"),
    *(TableEntry(d, f"decoder.{j}.conv", True, f"debn{d.removeprefix('deconv')}", f"decoder.{j}.bn")
      for j, d in enumerate(DECONVS)),
    TableEntry("seg-score-voc", "score"),
)
# model/FCN/fcn-8s-pascal-deploy.prototxt: score2 (4/2 deconv) has a bias,
# score4 (4/2) and upsample (16/8) have bias_term: false.
FCN8S_TABLE = (
    *(TableEntry(c, f"features.{i}.conv") for i, c in enumerate(VGG_CONVS)),
    TableEntry("fc6", "fc6.conv"), TableEntry("fc7", "fc7.conv"), TableEntry("score-fr", "score_fr"),
    TableEntry("score2", "upscore2"), TableEntry("score-pool4", "score_pool4"),
    TableEntry("score4", "upscore_pool4", bias=False), TableEntry("score-pool3", "score_pool3"),
    TableEntry("upsample", "upscore8", bias=False),
)


def _blobs(params: Mapping[str, Sequence[np.ndarray]], name: str, n: int) -> Sequence[np.ndarray]:
    if name not in params:
        raise ValueError(f"missing layer {name!r} (or it holds no weights)")
    blobs = params[name]
    if len(blobs) != n:
        raise ValueError(f"layer {name!r} has {len(blobs)} blobs, expected {n}")
    return blobs


def _weight4(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim != 4:
        raise ValueError(f"layer {name!r}: weights of shape {tuple(a.shape)}, expected 4 dims")
    return a


def _vector(a: np.ndarray, name: str) -> np.ndarray:
    """A bias (1, 1, 1, C) or BN blob (1, C, 1, 1) as (C,)."""
    if sum(d != 1 for d in a.shape) > 1:
        raise ValueError(f"layer {name!r}: expected a vector blob, got shape {tuple(a.shape)}")
    return a.reshape(-1)


def _from_table(params: Mapping[str, Sequence[np.ndarray]], table: Sequence[TableEntry],
                bn_mode: str | None, eps: float = BN_EPS) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for e in table:
        blobs = _blobs(params, e.layer, 2 if e.bias else 1)
        out[f"{e.prefix}.weight"] = _weight4(blobs[0], e.layer)
        if e.bias:
            out[f"{e.prefix}.bias"] = _vector(blobs[1], e.layer)
        if e.bn_layer:
            scale, shift = (_vector(b, e.bn_layer) for b in _blobs(params, e.bn_layer, 2))
            c = scale.size
            if shift.size != c:
                raise ValueError(f"layer {e.bn_layer!r}: scale has {c} values, shift {shift.size}")
            out.update(_bn_state(e.bn_prefix, scale, shift, bn_mode, eps))
    return out


def _bn_state(prefix: str, scale: np.ndarray, shift: np.ndarray, bn_mode: str | None,
              eps: float) -> dict[str, np.ndarray]:
    """Our BatchNorm2d from the fork's BN blobs. "inference": the blobs are the
    folded y = scale * x + shift (BN_make_INFERENCE_script.py), so weight = scale,
    bias = shift, mean 0 and var 1 - eps, which makes sqrt(var + eps) exactly 1.
    "learn": the blobs are gamma/beta of a training snapshot, with no statistics."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"`bn_mode` must be one of {BN_MODES}, got {bn_mode!r}")
    c = scale.size
    var = np.float32(1 - eps) if bn_mode == "inference" else np.float32(1)
    return {f"{prefix}.weight": scale, f"{prefix}.bias": shift,
            f"{prefix}.running_mean": np.zeros(c, np.float32),
            f"{prefix}.running_var": np.full(c, var, np.float32),
            f"{prefix}.num_batches_tracked": np.zeros((), np.int64)}


def deconvnet_from_caffe(params: Mapping[str, Sequence[np.ndarray]], bn_mode: str,
                         eps: float = BN_EPS) -> dict[str, np.ndarray]:
    """The release's DeconvNet blobs -> our DeconvNet state dict (arrays, views where possible).
    Conv weights (out, in, k, k) and deconv weights (in, out, k, k) keep their
    layout (PyTorch's Conv2d/ConvTranspose2d); biases (1, 1, 1, C) and BN blobs
    (1, C, 1, 1) become (C,)."""
    return _from_table(params, DECONVNET_TABLE, bn_mode, eps)


def fcn8s_from_caffe(params: Mapping[str, Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """The FCN authors' fcn-8s-pascal blobs -> our FCN8s state dict."""
    return _from_table(params, FCN8S_TABLE, None)


def _matrix(a: np.ndarray, name: str) -> np.ndarray:
    """fc6/fc7 as (out, in): an InnerProduct blob (1, 1, out, in) or (out, in), or a
    conv (out, c, k, k) flattened the way torchvision flattens pool5."""
    if a.ndim == 2:
        return a
    if a.ndim == 4 and a.shape[0] == a.shape[1] == 1 and a.shape[2] > 1:
        return a.reshape(a.shape[2], a.shape[3])
    if a.ndim == 4:
        return a.reshape(a.shape[0], -1)
    raise ValueError(f"layer {name!r}: weights of shape {tuple(a.shape)}, expected an InnerProduct or conv blob")


def vgg16_from_caffe(params: Mapping[str, Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """VGG_ILSVRC_16_layers[_conv].caffemodel blobs -> torchvision's vgg16 layout
    (features.N, classifier.0/3), which `weights.vgg16_to_deconvnet` takes. fc6/fc7
    may be InnerProduct (the ImageNet release) or convs (the DeconvNet release's
    VGG_conv); fc8 (the 1000 ImageNet classes) is dropped, as `init_from_vgg16` does."""
    out: dict[str, np.ndarray] = {}
    for i, name in zip(torchvision_conv_indices(batch_norm=False), VGG_CONVS):
        w, b = _blobs(params, name, 2)
        out[f"features.{i}.weight"] = _weight4(w, name)
        out[f"features.{i}.bias"] = _vector(b, name)
    for name, key in (("fc6", "classifier.0"), ("fc7", "classifier.3")):
        w, b = _blobs(params, name, 2)
        out[f"{key}.weight"] = _matrix(w, name)
        out[f"{key}.bias"] = _vector(b, name)
    return out


# --- detection and conversion ------------------------------------------------

def detect_kind(net: CaffeNet) -> str:
    """"deconvnet", "fcn8s" or "vgg16" from the layer names."""
    names = {layer.name for layer in net.layers}
    if "seg-score-voc" in names or "fc6-deconv" in names or names & set(DECONVS):
        return "deconvnet"
    if names & {"score-fr", "score2", "score4", "upsample"}:
        return "fcn8s"
    if {VGG_CONVS[0], "fc6", "fc7"} <= names:
        return "vgg16"
    shown = ", ".join(sorted(names)[:8])
    raise ValueError(f"cannot tell DeconvNet, FCN-8s or VGG16 from its layer names ({shown}, ...); "
                     f"set `kind` to one of {', '.join(KINDS)}")


def detect_bn_mode(net: CaffeNet) -> str | None:
    """"inference" when BN holds the folded scale/shift, "learn" when it holds a
    training snapshot's gamma/beta, None when the file cannot tell.

    Caffe saves each layer's parameters beside its blobs (Net::ToProto in the fork).
    - bn_mode: INFERENCE (the deploy prototxt's): folded.
    - BN layers with `-mean`/`-var` tops: the net of DeconvNet_make_bn_layer_testable
      .prototxt, which BN_make_INFERENCE_script.py (training/003_make_bn_layer_testable)
      loads, folds and saves as DeconvNet_trainval_inference.caffemodel: folded.
    - otherwise V1 BN layers run in LEARN mode (the default of bn_mode in the
      fork's caffe.proto), i.e. batch statistics, as the stage_1/stage_2 training
      prototxts do: the blobs are gamma/beta.
    The `layer` format has no bn_param of the fork's, so there it cannot tell."""
    bns = [layer for layer in net.layers if layer.type == "BN"]
    if not bns:
        return None
    if any(layer.bn_mode == "INFERENCE" for layer in bns) or all(len(layer.tops) >= 3 for layer in bns):
        return "inference"
    if all(layer.bn_mode is not None for layer in bns):
        return "learn"
    return None


@dataclass(frozen=True)
class Converted:
    """What `convert` produced: a state dict and the model directory's info."""

    kind: str
    bn_mode: str | None
    state: dict[str, np.ndarray | torch.Tensor]
    info: ModelInfo


def _config_from(kind: str, params: Mapping[str, Sequence[np.ndarray]], num_classes: int | None) -> DeconvNetConfig:
    first, last = VGG_CONVS[0], VGG_CONVS[-1]
    w1 = _weight4(_blobs(params, first, 2)[0], first)
    if w1.shape[1] != 3:
        raise ValueError(f"layer {first!r} takes {w1.shape[1]} input channels, expected 3 (BGR)")
    c1 = w1.shape[0]
    fc6 = _blobs(params, "fc6", 2)[0]
    if kind == "vgg16":
        c5 = _weight4(_blobs(params, last, 2)[0], last).shape[0]
        m = _matrix(fc6, "fc6")
        try:
            fc_dim, k = m.shape[0], fc6_kernel(m.shape[1], c5)
        except ValueError as e:
            raise ValueError(f"layer 'fc6': {e}") from None
    else:
        fc6 = _weight4(fc6, "fc6")
        fc_dim, k = fc6.shape[0], fc6.shape[2]
        score = "seg-score-voc" if kind == "deconvnet" else "score-fr"
        num_classes = _weight4(_blobs(params, score, 2)[0], score).shape[0]
    return DeconvNetConfig(arch="fcn8s" if kind == "fcn8s" else "deconvnet", num_classes=num_classes or 21,
                           width=c1 / 64, fc_dim=fc_dim, fc_kernel=k, batch_norm=kind != "fcn8s")


def _check_shapes(state: Mapping[str, np.ndarray], config: DeconvNetConfig, table: Sequence[TableEntry]) -> None:
    """Every tensor the config's model has, with its shape; else ValueError naming
    the Caffe layers."""
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    given = {k: torch.empty(tuple(v.shape), device="meta") for k, v in state.items()}
    problems = diff_state(expected, given)
    if problems:
        owner = {}
        for e in table:
            owner[e.prefix] = e.layer
            if e.bn_prefix:
                owner[e.bn_prefix] = e.bn_layer
        bad = [f"{owner.get(k.rsplit('.', 1)[0], k)} {tuple(given[k].shape)}, expected {tuple(expected[k].shape)}"
               for k in given if k in expected and given[k].shape != expected[k].shape]
        detail = "; ".join(bad) if bad else "; ".join(problems)
        raise ValueError(f"blob shapes do not fit one DeconvNetConfig (`width` {config.width:g} from {VGG_CONVS[0]}, "
                         f"fc {config.fc_dim}, {config.num_classes} classes): {detail}")


def convert(net: CaffeNet, kind: str | None = None, classes: Sequence[str] | None = None,
            bn_mode: str | None = None, seed: int = 0, source: str = "") -> Converted:
    """A Caffe net -> our state dict and ModelInfo, with RGB input (conv1_1's input
    channels reversed) and the Caffe mean/std recorded. ValueError, one line, when
    a layer is missing, a shape does not fit or the kind or BN mode cannot be told.

    "vgg16" builds a DeconvNet whose encoder and fc6/fc7 come from the file and
    whose decoder is initialised as `init` does (seeded), for training."""
    kind = kind or detect_kind(net)
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    params = net.params()
    found_bn = detect_bn_mode(net)
    if kind == "deconvnet":
        bn_mode = bn_mode or found_bn
        if bn_mode is None:
            raise ValueError("cannot tell from the file whether BN holds folded inference scale/shift or "
                             "training gamma/beta; set `bn_mode` to 'inference' or 'learn'")
    elif bn_mode is not None:
        raise ValueError(f"`bn_mode` is for DeconvNet files; a {kind} file has no BN")
    table = {"deconvnet": DECONVNET_TABLE, "fcn8s": FCN8S_TABLE}.get(kind, ())
    known = {e.layer for e in table} | {e.bn_layer for e in table} if table else {*VGG_CONVS, "fc6", "fc7", "fc8"}
    extra = sorted(set(params) - known)
    if extra:
        raise ValueError(f"layers with weights that a {kind} file does not have: {extra}")
    config = _config_from(kind, params, len(classes) if classes else None)
    if classes is None:
        if config.num_classes != len(VOC_CLASSES):
            raise ValueError(f"the file has {config.num_classes} classes, not PASCAL VOC's "
                             f"{len(VOC_CLASSES)}: name them in `classes`")
        classes = VOC_CLASSES
    if len(classes) != config.num_classes:
        raise ValueError(f"`classes` has {len(classes)} names for a file with {config.num_classes} classes")
    provenance = {"created_by": "python -m deconvnet convert-caffe", "source": source,
                  "source_format": f"Caffe NetParameter, {net.format}", "source_net_name": net.name,
                  "kind": kind, "input_convention": INPUT_CONVENTION}
    if kind == "vgg16":
        tv = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in vgg16_from_caffe(params).items()}
        tv["features.0.weight"] = tv["features.0.weight"].flip(1)  # BGR -> RGB input
        torch.manual_seed(seed)
        model = build_model(config)
        try:
            init_from_vgg16(model, tv)
        except ValueError as e:
            raise ValueError(f"blob shapes do not fit one DeconvNetConfig: {e}") from None
        state = {k: v.detach() for k, v in model.state_dict().items()}
        provenance.update(encoder_init=f"VGG16 Caffe weights from {source}", decoder_init=f"random (seed {seed})")
    else:
        state = (deconvnet_from_caffe(params, bn_mode) if kind == "deconvnet" else fcn8s_from_caffe(params))
        _check_shapes(state, config, table)
        state["features.0.conv.weight"] = np.ascontiguousarray(state["features.0.conv.weight"][:, ::-1])
    if kind == "deconvnet":
        provenance["bn_mode"] = bn_mode
        provenance["bn_mode_detected"] = found_bn
        provenance["bn"] = (
            "folded for inference: weight = scale, bias = shift, running_mean 0, running_var 1 - eps"
            if bn_mode == "inference" else
            "training snapshot: learned gamma/beta only, no statistics (running_mean 0, running_var 1); "
            "for fine-tuning (jobs/train.py --init), not for inference")
    info = ModelInfo(config=config, classes=tuple(classes), mean=CAFFE_MEAN_RGB01, std=CAFFE_STD01,
                     provenance=provenance)
    return Converted(kind, bn_mode if kind == "deconvnet" else None, state, info)


def convert_caffemodel(uri: str, out: str, kind: str | None = None, classes: Sequence[str] | None = None,
                       bn_mode: str | None = None, seed: int = 0,
                       storage_options: storage.StorageOptions | None = None) -> Converted:
    """Read a `.caffemodel` (path or URI), convert it and write a model directory
    at `out`. Nothing is written unless the whole file converts."""
    from ..records import now_iso

    net = read_caffemodel(uri, storage_options)
    conv = convert(net, kind, classes, bn_mode, seed, source=uri)
    info = dataclasses.replace(conv.info, provenance={"created": now_iso(), **conv.info.provenance})
    info = write_model_dir(conv.state, out, info, storage_options, release=net.release)
    return dataclasses.replace(conv, info=info)


__all__ = [
    "deconvnet_from_caffe", "fcn8s_from_caffe", "vgg16_from_caffe", "detect_kind", "detect_bn_mode",
    "convert", "convert_caffemodel", "Converted", "CAFFE_MEAN_BGR", "CAFFE_MEAN_RGB01", "CAFFE_STD01",
]
