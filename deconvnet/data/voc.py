"""PASCAL VOC: class names and palette, palette-PNG label maps, and the dataset layout.

A label map is an (H, W) uint8 array of class ids; 255 means "ignore" (VOC's
object borders). On disk it is a palette ("P" mode) PNG whose pixel values are
the class ids, so any image viewer shows colours and any loader gets the ids.

The layout, under any URI (read through `deconvnet.storage`):
JPEGImages/<id>.jpg, SegmentationClass/<id>.png (class ids, 255 = ignore),
SegmentationObject/<id>.png (instance ids) when present, and lists in
ImageSets/Segmentation/. A list line is an id, or two paths relative to the
root ("/JPEGImages/x.jpg /SegmentationClassAug/x.png", the format of the
authors' training lists and of SBD-augmented lists).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .. import storage
from .imageio import decode_image

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_INDEX = 255
TRAIN_LIST = "ImageSets/Segmentation/train.txt"
VAL_LIST = "ImageSets/Segmentation/val.txt"


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


def _full_palette(palette: np.ndarray | None) -> np.ndarray:
    """(256, 3) uint8: `palette` (default VOC's) padded with black, with VOC's
    ignore colour at 255 when a short palette does not reach it."""
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = pal[:256]
    if len(pal) <= IGNORE_INDEX:
        full[IGNORE_INDEX] = voc_palette()[IGNORE_INDEX]
    return full


def encode_label_png(labels: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """(H, W) uint8 class ids -> palette PNG bytes (pixel values are the ids)."""
    assert labels.ndim == 2, f"label map must be (H, W), got shape {labels.shape}"
    assert labels.dtype == np.uint8, f"label map must be uint8, got {labels.dtype}"
    img = Image.fromarray(labels, mode="P")
    img.putpalette(_full_palette(palette).reshape(-1).tolist())
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
    return _full_palette(palette)[labels]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5,
            palette: np.ndarray | None = None) -> np.ndarray:
    """Blend the label colours over an (H, W, 3) uint8 photo; background stays as is."""
    assert image.shape[:2] == labels.shape, f"image {image.shape} vs labels {labels.shape}"
    colours = colorize(labels, palette).astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels != 0) & (labels != IGNORE_INDEX)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.round().clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------ the dataset

@dataclass(frozen=True)
class VocItem:
    """Where one sample's files are."""

    id: str
    image: str  # JPEG URI
    classes: str  # SegmentationClass PNG URI
    objects: str | None  # SegmentationObject PNG URI; None: derive objects from classes


@dataclass(frozen=True)
class VocSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    classes: np.ndarray  # (H, W) uint8 class ids, 255 = ignore
    objects: np.ndarray | None  # (H, W) uint8 instance ids, 0 background, 255 ignore


def read_list(root: str, list_uri: str, has_objects: bool,
              storage_options: storage.StorageOptions | None = None) -> list[VocItem]:
    """The items of one list file (ids, or 'IMAGE LABEL' paths relative to `root`)."""
    text = storage.read_bytes(list_uri, storage_options).decode()
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            i = fields[0]
            items.append(VocItem(i, storage.join(root, "JPEGImages", f"{i}.jpg"),
                                 storage.join(root, "SegmentationClass", f"{i}.png"),
                                 storage.join(root, "SegmentationObject", f"{i}.png") if has_objects else None))
        elif len(fields) == 2:
            image, label = fields
            i = image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            items.append(VocItem(i, storage.join(root, image), storage.join(root, label), None))
        else:
            raise ValueError(f"{list_uri} line {n}: expected an id or 'IMAGE LABEL', got {line!r}")
    return items


class VocDataset:
    """A list of VOC items under one root; `load(i)` reads and decodes one."""

    def __init__(self, items: Sequence[VocItem], storage_options: storage.StorageOptions | None = None):
        self.items = list(items)
        self.storage_options = dict(storage_options or {})

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> VocSample:
        item = self.items[index]
        opts = self.storage_options
        image = decode_image(storage.read_bytes(item.image, opts))
        classes = decode_label_png(storage.read_bytes(item.classes, opts))
        objects = None
        if item.objects is not None:
            try:
                objects = decode_label_png(storage.read_bytes(item.objects, opts))
            except FileNotFoundError:
                objects = None  # this id has no instance annotation: components instead
        for what, arr in (("labels", classes), ("objects", objects)):
            if arr is not None and arr.shape != image.shape[:2]:
                raise ValueError(f"{item.id}: {what} are {arr.shape[1]}x{arr.shape[0]} but the image is "
                                 f"{image.shape[1]}x{image.shape[0]}")
        return VocSample(image, classes, objects)

    def classes_present(self, threads: int = storage.READ_THREADS) -> list[tuple[int, ...]]:
        """The object classes (not background, not ignore) in each item's label
        map, read concurrently: label PNGs are small and reading them is waiting."""
        def present(item: VocItem) -> tuple[int, ...]:
            ids = np.unique(decode_label_png(storage.read_bytes(item.classes, self.storage_options)))
            return tuple(int(c) for c in ids if c not in (0, IGNORE_INDEX))

        return list(storage.read_concurrently(present, self.items, threads))


def open_train_val(root: str, extra_train_lists: Sequence[str] = (),
                   storage_options: storage.StorageOptions | None = None) -> tuple[VocDataset, VocDataset]:
    """(train, val) under a VOC root: train.txt plus the extra lists, without
    duplicates and without any val image (SBD's lists include some of VOC's val
    images). ValueError when either ends up empty."""
    has_objects = storage.isdir(storage.join(root, "SegmentationObject"), storage_options)
    val = read_list(root, storage.join(root, VAL_LIST), has_objects, storage_options)
    val_ids = {v.id for v in val}
    train: dict[str, VocItem] = {}
    for uri in (storage.join(root, TRAIN_LIST), *extra_train_lists):
        for item in read_list(root, uri, has_objects, storage_options):
            if item.id not in val_ids:
                train.setdefault(item.id, item)
    if not train:
        raise ValueError(f"{root}: no training images left after removing the val images")
    if not val:
        raise ValueError(f"{root}: {VAL_LIST} is empty")
    return VocDataset(list(train.values()), storage_options), VocDataset(val, storage_options)
