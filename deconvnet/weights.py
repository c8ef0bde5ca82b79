"""Model directories and foreign weights.

A model directory (a local path or any fsspec URI) holds two files:

    model.safetensors   the state dict (weights, biases, BN statistics)
    config.json         architecture, class names, palette, input normalisation,
                        provenance and the model id

so it describes itself, the way torchvision's weights enums do. Loading never
unpickles: a directory with only a `.pt`/`.pth`/`.bin` file is refused.

VGG16 ImageNet weights in the layout most users have (a torchvision-style
`vgg16` or `vgg16_bn` state dict, as `.pth` or `.safetensors`) initialise the
encoder and fc6/fc7 through one pure function, `vgg16_to_deconvnet`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from . import storage
from .model import DeconvNetConfig, build_model, vgg_stages
from .data.voc import VOC_CLASSES, voc_palette

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")

# torchvision's ImageNet normalisation, which VGG16 weights expect (RGB, 0..1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """Everything in `config.json`: what the weights are and how to feed them."""

    config: DeconvNetConfig
    classes: tuple[str, ...] = VOC_CLASSES
    palette: tuple[tuple[int, int, int], ...] = field(
        default_factory=lambda: tuple(map(tuple, voc_palette(256).tolist())))
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB, on 0..1 pixel values
    std: tuple[float, float, float] = IMAGENET_STD
    provenance: Mapping[str, Any] = field(default_factory=dict)
    model_id: str = ""  # content hash, filled in on save

    def __post_init__(self):
        if len(self.classes) != self.config.num_classes:
            raise ValueError(f"`classes` has {len(self.classes)} names for a {self.config.num_classes}-class model")

    def palette_array(self) -> np.ndarray:
        """(256, 3) uint8: class id k is drawn in colour k."""
        return np.asarray(self.palette, dtype=np.uint8)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "architecture": dataclasses.asdict(self.config),
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            "normalization": {"mean": list(self.mean), "std": list(self.std),
                              "channel_order": "RGB", "pixel_scale": 255},
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelInfo:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported model `format_version` {d.get('format_version')!r}")
        norm = d["normalization"]
        if norm.get("channel_order", "RGB") != "RGB":
            raise ValueError(f"unsupported `channel_order` {norm['channel_order']!r}")
        return cls(
            config=DeconvNetConfig.from_dict(d["architecture"]),
            classes=tuple(d["classes"]),
            palette=tuple(tuple(c) for c in d["palette"]),
            mean=tuple(norm["mean"]),
            std=tuple(norm["std"]),
            provenance=d.get("provenance", {}),
            model_id=d.get("model_id", ""),
        )


def _model_id(arch: str, weights: bytes, info_json: Mapping[str, Any]) -> str:
    """Hash of the weights and of what changes their meaning (architecture,
    classes, normalisation), so two runs with the same id label identically."""
    h = hashlib.sha256(weights)
    meaning = {k: info_json[k] for k in ("architecture", "classes", "normalization")}
    h.update(json.dumps(meaning, sort_keys=True).encode())
    return f"{arch}-{h.hexdigest()[:16]}"


def save_model_dir(model: nn.Module, uri: str, info: ModelInfo,
                   storage_options: storage.StorageOptions | None = None) -> ModelInfo:
    """Write a model's state dict and `info` under `uri` (see `write_model_dir`)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_model_dir(state, uri, info, storage_options)


