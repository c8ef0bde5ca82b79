"""The synthetic VOC-layout dataset: layout, label consistency, determinism, S3, CLI."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deconvnet import storage
from deconvnet.data.synthetic import border_band, class_appearance, generate, image_id, main, parse_size, sample
from deconvnet.data.voc import IGNORE_INDEX, decode_label_png


def _read_split(root: str, split: str) -> list[str]:
    return storage.read_bytes(storage.join(root, "ImageSets/Segmentation", f"{split}.txt")).decode().split()


def _check_dataset(root: str, images: int, classes: int, height: int, width: int) -> None:
    train, val, trainval = (_read_split(root, s) for s in ("train", "val", "trainval"))
    assert trainval == [image_id(i) for i in range(images)]
    assert sorted(train + val) == trainval and not set(train) & set(val)
    for name in trainval:
        jpg = Image.open(io.BytesIO(storage.read_bytes(storage.join(root, "JPEGImages", f"{name}.jpg"))))
        assert jpg.format == "JPEG" and jpg.mode == "RGB" and jpg.size == (width, height)
        cls = decode_label_png(storage.read_bytes(storage.join(root, "SegmentationClass", f"{name}.png")))
        obj = decode_label_png(storage.read_bytes(storage.join(root, "SegmentationObject", f"{name}.png")))
        assert cls.shape == obj.shape == (height, width)
        assert set(np.unique(cls)) <= set(range(classes + 1)) | {IGNORE_INDEX}
        # Borders agree, background agrees, and each instance has exactly one class.
        np.testing.assert_array_equal(cls == IGNORE_INDEX, obj == IGNORE_INDEX)
        np.testing.assert_array_equal(cls == 0, obj == 0)
        ids = sorted(set(np.unique(obj)) - {0, IGNORE_INDEX})
        assert ids == list(range(1, len(ids) + 1)) and 1 <= len(ids) <= 4
        for i in ids:
            assert len(np.unique(cls[obj == i])) == 1 and cls[obj == i][0] != 0


def test_local_layout_and_labels(tmp_path):
    summary = generate(str(tmp_path), images=6, seed=3, size=(64, 96), classes=5)
    assert summary["num_classes"] == 6 and summary["class_names"][1] == "aeroplane"
    assert (summary["train"], summary["val"], summary["height"], summary["width"]) == (4, 2, 64, 96)
    _check_dataset(str(tmp_path), 6, 5, 64, 96)


def test_s3(s3_bucket):
    root = storage.join(s3_bucket, "synth")
    generate(root, images=3, seed=0, size=64)
    _check_dataset(root, 3, 4, 64, 64)


def test_same_seed_same_bytes_other_seed_differs():
    def files(seed: int) -> dict[str, bytes]:
        root = f"memory://synth-{seed}-{np.random.default_rng().integers(1 << 30)}"
        generate(root, images=3, seed=seed, size=64)
        return {u[len(root):]: storage.read_bytes(u) for u in storage.list_files(root)}

    a, b, c = files(7), files(7), files(8)
    assert len(a) == 3 * 3 + 3 and a == b
    assert a.keys() == c.keys() and a["/JPEGImages/2026_000001.jpg"] != c["/JPEGImages/2026_000001.jpg"]


def test_objects_are_large_and_classes_distinct():
    classes = 20
    appearances = {class_appearance(k, classes)[:2] for k in range(1, classes + 1)}
    assert len(appearances) == classes  # every (shape, texture) pair is used once
    fg = []
    for i in range(20):
        s = sample(np.random.default_rng([0, i]), 96, 96)
        assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
        fg.append(np.isin(s.classes, list(range(1, 5))).mean())
    assert 0.1 < np.mean(fg) < 0.6  # objects are a sizeable share of the image


def test_border_band_straddles_edges():
    inst = np.zeros((8, 8), dtype=np.uint8)
    inst[2:6, 2:6] = 1
    band = border_band(inst, radius=1)
    assert band[2, 2] and band[1, 3] and not band[3, 3] and not band[0, 0]
    assert band.sum() == 6 * 6 - 2 * 2  # one pixel each side of the square's outline


def test_parse_size():
    assert parse_size("256") == (256, 256)
    assert parse_size("320x240") == (240, 320)
    with pytest.raises(ValueError):
        parse_size("big")


def test_cli_writes_and_prints_summary(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--images", "2", "--seed", "1", "--size", "64"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert len(_read_split(str(tmp_path), "trainval")) == 2


@pytest.mark.parametrize("argv", [["--images", "0"], ["--size", "10x10"], ["--classes", "21"],
                                  ["--val-fraction", "1.5"], ["--seed", "-1"]])
def test_cli_bad_argument_exits_2(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--images", "1", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_cli_subprocess_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deconvnet.data.synthetic", "--out", str(tmp_path),
                        "--images", "3", "--size", "abc"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("python -m deconvnet.data.synthetic: error: --size")
