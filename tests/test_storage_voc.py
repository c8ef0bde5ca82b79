"""The storage layer (local, memory and a real S3 endpoint) and VOC label PNGs."""

import threading
import time

import numpy as np
import pytest

from deconvnet import storage
from deconvnet.data.voc import VOC_CLASSES, colorize, decode_label_png, encode_label_png, overlay, voc_palette


@pytest.fixture(params=["local", "memory", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    if request.param == "memory":
        return f"memory://t-{tmp_path.name}"
    return request.getfixturevalue("s3_bucket")


def test_write_read_list(base):
    storage.write_bytes(storage.join(base, "a/b/x.jpg"), b"1")
    storage.write_bytes(storage.join(base, "a/y.PNG"), b"22")
    storage.write_bytes(storage.join(base, "a/z.txt"), b"333")
    assert storage.read_bytes(storage.join(base, "a/y.PNG")) == b"22"
    files = storage.list_files(storage.join(base, "a"), suffixes=[".jpg", ".png"])
    assert files == [storage.join(base, "a/b/x.jpg"), storage.join(base, "a/y.PNG")]
    assert storage.list_files(storage.join(base, "a/z.txt")) == [storage.join(base, "a/z.txt")]
    assert storage.exists(storage.join(base, "a/z.txt"))


def test_missing_is_file_not_found_with_the_uri(base):
    uri = storage.join(base, "missing/file.jpg")
    with pytest.raises(FileNotFoundError, match="missing/file.jpg"):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError):
        storage.list_files(storage.join(base, "missing"))


def test_s3_endpoint_comes_from_the_environment(s3_bucket, s3_endpoint):
    fs, path = storage.url_to_fs(s3_bucket + "/k")
    assert fs.endpoint_url == s3_endpoint and path == s3_bucket[len("s3://"):] + "/k"


def test_s3_objects_get_the_content_type_of_their_extension(s3_bucket):
    for name, kind in (("index.html", "text/html"), ("m/a.png", "image/png"), ("o/a b.JPG", "image/jpeg")):
        uri = storage.join(s3_bucket, name)
        storage.write_bytes(uri, b"x")
        fs, path = storage.url_to_fs(uri)
        assert fs.info(path)["ContentType"] == kind


def test_concurrent_reads_keep_order_hold_few_results_and_raise_in_turn():
    lock, state = threading.Lock(), {"running": 0, "peak": 0, "started": 0}

    def read(i: int) -> int:
        with lock:
            state["running"] += 1
            state["started"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(0.005)
        with lock:
            state["running"] -= 1
        if i == 7:
            raise FileNotFoundError(f"item {i}")
        return i * i

    assert list(storage.read_concurrently(read, list(range(7)), threads=3)) == [i * i for i in range(7)]
    assert 1 < state["peak"] <= 3
    state["started"] = 0
    results = storage.read_concurrently(read, list(range(100)), threads=3)
    assert next(results) == 0
    time.sleep(0.05)
    assert state["started"] <= 2 * 3 + 1  # reads run ahead of the consumer by a few, not by all 100
    with pytest.raises(FileNotFoundError, match="item 7"):
        list(results)
    assert state["started"] < 100  # the items after the failure were dropped, not read
    assert list(storage.read_concurrently(read, [])) == [] and list(storage.read_concurrently(read, [2])) == [4]


def test_redact_hides_secrets_but_keeps_endpoint():
    r = storage.redact({"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://h",
                        "client_kwargs": {"aws_session_token": "tok"}})
    assert r == {"key": "***", "secret": "***", "endpoint_url": "http://h",
                 "client_kwargs": {"aws_session_token": "***"}}


def test_parse_storage_option():
    assert storage.parse_storage_option("anon=true") == ("anon", True)
    assert storage.parse_storage_option("endpoint_url=http://x:1") == ("endpoint_url", "http://x:1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        storage.parse_storage_option("novalue")


def test_voc_palette_matches_the_dataset():
    p = voc_palette()
    assert len(VOC_CLASSES) == 21
    assert p[0].tolist() == [0, 0, 0] and p[1].tolist() == [128, 0, 0]
    assert p[15].tolist() == [192, 128, 128]  # person
    assert p[255].tolist() == [224, 224, 192]  # ignore border


def test_label_png_round_trip_keeps_ids_and_palette():
    labels = np.random.default_rng(0).integers(0, 21, (37, 53)).astype(np.uint8)
    labels[0, 0] = 255
    data = encode_label_png(labels)
    assert np.array_equal(decode_label_png(data), labels)
    from io import BytesIO

    from PIL import Image
    img = Image.open(BytesIO(data))
    assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]
    assert colorize(labels)[0, 0].tolist() == [224, 224, 192]


def test_overlay_keeps_background_pixels():
    img = np.full((4, 4, 3), 100, np.uint8)
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 1
    out = overlay(img, labels, alpha=0.5)
    assert out[1, 1].tolist() == [100, 100, 100]
    assert out[0, 0].tolist() == [114, 50, 50]