def write_model_dir(state: Mapping[str, torch.Tensor | np.ndarray], uri: str, info: ModelInfo,
                    storage_options: storage.StorageOptions | None = None,
                    release: Callable[[np.ndarray], None] | None = None) -> ModelInfo:
    """Write `model.safetensors` + `config.json` under `uri` from a state dict
    (tensors or numpy arrays); returns the info with its model id. Weights are
    written first, so a reader that finds a config finds the weights it describes.

    No model is built: a converter writes a 252M-parameter file without a second
    copy of the weights. `release(array)` is called with each piece of a numpy source
    (a uint8 view) once its bytes are in the file buffer (a memory-mapped source drops its pages)."""
    weights = serialize_state(state, release)
    draft = info.to_json()
    model_id = _model_id(info.config.arch, weights, draft)
    info = dataclasses.replace(info, model_id=model_id, provenance={
        **info.provenance, "sha256": hashlib.sha256(weights).hexdigest()})
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights, storage_options)
    storage.write_bytes(storage.join(uri, CONFIG_FILE),
                        json.dumps(info.to_json(), indent=2).encode(), storage_options)
    return info


# safetensors dtype names, in the order of its Rust `Dtype` enum (the file lays
# tensors out by dtype, largest first, then by name).
_ST_DTYPES = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_ST_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
             torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
             torch.float64: "F64", torch.int64: "I64"}


