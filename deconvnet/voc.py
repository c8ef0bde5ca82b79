"""PASCAL VOC class names and palette, and palette-PNG encoding of label maps.

A label map is an (H, W) uint8 array of class ids; 255 means "ignore" (VOC's
object borders). On disk it is a palette ("P" mode) PNG whose pixel values are
the class ids, so any image viewer shows colours and any loader gets the ids.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC colour map, (n, 3) uint8: class id k gets colour palette[k].

    This is the bit-interleaving map of the VOC devkit's `labelcolormap.m`;
    index 255 (ignore) comes out as (224, 224, 192), as in the dataset.
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[k] = (r, g, b)
    return palette


def encode_label_png(labels: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """(H, W) uint8 class ids -> palette PNG bytes (pixel values are the ids)."""
    assert labels.ndim == 2, f"label map must be (H, W), got shape {labels.shape}"
    assert labels.dtype == np.uint8, f"label map must be uint8, got {labels.dtype}"
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = pal[:256]
    if len(pal) < 256:  # keep the ignore colour even for short palettes
        full[IGNORE_INDEX] = voc_palette()[IGNORE_INDEX]
    img = Image.fromarray(labels, mode="P")
    img.putpalette(full.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """Palette (or single-channel) PNG bytes -> (H, W) uint8 class ids."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("P", "L"):
        raise ValueError(f"a label PNG must be palette or grayscale, got mode {img.mode!r}")
    return np.array(img, dtype=np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB using the palette."""
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = pal[:256]
    return full[labels]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5,
            palette: np.ndarray | None = None) -> np.ndarray:
    """Blend the label colours over an (H, W, 3) uint8 photo; background stays as is."""
    assert image.shape[:2] == labels.shape, f"image {image.shape} vs labels {labels.shape}"
    colours = colorize(labels, palette).astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels != 0) & (labels != IGNORE_INDEX)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.round().clip(0, 255).astype(np.uint8)
