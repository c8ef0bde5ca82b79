"""A small, learnable segmentation dataset in the PASCAL VOC layout.

    python -m deconvnet.data.synthetic --out data/synth --images 200 --seed 0
    python -m deconvnet.data.synthetic --out s3://bucket/synth --images 1000 --seed 1 --size 320x240 --classes 6

Foreground class k uses VOC id k (1 = aeroplane, 2 = bicycle, ...), so VOC's
names and palette apply, but it looks nothing like one: every class has its own
shape (disc, rectangle, triangle, ring, cross) and texture (solid, stripes,
checker, dots) in its own hue family, drawn with random size (20-60% of the
image side), aspect, rotation and colour jitter. An image holds 1-4 objects,
later ones occluding earlier ones, on a low-saturation background of smooth
noise with grey distractor blobs (background class). Saturated hue plus shape
separates the classes, so a tiny DeconvNet learns them in minutes on a CPU.

Written under the output URI, as in VOC2012:

    JPEGImages/<id>.jpg             RGB, JPEG quality 90
    SegmentationClass/<id>.png      palette PNG of class ids, 255 on object borders
    SegmentationObject/<id>.png     palette PNG of instance ids 1..n, 0 background, 255 borders
    ImageSets/Segmentation/{train,val,trainval}.txt

Image i depends only on (seed, i), so the same seed always writes the same bytes.
"""

from __future__ import annotations

import argparse
import colorsys
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .. import storage
from .imageio import encode_jpeg
from .voc import IGNORE_INDEX, VOC_CLASSES, encode_label_png

SHAPES = ("disc", "rectangle", "triangle", "ring", "cross")
# Area of each shape in its [-1, 1]^2 frame; objects are scaled by sqrt(pi / area)
# so every class covers about as many pixels as a disc and none is starved.
SHAPE_AREA = {"disc": np.pi, "rectangle": 4.0, "triangle": 2.0, "ring": np.pi * (1 - 0.55**2),
              "cross": 4 * 0.66 - 0.66**2}
TEXTURES = ("solid", "stripes", "checker", "dots")
# 5 shapes x 4 textures, cycled together: class k gets SHAPES[(k-1) % 5] and
# TEXTURES[(k-1) % 4], which are 20 distinct pairs, one per VOC object class.
MAX_CLASSES = len(VOC_CLASSES) - 1
BORDER = 1  # ignore band: pixels within 1 px of an instance edge, 2 px wide like a thin VOC border
MIN_VISIBLE = 0.4  # an object hidden more than this by later ones is left out
JPEG_QUALITY = 90
ID_PREFIX = "2026_"


