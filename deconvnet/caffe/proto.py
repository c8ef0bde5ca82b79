"""The Caffe `.caffemodel` file format: a reader of the protobuf wire format
for the messages a DeconvNet, FCN-8s or VGG16 file holds.

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
(The tests write such files with tests/caffewriter.py; nothing here writes one.)
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .. import storage


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
LAYER_TYPES = {"CONVOLUTION": "Convolution", "DECONVOLUTION": "Deconvolution", "INNER_PRODUCT": "InnerProduct",
              "POOLING": "Pooling", "RELU": "ReLU", "SOFTMAX": "Softmax", "DROPOUT": "Dropout", "BN": "BN",
              "UNPOOLING": "Unpooling", "CROP": "Crop", "ELTWISE": "Eltwise", "DATA": "Data",
              "SOFTMAX_LOSS": "SoftmaxWithLoss", "CONCAT": "Concat", "SPLIT": "Split", "ACCURACY": "Accuracy"}
_NEW_NAMES = {v: k for k, v in LAYER_TYPES.items()}


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


# Field numbers of the parts every layer has: V1LayerParameter, then LayerParameter.
_V1_FIELDS = {4: "name", 5: "type", 2: "bottoms", 3: "tops", 6: "blobs"}
_NEW_FIELDS = {1: "name", 2: "type", 3: "bottoms", 4: "tops", 7: "blobs"}


def _layer(buf, start: int, end: int, numbers: dict[int, str]) -> tuple[dict, list]:
    """A layer message's name, type, bottoms, tops and blobs by `numbers`, and
    the fields it did not use as (num, wire type, value)."""
    got: dict = {"name": "", "type": "NONE", "bottoms": [], "tops": [], "blobs": []}
    rest = []
    for num, wt, v in _fields(buf, start, end):
        role = numbers.get(num)
        if role == "name":
            got["name"] = _string(buf, v)
        elif role == "type":  # V1: an enum; the `layer` format: a string
            got["type"] = _V1_NAMES.get(v, f"TYPE_{v}") if wt == 0 else _NEW_NAMES.get(
                _string(buf, v), _string(buf, v).upper())
        elif role in ("bottoms", "tops"):
            got[role].append(_string(buf, v))
        elif role == "blobs":
            got["blobs"].append(_blob(buf, *_span(v, "blob")))
        else:
            rest.append((num, wt, v))
    return got, rest


def _v1_layer(buf, start: int, end: int) -> Layer:
    got, rest = _layer(buf, start, end, _V1_FIELDS)
    bn_mode = None
    for num, _, v in rest:
        if num == 45:  # the fork's bn_param; bn_mode 3, LEARN when absent
            bn_mode = "LEARN"
            for n2, wt2, v2 in _fields(buf, *_span(v, "bn_param")):
                if n2 == 3 and wt2 == 0:
                    bn_mode = {0: "LEARN", 1: "INFERENCE"}.get(v2, f"MODE_{v2}")
        elif num == 1:  # a V0 layer inside (the oldest files): name 1, type 2, blobs 50
            for n2, _, v2 in _fields(buf, *_span(v, "V0 layer")):
                if n2 == 1:
                    got["name"] = _string(buf, v2)
                elif n2 == 2:
                    got["type"] = _string(buf, v2).upper()
                elif n2 == 50:
                    got["blobs"].append(_blob(buf, *_span(v2, "blob")))
    if got["type"] == "BN" and bn_mode is None:
        bn_mode = "LEARN"  # bn_param's default in the fork's caffe.proto
    return Layer(got["name"], got["type"], tuple(got["bottoms"]), tuple(got["tops"]), tuple(got["blobs"]), bn_mode)


def _new_layer(buf, start: int, end: int) -> Layer:
    got, _ = _layer(buf, start, end, _NEW_FIELDS)
    return Layer(got["name"], got["type"], tuple(got["bottoms"]), tuple(got["tops"]), tuple(got["blobs"]))


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
