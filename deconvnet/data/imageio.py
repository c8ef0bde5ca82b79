"""Decoding user images safely: whatever is in the bucket becomes an (H, W, 3)
uint8 RGB array or a `BadImage` error that says what is wrong.

EXIF orientation is applied; grayscale, palette, CMYK, RGBA and 16-bit images
are converted to 8-bit RGB. Sizes are checked from the header before any pixel
is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 100_000_000  # 100 MP: a 10,000 x 10,000 photo is fine, a bomb is not
MAX_SIDE = 20_000  # longest side; the merged maps are C x H x W floats
MAX_BYTES = 256 * 2**20  # 256 MiB: refuse to read more than this from storage


class BadImage(ValueError):
    """The bytes are not an image we can segment; the message says why."""


def check_size(width: int, height: int, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> None:
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                       f"{max_pixels:,} (decompression-bomb guard)")
    if max(width, height) > max_side:
        raise BadImage(f"image is {width}x{height}, longest side over the limit of {max_side:,}")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8 RGB, upright. Raises BadImage."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    if len(data) > MAX_BYTES:
        raise BadImage(f"file is {len(data):,} bytes, over the limit of {MAX_BYTES:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            check_size(img.width, img.height, max_pixels, max_side)
            img.load()
            img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image file Pillow can read (unknown or corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise BadImage(f"corrupt or truncated image: {e}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit (or int) grayscale
        a = np.asarray(img).astype(np.int64)  # (H, W)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = ((a - lo) / (hi - lo if hi > lo else 1) * 255).round().astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)  # transparent areas become white, as viewers show them
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)  # (H, W, 3)


def downscale(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 with its longer side at most `max_side` (bilinear), and the
    factor applied (1.0 when it already fits or `max_side` is None)."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL's (width, height)
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), scale


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