def _flat_bytes(v: torch.Tensor | np.ndarray) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(safetensors dtype, shape, the data as a flat little-endian uint8 array, no copy when possible)."""
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write dtype {t.dtype}")
        return _ST_NAMES[t.dtype], tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    a = np.asarray(v)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    name = {"b": "BOOL", "u1": "U8", "i1": "I8", "i2": "I16", "u2": "U16", "f2": "F16", "i4": "I32",
            "u4": "U32", "f4": "F32", "f8": "F64", "i8": "I64", "u8": "U64"}.get(
        "b" if a.dtype == np.bool_ else f"{a.dtype.kind}{a.dtype.itemsize}")
    if name is None:
        raise ValueError(f"cannot write dtype {a.dtype}")
    return name, a.shape, np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def serialize_state(state: Mapping[str, torch.Tensor | np.ndarray],
                    release: Callable[[np.ndarray], None] | None = None) -> bytearray:
    """The safetensors file of a state dict, byte for byte what
    `safetensors.torch.save` writes (so model ids do not change), built in one
    buffer: peak memory is the sources plus one copy, not three."""
    items = sorted(((k, _flat_bytes(v), v) for k, v in state.items()),
                   key=lambda it: (-_ST_DTYPES.index(it[1][0]), it[0]))
    header, offset = {}, 0
    for k, (dtype, shape, flat), _ in items:
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + flat.size]}
        offset += flat.size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    buf = bytearray(8 + len(head) + offset)
    buf[:8] = len(head).to_bytes(8, "little")
    buf[8:8 + len(head)] = head
    out = np.frombuffer(buf, np.uint8)
    start = 8 + len(head)
    chunk = 64 * 2**20  # copy big tensors (fc6 is 411 MB) in pieces, releasing each
    for k, (dtype, shape, flat), src in items:
        a = start + header[k]["data_offsets"][0]
        for i in range(0, flat.size, chunk):
            piece = flat[i: i + chunk]
            out[a + i: a + i + piece.size] = piece
            if release is not None and isinstance(src, np.ndarray):
                release(piece)
    del out
    return buf


def read_model_info(uri: str, storage_options: storage.StorageOptions | None = None) -> ModelInfo:
    """Only `config.json`: cheap, for checks before any work starts."""
    cfg_uri = storage.join(uri, CONFIG_FILE)
    try:
        raw = storage.read_bytes(cfg_uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{uri} is not a model directory: no {CONFIG_FILE} "
            f"(make one with `python -m deconvnet init`, or with training's `export`)") from None
    try:
        return ModelInfo.from_json(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_uri}: not a valid model config: {e}") from e


def load_model_dir(uri: str, device: str | torch.device = "cpu",
                   storage_options: storage.StorageOptions | None = None) -> tuple[nn.Module, ModelInfo]:
    """(model in eval mode on `device`, its info). Raises ValueError when the
    weights are corrupt or do not match the config, naming the tensors."""
    info = read_model_info(uri, storage_options)
    w_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        raw = storage.read_bytes(w_uri, storage_options)
    except FileNotFoundError:
        raise _no_weights(uri, storage_options) from None
    try:
        state = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{w_uri}: corrupt or truncated safetensors file ({len(raw)} bytes): {e}") from e
    model = build_model(info.config)
    load_exact(model, state, source=w_uri)
    return model.to(device).eval(), info


def _no_weights(uri: str, storage_options: storage.StorageOptions | None) -> FileNotFoundError:
    found = [u for u in storage.list_files(uri, storage_options=storage_options)
             if u.lower().endswith(_PICKLE_SUFFIXES)]
    hint = f"; found {found[0]!r}, but pickled weights are never loaded" if found else ""
    return FileNotFoundError(f"{uri}: no {WEIGHTS_FILE}{hint}")


def check_model_dir(uri: str, storage_options: storage.StorageOptions | None = None) -> ModelInfo:
    """The model directory's info, once its weights are known to fit its config:
    every tensor the config's model has, with the right shape, and a file as long
    as its header says. Reads config.json and the safetensors header only (a few
    KB, not the weights), so a job can check before it processes any image.
    Raises FileNotFoundError or ValueError naming the problem."""
    info = read_model_info(uri, storage_options)
    w_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        total = storage.size(w_uri, storage_options)
        head = storage.read_range(w_uri, 0, 8, storage_options)
    except FileNotFoundError:
        raise _no_weights(uri, storage_options) from None
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < header_len <= min(total - 8, 100 * 2**20):
        raise ValueError(f"{w_uri}: corrupt or truncated safetensors file ({total} bytes): bad header length")
    try:
        header = json.loads(storage.read_range(w_uri, 8, 8 + header_len, storage_options))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        given = {k: torch.empty(v["shape"], device="meta") for k, v in tensors.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{w_uri}: corrupt or truncated safetensors file ({total} bytes): bad header: {e}") from e
    if 8 + header_len + end != total:
        raise ValueError(f"{w_uri}: corrupt or truncated safetensors file: {total} bytes, "
                         f"its header describes {8 + header_len + end}")
    with torch.device("meta"):  # shapes only: no memory for the weights
        expected = build_model(info.config).state_dict()
    problems = diff_state(expected, given)
    if problems:
        raise ValueError(f"{w_uri} does not match {storage.join(uri, CONFIG_FILE)}: " + "; ".join(problems))
    return info


def load_exact(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with an error that names every missing,
    unexpected and mis-shaped tensor."""
    problems = diff_state(model.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not match the model's config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def diff_state(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
               allow_missing: Sequence[str] = ()) -> list[str]:
    """Why `given` does not load into a model whose state dict is `expected`
    (meta tensors will do): its missing (bar keys ending in one of
    `allow_missing`), unexpected and mis-shaped tensors, one entry per kind;
    empty when it fits."""
    missing = [k for k in expected if k not in given and not any(k.endswith(s) for s in allow_missing)]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in given if k in expected and given[k].shape != expected[k].shape]
    out = []
    if missing:
        out.append(f"missing {missing}")
    if unexpected:
        out.append(f"unexpected {unexpected}")
    if shapes:
        out.append(f"shape mismatch (given vs model) {shapes}")
    return out


# --- VGG16 ImageNet weights -------------------------------------------------

def torchvision_conv_indices(batch_norm: bool, vgg: str = "D") -> tuple[int, ...]:
    """Where `model.cfgs`' convs sit in torchvision's `features` Sequential:
    each conv is followed by a ReLU (a BatchNorm2d and a ReLU in `vgg16_bn`),
    each "M" is one MaxPool2d. (0, 2, 5, 7, ...) for vgg16, (0, 3, 7, 10, ...) for vgg16_bn."""
    out, i = [], 0
    for stage in vgg_stages(vgg):
        for _ in stage:
            out.append(i)
            i += 3 if batch_norm else 2
        i += 1  # the pool
    return tuple(out)


