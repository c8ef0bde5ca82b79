"""jobs/export_labels.py: the segment job's labels as Label Studio tasks, CVAT
zips and Hugging Face Parquet, each checked by the tool that reads it
(label-studio-sdk's RLE decoder and datumaro in venvs of their own, see
toolvenv.py; `datasets` in this one) and compared pixel for pixel with the
masks. The headline test exports a real run on the moto S3 endpoint; the
others use hand-made outputs to pin the filters, the manifest and the failures.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tinymodels import varied_model
from toolvenv import run_tool

from deconvnet import storage
from deconvnet.data import synthetic
from deconvnet.data.voc import decode_label_png, encode_label_png
from jobs import export_labels, segment_dataset
from pipeline import layout, rows
from pipeline.export.labelstudio import encode_rle
from pipeline.export.selection import Filters, select
from pipeline.predictions.parts import iter_rows, latest_rows, read_predictions
from pipeline.predictions.writer import PredictionWriter

# Each case's tasks decoded by the SDK: a dict {image URL: (H, W) class ids}, painted
# from the brush results (0 where none is), in an .npz the test reads back.
LS_DECODE = """
import json, sys, numpy as np
from label_studio_sdk.converter.brush import decode_rle
names = json.load(open(sys.argv[2]))
out = {}
for path in sys.argv[3:]:
    for task in json.load(open(path)):
        (pred,) = task["predictions"]
        labels = None
        for r in pred["result"]:
            h, w = r["original_height"], r["original_width"]
            rgba = decode_rle(r["value"]["rle"]).reshape(h, w, 4)
            assert (rgba == rgba[..., :1]).all() and set(np.unique(rgba)) <= {0, 255}
            labels = np.zeros((h, w), np.uint8) if labels is None else labels
            assert not labels[rgba[..., 3] > 0].any(), "brush layers overlap"
            labels[rgba[..., 3] > 0] = names.index(r["value"]["brushlabels"][0])
        out[str(len(out))] = labels if labels is not None else np.zeros((0, 0), np.uint8)
        print(task["data"]["image"], pred["score"])
np.savez(sys.argv[1], **out)
"""
# Datumaro's import of each extracted CVAT zip: <folder>/dm.npz, {item id: (H, W) label index} and the label names.
DATUMARO_IMPORT = """
import sys, numpy as np
import datumaro as dm
for folder in sys.argv[1:]:
    ds = dm.Dataset.import_from(folder, "voc_segmentation")
    names = [c.name for c in ds.categories()[dm.AnnotationType.label]]
    out = {}
    for item in ds:
        masks = [a for a in item.annotations if a.type == dm.AnnotationType.mask]
        labels = np.full(masks[0].image.shape, 255, np.uint8)  # 255: no mask covers it
        for a in masks:
            labels[a.image.astype(bool)] = a.label
        out[item.id.replace("/", "|")] = labels
    np.savez(folder + "/dm.npz", names=np.array(names), **out)
"""


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _download(uri: str, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_bytes(storage.read_bytes(uri))
    return to


def _masks(labels: str) -> dict[str, np.ndarray]:
    """{image URI: its mask} of every image's latest ok row."""
    table = read_predictions(labels, ["image_uri", "mask_uri", "status", "run_id"])
    return {r["image_uri"]: decode_label_png(storage.read_bytes(r["mask_uri"]))
            for r in iter_rows(latest_rows(table)) if r["status"] == "ok"}


def check_label_studio(to: str, tmp: Path, names: list[str]) -> dict[str, np.ndarray]:
    """{image URL: the mask label-studio-sdk decodes from the tasks}, every task's
    fields as Label Studio wants them."""
    manifest = json.loads(storage.read_bytes(storage.join(to, "manifest.json")))
    paths = [str(_download(storage.join(to, s["file"]), tmp / s["file"])) for s in manifest["shards"]]
    tasks = [t for p in paths for t in json.loads(Path(p).read_text())]
    for t in tasks:
        for r in t["predictions"][0]["result"]:
            assert r["type"] == "brushlabels" and r["from_name"] == "tag" and r["to_name"] == "image"
            assert r["value"]["format"] == "rle"
    (tmp / "names.json").write_text(json.dumps(names))
    printed = run_tool("label-studio-sdk", LS_DECODE, str(tmp / "ls.npz"), str(tmp / "names.json"), *paths)
    decoded = _read_npz(tmp / "ls.npz")
    urls = [line.split()[0] for line in printed.splitlines()]
    assert urls == [t["data"]["image"] for t in tasks]
    assert "<BrushLabels name=\"tag\" toName=\"image\">" in storage.read_bytes(
        storage.join(to, "label_config.xml")).decode()
    return {u: decoded[str(i)] for i, u in enumerate(urls)}


