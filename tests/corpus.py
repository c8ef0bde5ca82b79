"""Image files a bucket may hold, good and bad, built in memory for tests.

`corpus()` maps a file name to (bytes, expected status, expected (H, W) or a
fragment of the expected error message).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import matplotlib

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # a real photograph


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scene(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A small RGB scene: textured background, a red disc and a blue square."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (h // 4) ** 2] = (220, 30, 30)
    img[h // 5: h // 5 + h // 3, w - w // 3: w - w // 10] = (30, 40, 210)
    return img


def png_bomb_header(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(h: int = 40, w: int = 64) -> bytes:
    """A landscape JPEG whose EXIF says 'rotate 90 CW' (orientation 6): upright it is w x h."""
    img = Image.fromarray(scene(h, w))
    exif = img.getexif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=90, exif=exif)


def corpus() -> dict[str, tuple[bytes, str, object]]:
    good = Image.fromarray(scene())
    jpeg = _save(good, "JPEG", quality=90)
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    return {
        "ok/scene.jpg": (jpeg, "ok", (96, 128)),
        "ok/photo.jpg": (PHOTO.read_bytes(), "ok", Image.open(PHOTO).size[::-1]),
        "ok/one_pixel.png": (_save(Image.new("RGB", (1, 1), (10, 200, 10)), "PNG"), "ok", (1, 1)),
        "ok/rgba.png": (_save(rgba, "PNG"), "ok", (96, 128)),
        "ok/gray16.png": (_save(gray16, "PNG"), "ok", (48, 64)),
        "ok/gray.jpg": (_save(good.convert("L"), "JPEG"), "ok", (96, 128)),
        "ok/palette.png": (_save(good.convert("P"), "PNG"), "ok", (96, 128)),
        "ok/cmyk.jpg": (_save(good.convert("CMYK"), "JPEG"), "ok", (96, 128)),
        "ok/exif_rotated.jpg": (exif_rotated_jpeg(40, 64), "ok", (64, 40)),
        "bad/empty.jpg": (b"", "error", "empty file"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "error", "truncated"),
        "bad/text.jpg": (b"this is not an image, it is a note\n" * 20, "error", "not an image"),
        "bad/bomb.png": (png_bomb_header(), "error", "decompression.bomb"),
    }