def fc6_kernel(inputs: int, channels: int) -> int:
    """The side k of fc6's kernel when VGG's Linear fc6 takes `inputs` values,
    pool5's `channels` x k x k (k = 7 at a 224x224 input); ValueError if they do not factor so."""
    k = math.isqrt(inputs // max(channels, 1))
    if channels < 1 or k * k * channels != inputs:
        raise ValueError(f"fc6's {inputs} inputs are not pool5's {channels} channels x k x k")
    return k


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def vgg16_to_deconvnet(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision `vgg16`/`vgg16_bn` state dict -> our encoder + fc6/fc7 keys.

    The classifier's Linear fc6 (4096, 25088) becomes the 7x7 conv fc6
    (4096, 512, 7, 7) and fc7 (4096, 4096) the 1x1 conv fc7, as timm's
    `_convert_vgg` does. classifier.6 (the 1000 ImageNet classes) is dropped.
    """
    bn = "features.1.running_mean" in state
    convs = torchvision_conv_indices(bn)
    if f"features.{convs[0]}.weight" not in state:
        raise ValueError("not a torchvision vgg16/vgg16_bn state dict: no 'features.0.weight'; "
                         f"first keys are {list(state)[:5]}")
    out: dict[str, torch.Tensor] = {}
    for i, src in enumerate(convs):
        for p in ("weight", "bias"):
            if f"features.{src}.{p}" in state:
                out[f"features.{i}.conv.{p}"] = state[f"features.{src}.{p}"]
        if bn:
            for p in _BN_KEYS:
                if f"features.{src + 1}.{p}" in state:
                    out[f"features.{i}.bn.{p}"] = state[f"features.{src + 1}.{p}"]
    last = f"features.{len(convs) - 1}.conv.weight"
    c5 = out[last].shape[0] if last in out else vgg_stages()[-1][-1][1]
    for src, dst in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
        if f"{src}.weight" in state:
            w = state[f"{src}.weight"]  # (out, in) Linear
            k = fc6_kernel(w.shape[1], c5) if dst == "fc6" else 1
            out[f"{dst}.conv.weight"] = w.reshape(w.shape[0], -1, k, k)
            out[f"{dst}.conv.bias"] = state[f"{src}.bias"]
    return out


def read_state_dict(uri: str, storage_options: storage.StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch `.pth` file, read with
    `weights_only=True` (tensors only, no arbitrary objects)."""
    raw = storage.read_bytes(uri, storage_options)
    if _looks_like_safetensors(raw):
        return st_load(raw)
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign files
        raise ValueError(f"{uri}: not a safetensors or torch weights file: {e}") from e
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{uri}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)


def _looks_like_safetensors(raw: bytes) -> bool:
    if len(raw) < 10:
        return False
    n = int.from_bytes(raw[:8], "little")
    return 0 < n <= len(raw) - 8 and raw[8:9] == b"{"


def init_from_vgg16(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy VGG16 weights into the encoder and fc6/fc7 of a DeconvNet or FCN-8s.

    Every tensor of the converted dict must exist in the model with the same
    shape, and every encoder conv and fc6/fc7 must be covered; otherwise
    ValueError names the offending keys. Returns the keys that were loaded.
    """
    converted = vgg16_to_deconvnet(state)
    target = model.state_dict()
    wanted = {k: v for k, v in target.items()
              if k.startswith(("features.", "fc6.conv", "fc7.conv"))}
    # BN statistics are only expected when the VGG file had BN (vgg16_bn).
    has_bn = any(".bn." in k for k in converted)
    optional = () if has_bn else tuple(f".bn.{p}" for p in (*_BN_KEYS, "num_batches_tracked"))
    problems = diff_state(wanted, converted, allow_missing=(*optional, "num_batches_tracked"))
    if problems:
        raise ValueError("VGG16 weights do not fit this model: " + "; ".join(problems))
    model.load_state_dict(converted, strict=False)
    return sorted(converted)