def check_cvat(to: str, tmp: Path, names: list[str]) -> dict[str, np.ndarray]:
    """{image id: the mask Datumaro imports from each zip}, in our class ids."""
    manifest = json.loads(storage.read_bytes(storage.join(to, "manifest.json")))
    folders = []
    for s in manifest["shards"]:
        folders.append(tmp / s["file"].replace(".zip", ""))
        with zipfile.ZipFile(io.BytesIO(storage.read_bytes(storage.join(to, s["file"])))) as z:
            assert {"labelmap.txt", "ImageSets/Segmentation/default.txt"} <= set(z.namelist())
            z.extractall(folders[-1])
    run_tool("datumaro", DATUMARO_IMPORT, *map(str, folders))
    out = {}
    for folder in folders:
        got = _read_npz(folder / "dm.npz")
        dm_names = got.pop("names").tolist()
        to_ours = np.array([names.index(n) for n in dm_names] + [255] * (256 - len(dm_names)), np.uint8)
        out.update({k.replace("|", "/"): to_ours[v] for k, v in got.items()})
    return out


def check_huggingface(to: str, tmp: Path) -> tuple[list[dict], dict]:
    """The rows `datasets` loads from the Parquet shards, and id2label.json."""
    import datasets

    manifest = json.loads(storage.read_bytes(storage.join(to, "manifest.json")))
    for s in manifest["shards"]:
        _download(storage.join(to, s["file"]), tmp / s["file"])
    ds = datasets.load_dataset("parquet", data_files=str(tmp / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp / "cache"))
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.Image)
    id2label = json.loads(storage.read_bytes(storage.join(to, "id2label.json")))
    return list(ds), id2label


# ------------------------------------------------------ a real run on S3, three formats

@pytest.fixture(scope="module")
def labelled(ray_session, s3_endpoint):
    """Generated scenes labelled by the segment job on the moto endpoint, by a
    tiny model whose labels vary over the image."""
    import s3fs

    bucket = "s3://export-flow"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket[5:])
    synthetic.generate(f"{bucket}/synth", images=5, seed=4, size=64)
    varied_model(f"{bucket}/model", f"{bucket}/synth")
    out = f"{bucket}/labels"
    assert segment_dataset.main(["--input", f"{bucket}/synth/JPEGImages", "--output", out,
                                 "--model", f"{bucket}/model",
                                 "--crf", "none", "--max-proposals", "2", "--batch-size", "8",
                                 "--images-per-batch", "4"]) == 0
    return {"bucket": bucket, "labels": out, "masks": _masks(out)}


