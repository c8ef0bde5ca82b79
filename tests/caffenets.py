"""The release's three nets as Caffe blobs and layer lists, to write
`.caffemodel` files from our weights (with tests/caffewriter.py).

The `*_to_caffe` functions invert deconvnet.caffe.convert's `*_from_caffe`
(our state dict -> {Caffe layer: blobs}) through the same layer tables.
`deconvnet_layers` gives the layers, tops and types of HyeonwooNoh/DeconvNet's
DeconvNet prototxts (pools with their `poolN_mask` tops, unpooling layers
without weights), `fcn8s_layers` fcn-8s-pascal's and `vgg16_layers`
VGG_ILSVRC_16_layers'. Names and stage boundaries come from `convert.STAGES`,
i.e. from `deconvnet.model.cfgs`. Tests write fixtures in the release's exact
format with them, and bench/convert_caffe.py a full-size file:

    params = caffenets.deconvnet_to_caffe(model.state_dict())
    data = caffewriter.encode_caffemodel(caffenets.deconvnet_layers(params))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from deconvnet.caffe.convert import (
    BN_EPS, DECONVNET_TABLE, DECONVS, FCN8S_TABLE, STAGES, VGG_CONVS, TableEntry,
)
from deconvnet.caffe.proto import Blob, Layer
from deconvnet.weights import fc6_kernel, torchvision_conv_indices

# --- our state dicts -> the release's blobs ----------------------------------


def _to_table(state: Mapping[str, np.ndarray], table: Sequence[TableEntry], bn_mode: str,
              eps: float = BN_EPS) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for e in table:
        w = np.asarray(state[f"{e.prefix}.weight"], np.float32)
        out[e.layer] = [w] + ([np.asarray(state[f"{e.prefix}.bias"], np.float32).reshape(1, 1, 1, -1)]
                              if e.bias else [])
        if e.bn_layer:
            g, b, m, v = (np.asarray(state[f"{e.bn_prefix}.{k}"], np.float64)
                          for k in ("weight", "bias", "running_mean", "running_var"))
            if bn_mode == "inference":  # fold, as BN_make_INFERENCE_script.py does
                g, b = g / np.sqrt(v + eps), b - g * m / np.sqrt(v + eps)
            out[e.bn_layer] = [x.astype(np.float32).reshape(1, -1, 1, 1) for x in (g, b)]
    return out


def deconvnet_to_caffe(state: Mapping[str, np.ndarray], bn_mode: str = "inference",
                       eps: float = BN_EPS) -> dict[str, list[np.ndarray]]:
    """Our DeconvNet state dict -> the release's blobs; "inference" folds BN's
    statistics into scale/shift, "learn" writes gamma/beta as a snapshot holds them."""
    return _to_table(state, DECONVNET_TABLE, bn_mode, eps)


def fcn8s_to_caffe(state: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    return _to_table(state, FCN8S_TABLE, "inference")


def vgg16_to_caffe(state: Mapping[str, np.ndarray], fc: str = "inner_product") -> dict[str, list[np.ndarray]]:
    """torchvision's vgg16 layout -> VGG16's Caffe blobs; `fc` "inner_product" writes
    fc6/fc7 as (1, 1, out, in) blobs, "conv" as (out, c, k, k) convs."""
    out: dict[str, list[np.ndarray]] = {}
    for i, name in zip(torchvision_conv_indices(batch_norm=False), VGG_CONVS):
        out[name] = [np.asarray(state[f"features.{i}.weight"], np.float32),
                     np.asarray(state[f"features.{i}.bias"], np.float32).reshape(1, 1, 1, -1)]
    c5 = out[VGG_CONVS[-1]][0].shape[0]
    for name, key in (("fc6", "classifier.0"), ("fc7", "classifier.3")):
        w = np.asarray(state[f"{key}.weight"], np.float32)
        k = fc6_kernel(w.shape[1], c5) if name == "fc6" else 1
        w = w.reshape(1, 1, *w.shape) if fc == "inner_product" else w.reshape(w.shape[0], -1, k, k)
        out[name] = [w, np.asarray(state[f"{key}.bias"], np.float32).reshape(1, 1, 1, -1)]
    return out


# --- the release's layer lists -----------------------------------------------

def _conv_block(params, name: str, bottom: str, type_: str = "CONVOLUTION") -> Layer:
    return Layer(name, type_, (bottom,), (name,), tuple(Blob(a.shape, a.reshape(-1)) for a in params[name]))


def deconvnet_layers(params: Mapping[str, Sequence[np.ndarray]], bn_mode: str = "INFERENCE",
                     stats_tops: bool = False) -> list[Layer]:
    """The release's DeconvNet as V1 layers, in the order and with the blob names
    of model/DeconvNet/DeconvNet_inference_deploy.prototxt: BN in place after every
    conv, pools with a second `poolN_mask` top, UNPOOLING layers (no blobs) taking
    the matching mask. `bn_mode` None leaves out bn_param (the training prototxts);
    `stats_tops` adds the `-mean`/`-var` tops of
    training/003_make_bn_layer_testable/DeconvNet_make_bn_layer_testable.prototxt,
    the net BN_make_INFERENCE_script.py saved the inference model from."""
    layers: list[Layer] = []
    x = "data"

    def block(entry: TableEntry, bottom: str, type_: str) -> str:
        name = entry.layer
        layers.append(_conv_block(params, name, bottom, type_))
        if entry.bn_layer:
            bn = entry.bn_layer
            tops = (name, f"{bn}-mean", f"{bn}-var") if stats_tops else (name,)
            layers.append(Layer(bn, "BN", (name,), tops,
                                tuple(Blob(a.shape, a.reshape(-1)) for a in params[bn]), bn_mode))
            layers.append(Layer(f"relu{name}", "RELU", (name,), (name,)))
        return name

    table = {e.layer: e for e in DECONVNET_TABLE}
    for s, stage in enumerate(STAGES, 1):
        for c in stage:
            x = block(table[c], x, "CONVOLUTION")
        layers.append(Layer(f"pool{s}", "POOLING", (x,), (f"pool{s}", f"pool{s}_mask")))
        x = f"pool{s}"
    x = block(table["fc6"], x, "CONVOLUTION")
    x = block(table["fc7"], x, "CONVOLUTION")
    x = block(table["fc6-deconv"], x, "DECONVOLUTION")
    deconvs = iter(DECONVS)  # stage by stage, backwards
    for s in range(len(STAGES), 0, -1):
        layers.append(Layer(f"unpool{s}", "UNPOOLING", (x, f"pool{s}_mask"), (f"unpool{s}",)))
        x = f"unpool{s}"
        for _ in STAGES[s - 1]:
            x = block(table[next(deconvs)], x, "DECONVOLUTION")
    score = _conv_block(params, "seg-score-voc", x)
    layers.append(Layer(score.name, score.type, score.bottoms, ("seg-score",), score.blobs))
    return layers


def _vgg_encoder(params: Mapping[str, Sequence[np.ndarray]]) -> tuple[list[Layer], str]:
    """VGG16's convs, ReLUs and pools without switches (FCN-8s, VGG16), and the last top."""
    layers, x = [], "data"
    for s, stage in enumerate(STAGES, 1):
        for c in stage:
            layers += [_conv_block(params, c, x), Layer(f"relu{c.removeprefix('conv')}", "RELU", (c,), (c,))]
            x = c
        layers.append(Layer(f"pool{s}", "POOLING", (x,), (f"pool{s}",)))
        x = f"pool{s}"
    return layers, x