@dataclass(frozen=True)
class Sample:
    """One generated image and its labels."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    classes: np.ndarray  # (H, W) uint8: 0 background, 1..K class ids, 255 borders
    objects: np.ndarray  # (H, W) uint8: 0 background, 1..n instance ids, 255 borders


def class_appearance(k: int, classes: int) -> tuple[str, str, float]:
    """(shape, texture, hue in [0, 1)) of foreground class k in 1..classes."""
    assert 1 <= k <= classes <= MAX_CLASSES, f"class {k} of {classes}"
    return SHAPES[(k - 1) % len(SHAPES)], TEXTURES[(k - 1) % len(TEXTURES)], (k - 1) / classes


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255  # (3,)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's own frame, where the shape spans [-1, 1]^2."""
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 1
    if shape == "rectangle":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "triangle":  # apex at v = -1, base at v = 1
        return (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    if shape == "ring":
        return (r2 <= 1) & (r2 >= 0.55**2)
    if shape == "cross":
        return ((np.abs(u) <= 1) & (np.abs(v) <= 0.33)) | ((np.abs(u) <= 0.33) & (np.abs(v) <= 1))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float in [0, 1]: 1 where the texture's dark colour shows. x, y in pixels."""
    if texture == "solid":
        return np.zeros_like(x)
    period = rng.uniform(9, 16)
    if texture == "stripes":
        return (np.sin(2 * np.pi * x / period) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    if texture == "dots":
        dx, dy = (x / period) % 1 - 0.5, (y / period) % 1 - 0.5
        return (dx * dx + dy * dy <= 0.3**2).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _frame(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float,
           angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel grid -> rotated pixel offsets (x, y) and normalised shape coordinates (u, v)."""
    c, s = np.cos(angle), np.sin(angle)
    x = c * (xx - cx) + s * (yy - cy)  # (H, W)
    y = -s * (xx - cx) + c * (yy - cy)  # (H, W)
    return x, y, x / rx, y / ry


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float: smooth low-saturation noise, a gradient and grey distractor blobs."""
    gh, gw = rng.integers(3, 8, size=2)
    grid = rng.uniform(60, 200, (gh, gw, 1)) + rng.normal(0, 10, (gh, gw, 3))  # (gh, gw, 3)
    small = Image.fromarray(grid.clip(0, 255).astype(np.uint8))
    img = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32)  # (H, W, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    gx, gy = rng.uniform(-40, 40, 2)
    img = img + (gx * xx / width + gy * yy / height)[..., None]
    side = min(height, width)
    for _ in range(rng.integers(2, 7)):
        shape = SHAPES[rng.integers(len(SHAPES))]
        r = rng.uniform(0.05, 0.2) * side
        _, _, u, v = _frame(xx, yy, rng.uniform(0, width), rng.uniform(0, height),
                            r, r * rng.uniform(0.5, 2), rng.uniform(0, 2 * np.pi))
        img[_shape_mask(shape, u, v)] = _hsv(rng.uniform(), rng.uniform(0, 0.12), rng.uniform(0.2, 0.9))
    return img


def _max_filter(a: np.ndarray, r: int) -> np.ndarray:
    """Maximum over each (2r+1) x (2r+1) window of an (H, W) array, edges replicated."""
    h, w = a.shape
    p = np.pad(a, r, mode="edge")
    rows = np.max([p[:, j:j + w] for j in range(2 * r + 1)], axis=0)  # (H + 2r, W)
    return np.max([rows[i:i + h] for i in range(2 * r + 1)], axis=0)  # (H, W)


def border_band(instances: np.ndarray, radius: int = BORDER) -> np.ndarray:
    """(H, W) bool: pixels within `radius` of a change of instance id (both sides)."""
    a = instances.astype(np.int16)
    return _max_filter(a, radius) != -_max_filter(-a, radius)


def sample(rng: np.random.Generator, height: int = 256, width: int = 256, classes: int = 4) -> Sample:
    """Draw one image with 1-4 objects of classes 1..`classes`, and its labels."""
    assert 1 <= classes <= MAX_CLASSES, f"classes must be in 1..{MAX_CLASSES}, got {classes}"
    img = _background(rng, height, width)  # (H, W, 3) float
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    side = min(height, width)
    drawn = []  # (class id, mask, texture, colours), bottom first
    for _ in range(rng.integers(1, 5)):
        k = int(rng.integers(1, classes + 1))
        shape, texture, hue = class_appearance(k, classes)
        half = rng.uniform(0.1, 0.3) * side  # a disc spans 20-60% of the side
        half *= np.sqrt(np.pi / SHAPE_AREA[shape])
        aspect = rng.uniform(0.7, 1.4)
        cx = rng.uniform(0.6 * half, width - 0.6 * half)
        cy = rng.uniform(0.6 * half, height - 0.6 * half)
        x, y, u, v = _frame(xx, yy, cx, cy, half * np.sqrt(aspect), half / np.sqrt(aspect),
                            rng.uniform(0, 2 * np.pi))
        h = hue + rng.uniform(-0.2, 0.2) / classes  # jitter within the class's hue band
        s, val = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
        colours = (_hsv(h, s, val), _hsv(h, s, val * rng.uniform(0.5, 0.65)))
        drawn.append((k, _shape_mask(shape, u, v), _texture(texture, x, y, rng), colours))

    # Keep, from the top down, the objects that stay mostly visible.
    occupied = np.zeros((height, width), dtype=bool)
    kept = []
    for obj in reversed(drawn):
        mask = obj[1]
        if mask.any() and (mask & ~occupied).sum() >= MIN_VISIBLE * mask.sum():
            kept.append(obj)
            occupied |= mask
    kept.reverse()

    objects = np.zeros((height, width), dtype=np.uint8)  # (H, W)
    class_of = np.zeros(len(kept) + 1, dtype=np.uint8)  # instance id -> class id
    for i, (k, mask, dark, (light_rgb, dark_rgb)) in enumerate(kept, start=1):
        fill = light_rgb + dark[..., None] * (dark_rgb - light_rgb)  # (H, W, 3)
        img[mask] = fill[mask]
        objects[mask] = i
        class_of[i] = k
    img += rng.normal(0, 4, img.shape)
    labels = class_of[objects]  # (H, W)
    band = border_band(objects)
    objects[band] = IGNORE_INDEX
    labels[band] = IGNORE_INDEX
    return Sample(image=img.round().clip(0, 255).astype(np.uint8), classes=labels, objects=objects)


def image_id(i: int) -> str:
    """VOC-style id of image i (0-based): '2026_000001' for i = 0."""
    return f"{ID_PREFIX}{i + 1:06d}"


def generate(out_uri: str, images: int, seed: int = 0, size: int | tuple[int, int] = 256,
             val_fraction: float = 0.25, classes: int = 4,
             storage_options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """Write `images` samples in the VOC layout under `out_uri`; return a summary.

    `size` is the side of a square image or (height, width); `classes` is the
    number of foreground classes K (VOC ids 1..K), so a model needs K + 1 outputs.
    """
    height, width = (size, size) if isinstance(size, int) else size
    assert images >= 1, f"images must be >= 1, got {images}"
    assert height >= 32 and width >= 32, f"images must be at least 32x32, got {height}x{width}"
    assert 0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}"
    assert 1 <= classes <= MAX_CLASSES, f"classes must be in 1..{MAX_CLASSES}, got {classes}"
    start = time.perf_counter()
    ids = [image_id(i) for i in range(images)]
    for i, name in enumerate(ids):
        s = sample(np.random.default_rng([seed, i]), height, width, classes)
        storage.write_bytes(storage.join(out_uri, "JPEGImages", f"{name}.jpg"), encode_jpeg(s.image, JPEG_QUALITY),
                            storage_options)
        storage.write_bytes(storage.join(out_uri, "SegmentationClass", f"{name}.png"),
                            encode_label_png(s.classes), storage_options)
        storage.write_bytes(storage.join(out_uri, "SegmentationObject", f"{name}.png"),
                            encode_label_png(s.objects), storage_options)

    n_val = min(round(images * val_fraction), images - 1)
    val_idx = set(np.random.default_rng(seed).permutation(images)[:n_val].tolist())
    splits = {"train": [n for i, n in enumerate(ids) if i not in val_idx],
              "val": [n for i, n in enumerate(ids) if i in val_idx],
              "trainval": ids}
    for split, names in splits.items():
        text = "".join(f"{n}\n" for n in names)
        storage.write_bytes(storage.join(out_uri, "ImageSets", "Segmentation", f"{split}.txt"),
                            text.encode(), storage_options)
    return {"out": out_uri, "images": images, "train": len(splits["train"]),
            "val": len(splits["val"]), "height": height, "width": width, "seed": seed,
            "num_classes": classes + 1, "class_names": list(VOC_CLASSES[: classes + 1]),
            "seconds": round(time.perf_counter() - start, 3)}


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '320x240' (width x height) -> (240, 320) as (height, width)."""
    w, sep, h = text.lower().partition("x")
    try:
        width = int(w)
        height = int(h) if sep else width
    except ValueError:
        raise ValueError(f"--size must be N or WIDTHxHEIGHT, got {text!r}") from None
    if width < 32 or height < 32:
        raise ValueError(f"--size must be at least 32x32, got {text!r}")
    return height, width


def main(argv: list[str] | None = None) -> int:
    from ..cli import add_storage_option_arg, storage_options_from

    parser = argparse.ArgumentParser(prog="python -m deconvnet.data.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root URI to write (local path, s3://, ...)")
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--size", default="256", help="N (square) or WIDTHxHEIGHT, default 256")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="share of images in val.txt")
    parser.add_argument("--classes", type=int, default=4,
                        help=f"foreground classes K, 1..{MAX_CLASSES} (VOC ids 1..K)")
    add_storage_option_arg(parser)
    args = parser.parse_args(argv)

    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 1 <= args.classes <= MAX_CLASSES:
        parser.error(f"--classes must be in 1..{MAX_CLASSES}, got {args.classes}")
    try:
        size = parse_size(args.size)
    except ValueError as e:
        parser.error(str(e))
    opts = storage_options_from(parser, args.storage_option)
    try:
        summary = generate(args.out, args.images, args.seed, size, args.val_fraction,
                           args.classes, opts)
    except (OSError, ValueError) as e:
        parser.error(f"--out {args.out}: {e}")
    print(f"wrote {summary['images']} images ({summary['train']} train, {summary['val']} val, "
          f"{summary['num_classes']} classes, {summary['width']}x{summary['height']}) "
          f"to {args.out} in {summary['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