def test_a_real_run_exports_to_all_three_formats(labelled, tmp_path):
    labels, masks, bucket = labelled["labels"], labelled["masks"], labelled["bucket"]
    assert len(masks) == 5
    assert len({k for m in masks.values() for k in np.unique(m).tolist()}) >= 2, "one class: a weak comparison"
    prefix = f"{bucket}/synth/"
    for fmt in ("label-studio", "cvat", "huggingface"):
        argv = ["--labels", labels, "--format", fmt, "--to", f"{bucket}/export/{fmt}", "--shard-size", "2"]
        assert export_labels.main([*argv, "--image-url-prefix", f"{prefix}=https://images.example/"]) == 0
    manifest = json.loads(storage.read_bytes(f"{bucket}/export/cvat/manifest.json"))
    names = manifest["classes"]
    assert manifest["classes_from"] == "model" and manifest["counts"] == {
        "labelled": 5, "selected": 5, "exported": 5, "errors": 0}
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1] and manifest["errors"] == []
    run_ids = {r["run_id"] for r in iter_rows(read_predictions(labels, ["run_id"]))}
    assert manifest["labelling_runs"] == sorted(run_ids) and len(manifest["model_id"]) > 8

    decoded = check_label_studio(f"{bucket}/export/label-studio", tmp_path / "ls", names)
    assert decoded.keys() == {u.replace(prefix, "https://images.example/") for u in masks}
    for uri, mask in masks.items():
        got = decoded[uri.replace(prefix, "https://images.example/")]
        if got.size == 0:  # no class but background: no brush result
            assert not mask.any()
        else:
            np.testing.assert_array_equal(got, mask, err_msg=uri)

    imported = check_cvat(f"{bucket}/export/cvat", tmp_path / "cvat", names)
    ids = {layout.relative_key(u, f"{prefix}JPEGImages").rsplit(".", 1)[0]: m for u, m in masks.items()}
    assert imported.keys() == ids.keys()
    for i, mask in ids.items():
        np.testing.assert_array_equal(imported[i], mask, err_msg=i)

    hf_rows, id2label = check_huggingface(f"{bucket}/export/huggingface", tmp_path / "hf")
    assert id2label == {str(k): n for k, n in enumerate(names)}
    assert [r["image_uri"] for r in hf_rows] == sorted(masks)
    for r in hf_rows:
        np.testing.assert_array_equal(np.array(r["label"]), masks[r["image_uri"]], err_msg=r["image_uri"])
        assert r["image"].size == masks[r["image_uri"]].shape[::-1]
        original = storage.read_bytes(r["image_uri"])
        from deconvnet.data.imageio import decode_image
        np.testing.assert_array_equal(np.array(r["image"].convert("RGB")), decode_image(original))


# ------------------------------------------------------------- hand-made outputs

RUN = "20260101T000000Z-aaaaaa"


def _output(base: str, masks: dict[str, np.ndarray], confidence: dict[str, float], model_id: str = "m1",
            run_id: str = RUN, num_classes: int = 4) -> None:
    """What a segment run leaves: masks/<rel>.png and one Parquet part of rows."""
    writer = PredictionWriter(base, run_id, rows_per_part=1000)
    names = ["background", "aeroplane", "bicycle", "bird"]
    for rel, labels in masks.items():
        mask = layout.mask_uri(base, rel)
        storage.write_bytes(mask, encode_label_png(labels))
        pixels = np.bincount(labels.ravel(), minlength=num_classes)
        writer.add(pa.Table.from_pylist([{
            "image_uri": f"s3://in/{rel}", "mask_uri": mask, "overlay_uri": "", "status": "ok", "error": "",
            "permanent": False, "width": labels.shape[1], "height": labels.shape[0],
            "classes": [names[k] for k in np.flatnonzero(pixels)], "class_pixels": pixels.tolist(),
            "mean_confidence": confidence[rel], "num_proposals": 1, "source_size": 1, "source_version": "1",
            "model_id": model_id, "run_id": run_id, "seconds": 0.0}], schema=rows.SCHEMA))
    writer.flush()


def _scene(k: int) -> np.ndarray:
    """A 7 x 9 mask with background and class k (1..3) in a block that moves with k."""
    labels = np.zeros((7, 9), np.uint8)
    labels[k:k + 3, 2 * k:2 * k + 4] = k
    return labels


@pytest.fixture
def handmade(tmp_path):
    base = str(tmp_path / "labels")
    masks = {f"a/{i}.jpg": _scene(1 + i % 3) for i in range(6)}
    _output(base, masks, {f"a/{i}.jpg": c for i, c in enumerate([0.9, 0.5, 0.7, 0.2, 0.95, 0.6])})
    return base, masks


def _manifest(to: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(to, "manifest.json")))


def _tasks(to: str) -> list[dict]:
    return [t for s in _manifest(to)["shards"] for t in json.loads(storage.read_bytes(storage.join(to, s["file"])))]