def fcn8s_layers(params: Mapping[str, Sequence[np.ndarray]]) -> list[Layer]:
    """model/FCN/fcn-8s-pascal-deploy.prototxt's layers with blobs, plus its
    blob-less pools, crops and fuses (names repeat there: two 'crop', two 'fuse')."""
    layers, x = _vgg_encoder(params)
    for name, bottom, type_ in (("fc6", x, "CONVOLUTION"), ("fc7", "fc6", "CONVOLUTION"),
                                ("score-fr", "fc7", "CONVOLUTION"), ("score2", "score-fr", "DECONVOLUTION"),
                                ("score-pool4", "pool4", "CONVOLUTION")):
        layers.append(_conv_block(params, name, bottom, type_))
    layers += [Layer("crop", "CROP", ("score-pool4", "score2"), ("score-pool4c",)),
               Layer("fuse", "ELTWISE", ("score2", "score-pool4c"), ("score-fused",)),
               _conv_block(params, "score4", "score-fused", "DECONVOLUTION"),
               _conv_block(params, "score-pool3", "pool3"),
               Layer("crop", "CROP", ("score-pool3", "score4"), ("score-pool3c",)),
               Layer("fuse", "ELTWISE", ("score4", "score-pool3c"), ("score-final",)),
               _conv_block(params, "upsample", "score-final", "DECONVOLUTION"),
               Layer("crop", "CROP", ("upsample", "data"), ("upscore",))]
    return layers


def vgg16_layers(params: Mapping[str, Sequence[np.ndarray]]) -> list[Layer]:
    """VGG16 as its Caffe releases list it: convs, pools, fc6/fc7 (InnerProduct
    when their blobs are (1, 1, out, in), else convs), fc8 if given."""
    layers, x = _vgg_encoder(params)
    for name in ("fc6", "fc7", "fc8"):
        if name in params:
            w = params[name][0]
            ip = w.ndim == 4 and w.shape[0] == w.shape[1] == 1
            layers.append(_conv_block(params, name, x, "INNER_PRODUCT" if ip else "CONVOLUTION"))
            x = name
    return layers
