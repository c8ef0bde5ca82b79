"""The authors' Caffe weights: read, map to our layout, write a model directory.

    python -m deconvnet convert-caffe DeconvNet_trainval_inference.caffemodel --out models/deconvnet-voc

A `.caffemodel` is a protobuf `NetParameter`. This module reads the wire format
itself (no Caffe, no generated protobuf code, no pickle): old V1 `layers`
(field 2) as the release writes them, and the newer `layer` (field 100). Field
numbers are those of the fork's `src/caffe/proto/caffe.proto` (HyeonwooNoh/caffe)
and, for `layer` and `BlobProto.shape`, of BVLC/caffe's:

    NetParameter     name 1, layers 2 (V1LayerParameter), layer 100 (LayerParameter)
    V1 layer         bottom 2, top 3, name 4, type 5 (enum), blobs 6, bn_param 45 (fork)
    LayerParameter   name 1, type 2 (string), bottom 3, top 4, blobs 7
    BlobProto        num 1, channels 2, height 3, width 4, data 5 (packed float32),
                     shape 7 (BlobShape: dim 1, packed int64), double_data 8
    BNParameter      bn_mode 3 (LEARN 0, INFERENCE 1)  (fork)

Packed floats become `np.frombuffer` views over one buffer (a memory map for a
local file), so converting the 1 GB inference model needs about one copy of the
weights: the output buffer, filled blob by blob while the map's pages are let go.

One pure function per foreign layout maps Caffe blobs to a state dict (the way
timm's `_convert_vgg` does): `deconvnet_from_caffe`, `fcn8s_from_caffe`,
`vgg16_from_caffe` (to torchvision's layout, then `weights.init_from_vgg16`),
each with its inverse for writing. `encode_caffemodel` writes the format back
(V1 with the fork's types, or `layer`), for tests, the benchmark and exports.

Input convention: Caffe nets take BGR, 0-255, minus the mean B, G, R =
104.00698793, 116.66876762, 122.67891434 (inference/util/preprocess_image_bb.m in
HyeonwooNoh/DeconvNet), no scaling. A converted model has conv1_1's input
channels reversed (so it takes RGB) and records mean = that mean in RGB order
/ 255, std = 1/255, so every consumer of a model directory feeds it exactly
what it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import storage
from .model import DeconvNetConfig, build_model
from .voc import VOC_CLASSES
from .weights import ModelInfo, _diff_state, init_from_vgg16, write_model_dir

# The release's Caffe mean, B, G, R (inference/util/preprocess_image_bb.m).
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
CAFFE_MEAN_RGB01 = tuple(m / 255 for m in reversed(CAFFE_MEAN_BGR))  # what config.json records
CAFFE_STD01 = (1 / 255,) * 3  # Caffe does not scale: (x - mean) / 1 on 0..255
INPUT_CONVENTION = ("Caffe: BGR, 0-255, minus mean B,G,R = 104.00698793, 116.66876762, 122.67891434, "
                    "no scaling; stored as RGB mean/std on 0..1 with conv1_1's input channels reversed")
BN_EPS = 1e-5  # nn.BatchNorm2d's default; running_var = 1 - eps makes sqrt(var + eps) == 1 in float32

KINDS = ("deconvnet", "fcn8s", "vgg16")
BN_MODES = ("inference", "learn")

# V1LayerParameter.LayerType of the fork's caffe.proto (BN, DECONVOLUTION,
# UNPOOLING and the data layers are the fork's additions).
V1_TYPES = {
    "NONE": 0, "ACCURACY": 1, "CONCAT": 3, "CONVOLUTION": 4, "DATA": 5, "DROPOUT": 6,
    "INNER_PRODUCT": 14, "POOLING": 17, "RELU": 18, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22,
    "ELTWISE": 25, "DECONVOLUTION": 39, "CROP": 40, "UNPOOLING": 42, "BN": 43,
    "IMAGE_SEG_DATA": 46, "WINDOW_SEG_DATA": 47,
}
_V1_NAMES = {v: k for k, v in V1_TYPES.items()}
# The `layer` (field 100) format names types with strings.
_NEW_TYPES = {"CONVOLUTION": "Convolution", "DECONVOLUTION": "Deconvolution", "INNER_PRODUCT": "InnerProduct",
              "POOLING": "Pooling", "RELU": "ReLU", "SOFTMAX": "Softmax", "DROPOUT": "Dropout", "BN": "BN",
              "UNPOOLING": "Unpooling", "CROP": "Crop", "ELTWISE": "Eltwise", "DATA": "Data",
              "SOFTMAX_LOSS": "SoftmaxWithLoss", "CONCAT": "Concat", "SPLIT": "Split", "ACCURACY": "Accuracy"}
_NEW_NAMES = {v: k for k, v in _NEW_TYPES.items()}


# --- the net as read --------------------------------------------------------

@dataclass(frozen=True)
class Blob:
    shape: tuple[int, ...]  # (num, channels, height, width) in V1 files
    data: np.ndarray  # (prod(shape),) float32, a view into the file where possible

    def array(self) -> np.ndarray:
        return self.data.reshape(self.shape)


@dataclass(frozen=True)
class Layer:
    name: str
    type: str  # V1 enum name ("CONVOLUTION", "BN", ...) whatever the file's format
    bottoms: tuple[str, ...] = ()
    tops: tuple[str, ...] = ()
    blobs: tuple[Blob, ...] = ()
    bn_mode: str | None = None  # "LEARN"/"INFERENCE" where the layer stores the fork's bn_param


@dataclass
class CaffeNet:
    name: str
    layers: list[Layer]
    format: str  # "V1 layers (field 2)" or "layer (field 100)"
    _map: mmap.mmap | None = field(default=None, repr=False)
    _base: int = field(default=0, repr=False)

    def params(self) -> dict[str, list[np.ndarray]]:
        """{layer name: its blobs shaped as stored} for the layers that have blobs."""
        out: dict[str, list[np.ndarray]] = {}
        for layer in self.layers:
            if layer.blobs:
                if layer.name in out:
                    raise ValueError(f"two layers named {layer.name!r} hold weights")
                out[layer.name] = [b.array() for b in layer.blobs]
        return out

    def release(self, array: np.ndarray) -> None:
        """Let the memory map drop the pages under `array` (a view of it), once copied."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED") or array.nbytes == 0:
            return
        lo = array.__array_interface__["data"][0] - self._base
        hi = lo + array.nbytes
        if lo < 0 or hi > len(self._map):
            return  # not a view of the map (a computed array)
        page = mmap.PAGESIZE
        a, b = -(-lo // page) * page, hi // page * page
        if b > a:
            self._map.madvise(mmap.MADV_DONTNEED, a, b - a)


# --- protobuf wire format: reading -----------------------------------------

class _Malformed(ValueError):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed(f"varint runs past byte {end}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, value) of one message in buf[start:end]: an int for
    varints, the (start, end) span of the bytes for the other wire types."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wt == 0:
            value, pos = _varint(buf, pos, end)
        elif wt in (1, 2, 5):
            if wt == 2:
                n, pos = _varint(buf, pos, end)
            else:
                n = 8 if wt == 1 else 4
            if pos + n > end:
                raise _Malformed(f"field {num} at byte {pos} claims {n} bytes, {end - pos} left")
            value, pos = (pos, pos + n), pos + n
        else:
            raise _Malformed(f"wire type {wt} of field {num} at byte {pos}")
        yield num, wt, value


def _string(buf, span) -> str:
    if not isinstance(span, tuple):
        raise _Malformed("a string field is not length-delimited")
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"a name is not UTF-8 at byte {span[0]}") from e


def _span(value, what: str) -> tuple[int, int]:
    if not isinstance(value, tuple):
        raise _Malformed(f"{what} is not a message")
    return value


def _floats(buf, wt: int, value, dtype: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if wt == 2:  # packed: a view, no copy
        a, b = value
        if (b - a) % size:
            raise _Malformed(f"packed {dtype} data of {b - a} bytes at byte {a}")
        return np.frombuffer(buf, dtype, (b - a) // size, a)
    if wt in (1, 5) and (value[1] - value[0]) == size:  # one unpacked value
        return np.frombuffer(buf, dtype, 1, value[0])
    raise _Malformed(f"blob data has wire type {wt}")


def _blob(buf, start: int, end: int) -> Blob:
    legacy: dict[int, int] = {}
    shape: list[int] | None = None
    chunks: list[np.ndarray] = []
    for num, wt, v in _fields(buf, start, end):
        if num in (1, 2, 3, 4) and wt == 0:
            legacy[num] = v - (1 << 64) if v >= 1 << 63 else v
        elif num == 5:
            chunks.append(_floats(buf, wt, v, "<f4"))
        elif num == 8:  # double_data
            chunks.append(_floats(buf, wt, v, "<f8").astype(np.float32))
        elif num == 7:  # BlobShape
            shape = []
            a, b = _span(v, "blob shape")
            for dn, dwt, dv in _fields(buf, a, b):
                if dn != 1:
                    continue
                if dwt == 0:
                    shape.append(dv)
                else:
                    p, q = _span(dv, "blob dims")
                    while p < q:
                        d, p = _varint(buf, p, q)
                        shape.append(d)
    if shape is None:
        if not legacy:
            raise _Malformed(f"blob at byte {start} has no shape")
        shape = [legacy.get(i, 0) for i in (1, 2, 3, 4)]
    data = chunks[0] if len(chunks) == 1 else (np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
    if any(d < 0 for d in shape) or math.prod(shape) != data.size:
        raise _Malformed(f"blob at byte {start} has shape {tuple(shape)} but {data.size} values")
    return Blob(tuple(int(d) for d in shape), data)


def _v1_layer(buf, start: int, end: int) -> Layer:
    name, type_, bottoms, tops, blobs, bn_mode = "", "NONE", [], [], [], None
    for num, wt, v in _fields(buf, start, end):
        if num == 4:
            name = _string(buf, v)
        elif num == 5 and wt == 0:
            type_ = _V1_NAMES.get(v, f"TYPE_{v}")
        elif num == 2:
            bottoms.append(_string(buf, v))
        elif num == 3:
            tops.append(_string(buf, v))
        elif num == 6:
            blobs.append(_blob(buf, *_span(v, "blob")))
        elif num == 45:  # the fork's bn_param; bn_mode 3, LEARN when absent
            bn_mode = "LEARN"
            for n2, wt2, v2 in _fields(buf, *_span(v, "bn_param")):
                if n2 == 3 and wt2 == 0:
                    bn_mode = {0: "LEARN", 1: "INFERENCE"}.get(v2, f"MODE_{v2}")
        elif num == 1:  # a V0 layer inside (the oldest files): name 1, type 2, blobs 50
            for n2, _, v2 in _fields(buf, *_span(v, "V0 layer")):
                if n2 == 1:
                    name = _string(buf, v2)
                elif n2 == 2:
                    type_ = _string(buf, v2).upper()
                elif n2 == 50:
                    blobs.append(_blob(buf, *_span(v2, "blob")))
    if type_ == "BN" and bn_mode is None:
        bn_mode = "LEARN"  # bn_param's default in the fork's caffe.proto
    return Layer(name, type_, tuple(bottoms), tuple(tops), tuple(blobs), bn_mode)


def _new_layer(buf, start: int, end: int) -> Layer:
    name, type_, bottoms, tops, blobs = "", "NONE", [], [], []
    for num, _, v in _fields(buf, start, end):
        if num == 1:
            name = _string(buf, v)
        elif num == 2:
            t = _string(buf, v)
            type_ = _NEW_NAMES.get(t, t.upper())
        elif num == 3:
            bottoms.append(_string(buf, v))
        elif num == 4:
            tops.append(_string(buf, v))
        elif num == 7:
            blobs.append(_blob(buf, *_span(v, "blob")))
    return Layer(name, type_, tuple(bottoms), tuple(tops), tuple(blobs))


def parse_caffemodel(buf, source: str = "caffemodel") -> CaffeNet:
    """A `NetParameter` from a bytes-like buffer (bytes, mmap). ValueError, one
    line naming `source`, when it is truncated, not protobuf or holds no layers."""
    name, layers, formats = "", [], set()
    try:
        for num, _, v in _fields(buf, 0, len(buf)):
            if num == 1:
                name = _string(buf, v)
            elif num == 2:
                layers.append(_v1_layer(buf, *_span(v, "layer")))
                formats.add("V1 layers (field 2)")
            elif num == 100:
                layers.append(_new_layer(buf, *_span(v, "layer")))
                formats.add("layer (field 100)")
    except _Malformed as e:
        raise ValueError(f"{source}: truncated or not a Caffe model ({len(buf)} bytes): {e}") from None
    if not layers:
        raise ValueError(f"{source}: not a Caffe model: no layers in {len(buf)} bytes")
    return CaffeNet(name, layers, " + ".join(sorted(formats)))


def read_caffemodel(uri: str, storage_options: storage.StorageOptions | None = None) -> CaffeNet:
    """Parse a `.caffemodel` at a path or URI. A local file is memory-mapped (its
    blobs are views of the map); other URIs are read whole."""
    if storage.is_local(uri):
        _, path = storage.url_to_fs(uri, storage_options)
        with open(path, "rb") as f:  # FileNotFoundError / IsADirectoryError name the path
            if storage.size(uri, storage_options) == 0:
                raise ValueError(f"{uri}: not a Caffe model: empty file")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        net = parse_caffemodel(mm, uri)
        net._map, net._base = mm, np.frombuffer(mm, np.uint8, 1).ctypes.data
        return net
    return parse_caffemodel(storage.read_bytes(uri, storage_options), uri)


# --- protobuf wire format: writing -----------------------------------------

def _enc_varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _msg(num: int, parts: list) -> list:
    """A length-delimited field around already encoded parts (bytes or memoryviews)."""
    return [_enc_varint(num << 3 | 2), _enc_varint(sum(len(p) for p in parts)), *parts]


def _str(num: int, s: str) -> list:
    return _msg(num, [s.encode()])


def _blob_parts(blob: Blob, fmt: str) -> list:
    data = np.ascontiguousarray(blob.data, dtype="<f4").reshape(-1)
    if data.size != math.prod(blob.shape):
        raise ValueError(f"blob shape {blob.shape} does not hold {data.size} values")
    if fmt == "v1":
        if len(blob.shape) > 4:
            raise ValueError(f"a V1 blob has at most 4 dims, got {blob.shape}")
        dims = (1,) * (4 - len(blob.shape)) + tuple(blob.shape)
        parts = [p for i, d in enumerate(dims, 1) for p in (_enc_varint(i << 3), _enc_varint(d))]
    else:
        parts = _msg(7, _msg(1, [b"".join(_enc_varint(d) for d in blob.shape)]))
    return parts + _msg(5, [memoryview(data).cast("B")])


def _layer_parts(layer: Layer, fmt: str) -> list:
    if fmt == "v1":  # fields in number order, as Caffe writes them
        parts = [*(p for b in layer.bottoms for p in _str(2, b)), *(p for t in layer.tops for p in _str(3, t)),
                 *_str(4, layer.name), _enc_varint(5 << 3), _enc_varint(V1_TYPES[layer.type])]
        parts += [p for b in layer.blobs for p in _msg(6, _blob_parts(b, fmt))]
        if layer.bn_mode is not None:
            mode = [] if layer.bn_mode == "LEARN" else [_enc_varint(3 << 3), _enc_varint(1)]
            parts += _msg(45, mode)
        return _msg(2, parts)
    parts = [*_str(1, layer.name), *_str(2, _NEW_TYPES.get(layer.type, layer.type)),
             *(p for b in layer.bottoms for p in _str(3, b)), *(p for t in layer.tops for p in _str(4, t))]
    parts += [p for b in layer.blobs for p in _msg(7, _blob_parts(b, fmt))]
    return _msg(100, parts)


def caffemodel_chunks(layers: Sequence[Layer], name: str = "", fmt: str = "v1") -> Iterator[bytes | memoryview]:
    """The bytes of a `NetParameter` in pieces (blob data as views, not copies):
    `fmt` "v1" writes `layers` (field 2) with the fork's type enum, as the
    release's files are; "layer" writes field 100 with `shape` blobs."""
    if fmt not in ("v1", "layer"):
        raise ValueError(f"fmt must be 'v1' or 'layer', got {fmt!r}")
    if name:
        yield from _str(1, name)
    for layer in layers:
        yield from _layer_parts(layer, fmt)


def encode_caffemodel(layers: Sequence[Layer], name: str = "", fmt: str = "v1") -> bytes:
    return b"".join(caffemodel_chunks(layers, name, fmt))


# --- layer tables: the release's names and ours -----------------------------

VGG_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
DECONVS = ("deconv5_1", "deconv5_2", "deconv5_3", "deconv4_1", "deconv4_2", "deconv4_3",
           "deconv3_1", "deconv3_2", "deconv3_3", "deconv2_1", "deconv2_2", "deconv1_1", "deconv1_2")


@dataclass(frozen=True)
class _Entry:
    layer: str  # Caffe layer name
    prefix: str  # our module
    bias: bool = True
    bn_layer: str | None = None  # the fork's BN layer that follows (in place)
    bn_prefix: str | None = None


# model/DeconvNet/DeconvNet_inference_deploy.prototxt (HyeonwooNoh/DeconvNet): each
# conv/deconv is followed by BN (bn1_1.., bnfc6, bnfc7, fc6-deconv-bn, debn5_1..)
# and ReLU; the decoder's deconvs run deconv5_1 .. deconv1_2, ours decoder.0 .. 12.
DECONVNET_TABLE = (
    *(_Entry(c, f"features.{i}.conv", True, f"bn{c[4:]}", f"features.{i}.bn") for i, c in enumerate(VGG_CONVS)),
    _Entry("fc6", "fc6.conv", True, "bnfc6", "fc6.bn"),
    _Entry("fc7", "fc7.conv", True, "bnfc7", "fc7.bn"),
    _Entry("fc6-deconv", "deconv_fc6.conv", True, "fc6-deconv-bn", "deconv_fc6.bn"),
    *(_Entry(d, f"decoder.{j}.conv", True, f"debn{d[6:]}", f"decoder.{j}.bn") for j, d in enumerate(DECONVS)),
    _Entry("seg-score-voc", "score"),
)
# model/FCN/fcn-8s-pascal-deploy.prototxt: score2 (4/2 deconv) has a bias,
# score4 (4/2) and upsample (16/8) have bias_term: false.
FCN8S_TABLE = (
    *(_Entry(c, f"features.{i}.conv") for i, c in enumerate(VGG_CONVS)),
    _Entry("fc6", "fc6.conv"), _Entry("fc7", "fc7.conv"), _Entry("score-fr", "score_fr"),
    _Entry("score2", "upscore2"), _Entry("score-pool4", "score_pool4"),
    _Entry("score4", "upscore_pool4", bias=False), _Entry("score-pool3", "score_pool3"),
    _Entry("upsample", "upscore8", bias=False),
)
# torchvision's vgg16 `features` indices of the 13 convs (weights._VGG16_CONVS).
_TV_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


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


def _from_table(params: Mapping[str, Sequence[np.ndarray]], table: Sequence[_Entry],
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
        raise ValueError(f"BN mode must be one of {BN_MODES}, got {bn_mode!r}")
    c = scale.size
    var = np.float32(1 - eps) if bn_mode == "inference" else np.float32(1)
    return {f"{prefix}.weight": scale, f"{prefix}.bias": shift,
            f"{prefix}.running_mean": np.zeros(c, np.float32),
            f"{prefix}.running_var": np.full(c, var, np.float32),
            f"{prefix}.num_batches_tracked": np.zeros((), np.int64)}


def _to_table(state: Mapping[str, np.ndarray], table: Sequence[_Entry], bn_mode: str,
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


def deconvnet_from_caffe(params: Mapping[str, Sequence[np.ndarray]], bn_mode: str,
                         eps: float = BN_EPS) -> dict[str, np.ndarray]:
    """The release's DeconvNet blobs -> our DeconvNet state dict (arrays, views where possible).
    Conv weights (out, in, k, k) and deconv weights (in, out, k, k) keep their
    layout (PyTorch's Conv2d/ConvTranspose2d); biases (1, 1, 1, C) and BN blobs
    (1, C, 1, 1) become (C,)."""
    return _from_table(params, DECONVNET_TABLE, bn_mode, eps)


def deconvnet_to_caffe(state: Mapping[str, np.ndarray], bn_mode: str = "inference",
                       eps: float = BN_EPS) -> dict[str, list[np.ndarray]]:
    """The inverse: our state dict -> the release's blobs; "inference" folds BN's
    statistics into scale/shift, "learn" writes gamma/beta as a snapshot holds them."""
    return _to_table(state, DECONVNET_TABLE, bn_mode, eps)


def fcn8s_from_caffe(params: Mapping[str, Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """The FCN authors' fcn-8s-pascal blobs -> our FCN8s state dict."""
    return _from_table(params, FCN8S_TABLE, None)


def fcn8s_to_caffe(state: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    return _to_table(state, FCN8S_TABLE, "inference")


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
    VGG_conv); fc8 (the 1000 ImageNet classes) is dropped, as `init --vgg16` does."""
    out: dict[str, np.ndarray] = {}
    for i, name in zip(_TV_CONVS, VGG_CONVS):
        w, b = _blobs(params, name, 2)
        out[f"features.{i}.weight"] = _weight4(w, name)
        out[f"features.{i}.bias"] = _vector(b, name)
    for name, key in (("fc6", "classifier.0"), ("fc7", "classifier.3")):
        w, b = _blobs(params, name, 2)
        out[f"{key}.weight"] = _matrix(w, name)
        out[f"{key}.bias"] = _vector(b, name)
    return out


def vgg16_to_caffe(state: Mapping[str, np.ndarray], fc: str = "inner_product",
                   fc_kernel: int = 7) -> dict[str, list[np.ndarray]]:
    """The inverse, from torchvision's vgg16 layout; `fc` "inner_product" writes
    fc6/fc7 as (1, 1, out, in) blobs, "conv" as (out, c, k, k) convs."""
    out: dict[str, list[np.ndarray]] = {}
    for i, name in zip(_TV_CONVS, VGG_CONVS):
        out[name] = [np.asarray(state[f"features.{i}.weight"], np.float32),
                     np.asarray(state[f"features.{i}.bias"], np.float32).reshape(1, 1, 1, -1)]
    for name, key, k in (("fc6", "classifier.0", fc_kernel), ("fc7", "classifier.3", 1)):
        w = np.asarray(state[f"{key}.weight"], np.float32)
        w = w.reshape(1, 1, *w.shape) if fc == "inner_product" else w.reshape(w.shape[0], -1, k, k)
        out[name] = [w, np.asarray(state[f"{key}.bias"], np.float32).reshape(1, 1, 1, -1)]
    return out


# --- the release's nets as layer lists (for writing) -------------------------

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

    def block(entry: _Entry, bottom: str, type_: str) -> str:
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


def fcn8s_layers(params: Mapping[str, Sequence[np.ndarray]]) -> list[Layer]:
    """model/FCN/fcn-8s-pascal-deploy.prototxt's layers with blobs, plus its
    blob-less pools, crops and fuses (names repeat there: two 'crop', two 'fuse')."""
    layers, x = [], "data"
    for i, c in enumerate(VGG_CONVS):
        layers += [_conv_block(params, c, x), Layer(f"relu{c[4:]}", "RELU", (c,), (c,))]
        x = c
        if i + 1 == len(VGG_CONVS) or VGG_CONVS[i + 1][4] != c[4]:
            layers.append(Layer(f"pool{c[4]}", "POOLING", (x,), (f"pool{c[4]}",)))
            x = f"pool{c[4]}"
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
    layers, x = [], "data"
    for i, c in enumerate(VGG_CONVS):
        layers += [_conv_block(params, c, x), Layer(f"relu{c[4:]}", "RELU", (c,), (c,))]
        x = c
        if i + 1 == len(VGG_CONVS) or VGG_CONVS[i + 1][4] != c[4]:
            layers.append(Layer(f"pool{c[4]}", "POOLING", (x,), (f"pool{c[4]}",)))
            x = f"pool{c[4]}"
    for name in ("fc6", "fc7", "fc8"):
        if name in params:
            w = params[name][0]
            ip = w.ndim == 4 and w.shape[0] == w.shape[1] == 1
            layers.append(_conv_block(params, name, x, "INNER_PRODUCT" if ip else "CONVOLUTION"))
            x = name
    return layers


# --- detection and conversion ------------------------------------------------

def detect_kind(net: CaffeNet) -> str:
    """"deconvnet", "fcn8s" or "vgg16" from the layer names."""
    names = {layer.name for layer in net.layers}
    if "seg-score-voc" in names or "fc6-deconv" in names or names & set(DECONVS):
        return "deconvnet"
    if names & {"score-fr", "score2", "score4", "upsample"}:
        return "fcn8s"
    if {"conv1_1", "fc6", "fc7"} <= names:
        return "vgg16"
    shown = ", ".join(sorted(names)[:8])
    raise ValueError(f"cannot tell DeconvNet, FCN-8s or VGG16 from its layer names ({shown}, ...); pass --kind")


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
    w1 = _weight4(_blobs(params, "conv1_1", 2)[0], "conv1_1")
    if w1.shape[1] != 3:
        raise ValueError(f"layer 'conv1_1' takes {w1.shape[1]} input channels, expected 3 (BGR)")
    c1 = w1.shape[0]
    fc6 = _blobs(params, "fc6", 2)[0]
    if kind == "vgg16":
        c5 = _weight4(_blobs(params, "conv5_3", 2)[0], "conv5_3").shape[0]
        m = _matrix(fc6, "fc6")
        fc_dim, k = m.shape[0], math.isqrt(m.shape[1] // max(c5, 1))
        if k * k * c5 != m.shape[1]:
            raise ValueError(f"layer 'fc6': {m.shape[1]} inputs is not conv5_3's {c5} channels x k x k")
    else:
        fc6 = _weight4(fc6, "fc6")
        fc_dim, k = fc6.shape[0], fc6.shape[2]
        score = "seg-score-voc" if kind == "deconvnet" else "score-fr"
        num_classes = _weight4(_blobs(params, score, 2)[0], score).shape[0]
    return DeconvNetConfig(arch="fcn8s" if kind == "fcn8s" else "deconvnet", num_classes=num_classes or 21,
                           width=c1 / 64, fc_dim=fc_dim, fc_kernel=k, batch_norm=kind != "fcn8s")


def _check_shapes(state: Mapping[str, np.ndarray], config: DeconvNetConfig, table: Sequence[_Entry]) -> None:
    """Every tensor the config's model has, with its shape; else ValueError naming
    the Caffe layers."""
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    given = {k: torch.empty(tuple(v.shape), device="meta") for k, v in state.items()}
    problems = _diff_state(expected, given)
    if problems:
        owner = {}
        for e in table:
            owner[e.prefix] = e.layer
            if e.bn_prefix:
                owner[e.bn_prefix] = e.bn_layer
        bad = [f"{owner.get(k.rsplit('.', 1)[0], k)} {tuple(given[k].shape)}, expected {tuple(expected[k].shape)}"
               for k in given if k in expected and given[k].shape != expected[k].shape]
        detail = "; ".join(bad) if bad else "; ".join(problems)
        raise ValueError(f"blob shapes do not fit one DeconvNetConfig (width {config.width:g} from conv1_1, "
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
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    params = net.params()
    found_bn = detect_bn_mode(net)
    if kind == "deconvnet":
        bn_mode = bn_mode or found_bn
        if bn_mode is None:
            raise ValueError("cannot tell from the file whether BN holds folded inference scale/shift or "
                             "training gamma/beta; pass --bn-mode inference or --bn-mode learn")
    elif bn_mode is not None:
        raise ValueError(f"--bn-mode is for DeconvNet files; a {kind} file has no BN")
    table = {"deconvnet": DECONVNET_TABLE, "fcn8s": FCN8S_TABLE}.get(kind, ())
    known = {e.layer for e in table} | {e.bn_layer for e in table} if table else {*VGG_CONVS, "fc6", "fc7", "fc8"}
    extra = sorted(set(params) - known)
    if extra:
        raise ValueError(f"layers with weights that a {kind} file does not have: {extra}")
    config = _config_from(kind, params, len(classes) if classes else None)
    if classes is None:
        if config.num_classes != len(VOC_CLASSES):
            raise ValueError(f"the file has {config.num_classes} classes, not PASCAL VOC's "
                             f"{len(VOC_CLASSES)}: name them with --classes FILE")
        classes = VOC_CLASSES
    if len(classes) != config.num_classes:
        raise ValueError(f"{len(classes)} class names for a file with {config.num_classes} classes")
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
    from .records import now_iso

    net = read_caffemodel(uri, storage_options)
    conv = convert(net, kind, classes, bn_mode, seed, source=uri)
    info = dataclasses.replace(conv.info, provenance={"created": now_iso(), **conv.info.provenance})
    info = write_model_dir(conv.state, out, info, storage_options, release=net.release)
    return dataclasses.replace(conv, info=info)


__all__ = [
    "Blob", "Layer", "CaffeNet", "parse_caffemodel", "read_caffemodel", "encode_caffemodel", "caffemodel_chunks",
    "deconvnet_from_caffe", "deconvnet_to_caffe", "fcn8s_from_caffe", "fcn8s_to_caffe", "vgg16_from_caffe",
    "vgg16_to_caffe", "deconvnet_layers", "fcn8s_layers", "vgg16_layers", "detect_kind", "detect_bn_mode",
    "convert", "convert_caffemodel", "Converted", "CAFFE_MEAN_BGR", "CAFFE_MEAN_RGB01", "CAFFE_STD01",
]