def test_filters_and_the_review_queue(handmade, tmp_path):
    base, _ = handmade
    to = str(tmp_path / "ls")
    common = ["--labels", base, "--format", "label-studio", "--to", to]
    assert export_labels.main([*common, "--review-first", "3"]) == 0
    assert [t["data"]["image"] for t in _tasks(to)] == ["s3://in/a/3.jpg", "s3://in/a/1.jpg", "s3://in/a/5.jpg"]
    assert [t["predictions"][0]["score"] for t in _tasks(to)] == [0.2, 0.5, 0.6]
    assert _manifest(to)["filters"]["order"] == "mean_confidence ascending"
    assert export_labels.main([*common, "--classes", "bicycle,bird", "--min-confidence", "0.6"]) == 0
    # 1, 2, 4, 5 hold bicycle or bird (class 2 or 3); of those 2 (0.7), 4 (0.95), 5 (0.6) are >= 0.6.
    assert [t["data"]["image"] for t in _tasks(to)] == ["s3://in/a/2.jpg", "s3://in/a/4.jpg", "s3://in/a/5.jpg"]
    assert export_labels.main([*common, "--max-confidence", "0.7", "--limit", "2",
                               "--image-url-prefix", "s3://in/=https://h/"]) == 0
    assert [t["data"]["image"] for t in _tasks(to)] == ["https://h/a/1.jpg", "https://h/a/2.jpg"]
    assert _manifest(to)["counts"] == {"labelled": 6, "selected": 2, "exported": 2, "errors": 0}


def test_the_selection_streams_in_bounded_batches(tmp_path):
    """Batches of 2 rows over 12 images and three runs: the review queue, the
    filters and --limit give what a read of every row gives; a later error row
    leaves the ok row before it; a second model's masks need `model_id`."""
    base = str(tmp_path / "labels")
    masks = {f"b/{i:02d}.jpg": _scene(1 + i % 3) for i in range(12)}
    conf = dict(zip(masks, (np.random.default_rng(1).permutation(12) + 1) / 13))
    _output(base, masks, conf)
    writer = PredictionWriter(base, "20260102T000000Z-bbbbbb", rows_per_part=1000)
    writer.add(pa.Table.from_pylist([{"image_uri": "s3://in/b/00.jpg", "mask_uri": "", "status": "error",
                                      "error": "boom", "model_id": "m1", "run_id": "20260102T000000Z-bbbbbb"}],
                                    schema=rows.SCHEMA))
    writer.flush()

    def uris(filters, shard_size=5):
        with select(base, filters, batch_rows=2) as sel:
            shards = list(sel.shards(shard_size))
            assert all(len(s) == shard_size for s in shards[:-1]) and sel.selected == sum(map(len, shards))
            assert sel.labelled == 12 and sel.run_ids == [RUN]
            return [r["image_uri"] for s in shards for r in s]

    everything = uris(Filters())
    assert sorted(everything) == sorted(f"s3://in/{k}" for k in masks) and uris(Filters(), 3) == everything
    by_conf = sorted(masks, key=conf.get)
    assert uris(Filters(review_first=4)) == [f"s3://in/{k}" for k in by_conf[:4]]
    assert uris(Filters(review_first=4, limit=2)) == [f"s3://in/{k}" for k in by_conf[:2]]
    low = [u for u in everything if conf[u[len("s3://in/"):]] <= 0.5]
    assert uris(Filters(max_confidence=0.5, limit=3)) == low[:3]
    bird = [u for u in everything if masks[u[len("s3://in/"):]].max() == 3]
    assert uris(Filters(classes=("bird",))) == bird and len(bird) == 4

    _output(base, {"b/01.jpg": _scene(1)}, {"b/01.jpg": 0.5}, model_id="m2", run_id="20260103T000000Z-cccccc")
    with pytest.raises(ValueError, match=r"holds masks of 2 models: m1 \(11 images\), m2 \(1 images\)"):
        uris(Filters())
    with select(base, Filters(model_id="m2"), batch_rows=2) as sel:
        assert [r["image_uri"] for s in sel.shards(5) for r in s] == ["s3://in/b/01.jpg"] and sel.labelled == 1


