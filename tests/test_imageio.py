"""Decoding whatever a bucket holds: every file is an image or a clear BadImage."""

import numpy as np
import pytest
from corpus import corpus, scene

from deconvnet.data.imageio import BadImage, check_size, decode_image

CASES = corpus()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_file_gets_the_right_outcome(name):
    data, status, expect = CASES[name]
    if status == "ok":
        img = decode_image(data)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[:2] == tuple(expect)
    else:
        with pytest.raises(BadImage, match=expect):
            decode_image(data)


def test_exif_rotation_is_applied_not_just_the_size():
    data, _, _ = CASES["ok/exif_rotated.jpg"]
    upright = decode_image(data)
    original = scene(40, 64)
    # Orientation 6 means the stored pixels must be turned 90 degrees clockwise.
    expected = np.rot90(original, k=-1)
    assert np.abs(upright.astype(int) - expected.astype(int)).mean() < 12


def test_16_bit_is_scaled_not_clipped():
    img = decode_image(CASES["ok/gray16.png"][0])
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255 and 100 < img[24, 32, 0] < 160


def test_rgba_transparency_composites_on_white():
    from io import BytesIO

    from PIL import Image
    buf = BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, "PNG")
    assert decode_image(buf.getvalue())[0, 0].tolist() == [255, 255, 255]


def test_size_limits():
    with pytest.raises(BadImage, match="longest side"):
        check_size(50_000, 10)
    with pytest.raises(BadImage, match="pixels"):
        check_size(20_000, 20_000)
    check_size(4000, 3000)
