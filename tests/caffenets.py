"""The release's three nets as Caffe layer lists, to write `.caffemodel` files
from our weights: `deconvnet_layers` (the layers, tops and types of
HyeonwooNoh/DeconvNet's DeconvNet prototxts, pools with their `poolN_mask`
tops, unpooling layers without weights), `fcn8s_layers` (fcn-8s-pascal) and
`vgg16_layers` (VGG_ILSVRC_16_layers). Tests write fixtures in the release's
exact format with them, and bench/convert_caffe.py a full-size file:

    params = caffe.deconvnet_to_caffe(model.state_dict())
    data = caffeproto.encode_caffemodel(caffenets.deconvnet_layers(params))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from deconvnet.caffe.convert import DECONVNET_TABLE, DECONVS, VGG_CONVS, TableEntry
from deconvnet.caffe.proto import Blob, Layer


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
    for i, c in enumerate(VGG_CONVS):
        x = block(table[c], x, "CONVOLUTION")
        if i + 1 == len(VGG_CONVS) or VGG_CONVS[i + 1][4] != c[4]:  # last conv of a stage
            s = c[4]
            layers.append(Layer(f"pool{s}", "POOLING", (x,), (f"pool{s}", f"pool{s}_mask")))
            x = f"pool{s}"
    x = block(table["fc6"], x, "CONVOLUTION")
    x = block(table["fc7"], x, "CONVOLUTION")
    x = block(table["fc6-deconv"], x, "DECONVOLUTION")
    for d in DECONVS:
        if d.endswith("_1"):
            s = d[6]
            layers.append(Layer(f"unpool{s}", "UNPOOLING", (x, f"pool{s}_mask"), (f"unpool{s}",)))
            x = f"unpool{s}"
        x = block(table[d], x, "DECONVOLUTION")
    score = _conv_block(params, "seg-score-voc", x)
    layers.append(Layer(score.name, score.type, score.bottoms, ("seg-score",), score.blobs))
    return layers


def _vgg_encoder(params: Mapping[str, Sequence[np.ndarray]]) -> tuple[list[Layer], str]:
    """VGG16's convs, ReLUs and pools without switches (FCN-8s, VGG16), and the last top."""
    layers, x = [], "data"
    for i, c in enumerate(VGG_CONVS):
        layers += [_conv_block(params, c, x), Layer(f"relu{c[4:]}", "RELU", (c,), (c,))]
        x = c
        if i + 1 == len(VGG_CONVS) or VGG_CONVS[i + 1][4] != c[4]:
            layers.append(Layer(f"pool{c[4]}", "POOLING", (x,), (f"pool{c[4]}",)))
            x = f"pool{c[4]}"
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