def test_rle_matches_label_studio_sdk(tmp_path):
    """Masks of every run-length class (1, < 8, < 16, < 256, > 2**16 values) and
    empty/full ones: the SDK decodes ours to the mask, and its own encoder
    writes the same bytes."""
    rng = np.random.default_rng(0)
    cases = [rng.random((20, 30)) < 0.1, rng.random((3, 5)) < 0.5, np.zeros((4, 4), bool), np.ones((300, 300), bool)]
    big = np.zeros((200, 400), bool)
    big[50:150, 30:300] = True
    big[0, 0] = True
    cases.append(big)
    (tmp_path / "cases.json").write_text(json.dumps(
        [{"shape": list(m.shape), "mask": m.ravel().astype(int).tolist(), "rle": encode_rle(m)} for m in cases]))
    printed = run_tool("label-studio-sdk", """
import json, sys, numpy as np
from label_studio_sdk.converter.brush import decode_rle, encode_rle
for case in json.load(open(sys.argv[1])):
    h, w = case["shape"]
    mask = np.array(case["mask"], bool).reshape(h, w)
    assert (decode_rle(case["rle"]).reshape(h, w, 4) == mask[..., None] * 255).all()
    assert encode_rle(np.repeat(mask.ravel().astype(np.uint8) * 255, 4)) == case["rle"]
print("ok", len(json.load(open(sys.argv[1]))))
""", str(tmp_path / "cases.json"))
    assert printed.strip() == f"ok {len(cases)}"


def test_a_missing_mask_is_an_error_entry_not_a_silent_gap(handmade, tmp_path, capsys):
    base, masks = handmade
    storage.remove(layout.mask_uri(base, "a/2.jpg"))
    to = str(tmp_path / "hf")
    assert export_labels.main(["--labels", base, "--format", "cvat", "--to", to, "--shard-size", "4"]) == 1
    err = capsys.readouterr().err
    assert "1 images left out" in err and "s3://in/a/2.jpg" in err and len(err.strip().splitlines()) == 1
    manifest = _manifest(to)
    assert manifest["counts"] == {"labelled": 6, "selected": 6, "exported": 5, "errors": 1}
    assert manifest["errors"][0]["image_uri"] == "s3://in/a/2.jpg" and "missing" in manifest["errors"][0]["error"]
    with zipfile.ZipFile(storage.join(to, "masks-00000.zip")) as z:
        assert z.read("ImageSets/Segmentation/default.txt").decode().split() == ["a/0", "a/1", "a/3"]


def test_a_rerun_replaces_the_export_whole(handmade, tmp_path):
    base, _ = handmade
    to = str(tmp_path / "ex")
    assert export_labels.main(["--labels", base, "--format", "cvat", "--to", to, "--shard-size", "2"]) == 0
    assert len(_manifest(to)["shards"]) == 3
    (tmp_path / "ex" / "data").mkdir()
    (tmp_path / "ex" / "data" / "train-00009-of-00010.parquet").write_bytes(b"left by a run that broke off")
    (tmp_path / "ex" / "notes.txt").write_text("not the export's: kept")
    assert export_labels.main(["--labels", base, "--format", "label-studio", "--to", to, "--limit", "1"]) == 0
    files = sorted(str(p.relative_to(to)) for p in Path(to).rglob("*") if p.is_file())
    assert files == ["label_config.xml", "manifest.json", "notes.txt", "tasks-00000.json"]


@pytest.mark.parametrize("argv, message", [
    (["--labels", "{tmp}/nothing-here"], "--labels: no labelled images in"),
    (["--labels", "{base}", "--classes", "unicorn"], "--classes: not classes of model m1: unicorn"),
    (["--labels", "{base}", "--min-confidence", "0.8", "--max-confidence", "0.2"],
     "--min-confidence 0.8 is above --max-confidence 0.2"),
    (["--labels", "{base}", "--image-url-prefix", "s3://x/"], "--image-url-prefix: must be OLD=NEW"),
    (["--labels", "{base}", "--review-first", "0"], "--review-first must be >= 1"),
])
def test_a_bad_argument_is_one_line_and_exit_2(handmade, tmp_path, capsys, argv, message):
    base, _ = handmade
    to = str(tmp_path / "out")
    argv = [a.format(tmp=tmp_path, base=base) for a in argv]
    with pytest.raises(SystemExit) as e:
        export_labels.main([*argv, "--format", "cvat", "--to", to])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last, last
    assert not Path(to).exists()  # nothing written
