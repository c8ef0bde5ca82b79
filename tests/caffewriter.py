"""A writer of the `.caffemodel` protobuf wire format, the inverse of
`deconvnet.caffe.proto`'s reader, for tests and bench/convert_caffe.py: fixtures
in the release's exact format (V1 `layers` with the fork's type enum, as its
files are) or in newer Caffe's `layer` format. No runtime module writes Caffe
files; field numbers are those in deconvnet/caffe/proto.py's docstring.

    data = caffewriter.encode_caffemodel(caffenets.deconvnet_layers(params))
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from deconvnet.caffe.proto import LAYER_TYPES, V1_TYPES, Blob, Layer


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
    parts = [*_str(1, layer.name), *_str(2, LAYER_TYPES.get(layer.type, layer.type)),
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
