"""The segment job end to end: a real S3 endpoint (moto server on 127.0.0.1),
embedded Ray, the tiny model, and the bad-file corpus."""

from __future__ import annotations

import re
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpus import corpus

from deconvnet import storage
from deconvnet.records import read_json
from deconvnet.data.voc import decode_label_png
from pipeline.job import run
from pipeline.layout import relative_key
from pipeline.predictions.parts import iter_rows, read_predictions
from jobs import segment_dataset


CORPUS = corpus()
FAST = ["--max-proposals", "3", "--batch-size", "8", "--images-per-batch", "4"]


def upload(base: str, files: dict[str, tuple[bytes, str, object]], prefix: str = "images/2026/") -> str:
    for name, (data, _, _) in files.items():
        storage.write_bytes(storage.join(base, prefix, name), data)
    return storage.join(base, prefix)


def predictions(output: str) -> list[dict]:
    """Every row under predictions/ (none when no part was written yet)."""
    return list(iter_rows(read_predictions(output)))


def run_records(output: str) -> list[dict]:
    """Every runs/<run_id>.json under `output`, in run order (none before the first run)."""
    try:
        uris = storage.list_files(storage.join(output, "runs"), [".json"])
    except FileNotFoundError:
        return []
    return [read_json(u) for u in uris]


def test_s3_end_to_end_with_bad_files_then_incremental(ray_session, s3_bucket, tiny_model):
    images = upload(s3_bucket, CORPUS)
    output = storage.join(s3_bucket, "labels")
    assert segment_dataset.main(["--input", images, "--output", output, "--model", tiny_model,
                                 "--overlays", "--gallery", *FAST]) == 0
    rows = predictions(output)
    by_uri = {r["image_uri"]: r for r in rows}
    assert len(rows) == len(by_uri) == len(CORPUS)  # exactly one row per input
    for name, (_, status, expect) in CORPUS.items():
        r = by_uri[storage.join(images, name)]
        assert r["status"] == status, (name, r["error"])
        if status == "ok":
            mask = decode_label_png(storage.read_bytes(r["mask_uri"]))
            assert mask.shape == tuple(expect) == (r["height"], r["width"])
            assert r["mask_uri"] == storage.join(output, "masks", name.rsplit(".", 1)[0] + ".png")
            assert storage.exists(r["overlay_uri"])
            assert sum(r["class_pixels"]) == mask.size and len(r["class_pixels"]) == 21
            assert r["classes"] and 0 < r["mean_confidence"] <= 1 and r["num_proposals"] >= 1
            assert 0 <= r["uncertainty"] <= 1
            assert r["model_id"].startswith("deconvnet-") and r["seconds"] > 0
        else:
            assert re.search(expect, r["error"]) and r["mask_uri"] == "" and r["permanent"]
    record = run_records(output)[0]
    assert record["status"] == "completed"
    fs, path = storage.url_to_fs(record["gallery_uri"])  # served from the bucket, it is a page
    assert record["gallery_uri"] == storage.join(output, "index.html") and fs.info(path)["ContentType"] == "text/html"
    assert record["counts"] == {"seen": len(CORPUS), "skipped": 0, "ok": 9, "error": 4}

    # A second run over the unchanged bucket segments nothing and adds no rows.
    second = run(segment_dataset.parse_config(["--input", images, "--output", output, "--model", tiny_model, *FAST]))
    assert second["counts"] == {"seen": len(CORPUS), "skipped": len(CORPUS), "ok": 0, "error": 0}
    assert len(predictions(output)) == len(CORPUS)

    # A new image and a changed one are labelled; nothing else.
    storage.write_bytes(storage.join(images, "new/extra.jpg"), CORPUS["ok/scene.jpg"][0])
    storage.write_bytes(storage.join(images, "ok/gray.jpg"), CORPUS["ok/scene.jpg"][0])
    third = run(segment_dataset.parse_config(["--input", images, "--output", output, "--model", tiny_model, *FAST]))
    assert third["counts"]["ok"] == 2 and third["counts"]["skipped"] == len(CORPUS) - 1


def test_a_run_in_segments_labels_every_image_once_with_limit_and_skip(ray_session, s3_bucket, tiny_model):
    images = upload(s3_bucket, CORPUS)
    output = storage.join(s3_bucket, "segmented")
    args = ["--input", images, "--output", output, "--model", tiny_model, "--crf", "none", *FAST]
    uris = [f.uri for f in storage.iter_files_detail(images)]
    first = run(segment_dataset.parse_config([*args, "--limit", "7", "--segment-images", "2"]))
    assert first["listing"]["segments"] >= 4 and first["counts"]["seen"] == 7  # S3 StartAfter, segment by segment
    assert sorted(r["image_uri"] for r in predictions(output)) == uris[:7]
    second = run(segment_dataset.parse_config([*args, "--segment-images", "3", "--gallery", "--gallery-size", "3"]))
    assert second["status"] == "completed" and second["listing"]["segments"] == 2  # 6 to do, 3 a segment
    status = {storage.join(images, name): st for name, (_, st, _) in CORPUS.items()}
    ok = sum(status[u] == "ok" for u in uris[7:])
    assert second["counts"] == {"seen": len(CORPUS), "skipped": 7, "ok": ok, "error": len(CORPUS) - 7 - ok}
    rows = predictions(output)
    assert sorted(r["image_uri"] for r in rows) == uris  # exactly one row per image over both runs
    assert {r["run_id"] for r in rows if r["image_uri"] in uris[7:]} == {second["run_id"]}
    assert len(rows) == sum(pq.read_metadata(storage.open_input(p)).num_rows
                            for p in first["prediction_parts"] + second["prediction_parts"])
    assert run(segment_dataset.parse_config([*args, "--segment-images", "2"]))["counts"]["skipped"] == len(CORPUS)


def test_local_paths_and_the_same_labels_twice(ray_session, tmp_path, tiny_model):
    files = {k: v for k, v in CORPUS.items() if k in ("ok/scene.jpg", "ok/photo.jpg", "bad/empty.jpg")}
    images = upload(str(tmp_path), files, prefix="in")
    out1, out2 = str(tmp_path / "out1"), str(tmp_path / "out2")
    for out in (out1, out2):
        assert segment_dataset.main(["--input", images, "--output", out, "--model", tiny_model,
                                     "--crf", "deeplab", *FAST]) == 0
    r1, r2 = predictions(out1), predictions(out2)
    assert len(r1) == 3 and sum(r["status"] == "ok" for r in r1) == 2
    for name in ("scene", "photo"):
        m1 = decode_label_png(storage.read_bytes(f"{out1}/masks/ok/{name}.png"))
        m2 = decode_label_png(storage.read_bytes(f"{out2}/masks/ok/{name}.png"))
        assert np.array_equal(m1, m2)
    assert {r["image_uri"]: r["class_pixels"] for r in r1} == {r["image_uri"]: r["class_pixels"] for r in r2}


@pytest.mark.parametrize("change", [["--crf", "deeplab"], ["--inference", "original"], ["--proposals", "whole"],
                                    ["--max-proposals", "2"]])
def test_a_changed_setting_flag_makes_every_image_to_do(tmp_path, tiny_model, change):
    """Each flag that changes masks changes the labelling key: after a run with
    the first settings, the listing skips every image with those and none with the
    change (the job end to end: the next test)."""
    from deconvnet.weights import read_model_info
    from pipeline.job import labelling_of
    from pipeline.listing import windows
    from pipeline.predictions.writer import PredictionWriter
    from test_outputs import prediction_rows

    files = {k: CORPUS[k] for k in ("ok/scene.jpg", "ok/exif_rotated.jpg")}
    images, out = upload(str(tmp_path), files, prefix="in"), str(tmp_path / "out")
    info = read_model_info(tiny_model)

    def todo(*flags: str) -> list[str]:
        cfg = segment_dataset.parse_config(["--input", images, "--output", out, "--model", tiny_model, *FAST, *flags])
        return [r["image_uri"] for w in windows(cfg, labelling_of(cfg, info)) for r in w.todo]

    cfg = segment_dataset.parse_config(["--input", images, "--output", out, "--model", tiny_model, *FAST])
    listed = storage.list_files_detail(images)
    writer = PredictionWriter(out, "20260101T000000Z-aaaaaa", 10)
    writer.add(prediction_rows([f.uri for f in listed], "20260101T000000Z-aaaaaa", info.model_id,
                               seen={f.uri: (f.size, f.version) for f in listed}, key=labelling_of(cfg, info).key))
    writer.flush()
    assert todo() == [] and todo(*change) == [f.uri for f in listed]


def test_a_change_of_settings_relabels_every_image_and_the_same_settings_nothing(ray_session, tmp_path, tiny_model):
    files = {k: CORPUS[k] for k in ("ok/scene.jpg", "ok/exif_rotated.jpg")}
    images, out = upload(str(tmp_path), files, prefix="in"), str(tmp_path / "out")
    base = ["--input", images, "--output", out, "--model", tiny_model, "--crf", "none", *FAST]  # --max-proposals 3
    first, changed, again = (run(segment_dataset.parse_config(args), log=lambda s: None)
                             for args in (base, [*base, "--max-proposals", "2"], [*base, "--max-proposals", "2"]))
    assert [(r["counts"]["ok"], r["counts"]["skipped"]) for r in (first, changed, again)] == [(2, 0), (2, 0), (0, 2)]
    keys = {r["run_id"]: r["labelling_key"] for r in (first, changed)}
    assert len(set(keys.values())) == 2 and again["labelling_key"] == changed["labelling_key"]
    assert all(r["labelling_key"] == keys[r["run_id"]] for r in predictions(out))


def test_single_file_input(ray_session, tmp_path, tiny_model):
    images = upload(str(tmp_path), {"ok/scene.jpg": CORPUS["ok/scene.jpg"]}, prefix="in")
    out = str(tmp_path / "out")
    assert segment_dataset.main(["--input", f"{images}/ok/scene.jpg", "--output", out, "--model", tiny_model,
                                 "--crf", "none", "--fail-on-error", *FAST]) == 0
    assert storage.exists(f"{out}/masks/scene.png")


def test_fail_on_error_exits_1(ray_session, tmp_path, tiny_model):
    images = upload(str(tmp_path), {"bad/empty.jpg": CORPUS["bad/empty.jpg"]}, prefix="in")
    assert segment_dataset.main(["--input", images, "--output", str(tmp_path / "o"), "--model", tiny_model,
                                 "--fail-on-error", *FAST]) == 1


def test_inference_original_runs_the_releases_rules(ray_session, tmp_path, tiny_model):
    """--inference original end to end: proposals as the release takes them (no
    whole-image box, boxes under 112 px skipped), the mode in the run's record."""
    from deconvnet.data.imageio import decode_image
    from deconvnet.inference import for_mode
    from deconvnet.inference.proposals import propose

    photo = CORPUS["ok/photo.jpg"]
    images = upload(str(tmp_path), {"ok/photo.jpg": photo}, prefix="in")
    out = str(tmp_path / "out")
    assert segment_dataset.main(["--input", images, "--output", out, "--model", tiny_model, "--inference", "original",
                                 "--max-proposals", "50", "--crf", "paper", "--fail-on-error"]) == 0
    (row,) = iter_rows(read_predictions(out))
    expected = propose(decode_image(photo[0]), for_mode("original").proposals)
    assert row["status"] == "ok" and row["num_proposals"] == len(expected)
    h, w = row["height"], row["width"]
    assert not any(np.array_equal(b, [0, 0, w, h]) for b in expected)
    assert all(min(b[2] - b[0], b[3] - b[1]) >= 112 for b in expected)
    (record,) = run_records(out)
    assert record["config"]["inference"] == "original"


def test_crf_device_gpu_runs_the_crf_in_the_segment_actor(ray_session, tmp_path):
    """--crf-device gpu: the torch CRF in the segment actor (its device is the CPU
    here: the same code path as on a GPU node), no refine stage; the masks are
    pydensecrf's in CPU tasks computing every label and step (--crf-exact, what
    the torch engine computes) up to float noise."""
    import ray
    import torch

    from deconvnet.model import PRESETS, DeconvNet
    from deconvnet.weights import ModelInfo, read_model_info, save_model_dir
    from pipeline.job import label, labelling_of

    torch.manual_seed(0)  # the tiny model with its weights x3: the CRF keeps a few labels, not one
    net = DeconvNet(PRESETS["tiny"])
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    tiny_model = str(tmp_path / "model")
    save_model_dir(net, tiny_model, ModelInfo(config=PRESETS["tiny"]))
    files = {k: v for k, v in CORPUS.items() if k in ("ok/scene.jpg", "ok/palette.png")}
    images = upload(str(tmp_path), files, prefix="in")
    out = {device: str(tmp_path / device) for device in ("cpu", "gpu")}
    argv = {device: ["--input", images, "--output", out[device], "--model", tiny_model, "--fail-on-error",
                     "--crf", "deeplab", *FAST] for device in out}
    assert segment_dataset.main([*argv["cpu"], "--crf-exact"]) == 0  # the default --crf-device cpu
    assert segment_dataset.main([*argv["gpu"], "--crf-device", "gpu"]) == 0
    for name in ("scene", "palette"):
        on_cpu, on_gpu = (decode_label_png(storage.read_bytes(f"{out[d]}/masks/ok/{name}.png")) for d in out)
        assert on_cpu.shape == on_gpu.shape and (on_cpu == on_gpu).mean() >= 0.999, name
        assert len(np.unique(on_cpu)) > 1, name  # a comparison of labels, not of one colour
    confidence = [{r["image_uri"]: r["mean_confidence"] for r in predictions(out[d])} for d in out]
    assert confidence[0] == pytest.approx(confidence[1], abs=1e-4)
    assert [r["config"]["crf_device"] for d in out for r in run_records(out[d])] == ["cpu", "gpu"]

    def stages(device: str) -> str:
        cfg = segment_dataset.parse_config([*argv[device], "--crf-device", device])
        info = read_model_info(tiny_model)
        return repr(label(ray.data.from_items([{"image_uri": "x"}]), cfg, info, labelling_of(cfg, info), "r"))

    assert "MapBatches(refine)" in stages("cpu") and "MapBatches(refine)" not in stages("gpu")
    assert "MapBatches(SegmentActor)" in stages("gpu")


def test_crf_device_is_checked_by_the_config():
    from pipeline.config import SegmentJobConfig

    assert SegmentJobConfig(input="in", output="out", model="m").crf_device == "cpu"
    with pytest.raises(ValueError, match="`crf_device` must be one of cpu, gpu, got 'cuda'"):
        SegmentJobConfig(input="in", output="out", model="m", crf_device="cuda")


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "--model: /nonexistent/model is not a model directory"),
    (["--crf", "fancy"], "invalid choice: 'fancy'"),
    (["--gpu-actors", "3-1"], "need 1 <= MIN <= MAX"),
    (["--proposals", "edgeboxes"], "needs a structured-edge model"),
    (["--input", "/nonexistent/images"], "--input: nothing at /nonexistent/images"),
    (["--storage-option", "novalue"], "KEY=VALUE"),
    (["--gallery-size", "0"], "--gallery-size must be >= 1, got 0"),
    (["--inference", "original", "--ensemble", "mean"],
     "--inference original: --ensemble: inference 'original' uses 'relu-product'"),
    (["--inference", "paper"], "invalid choice: 'paper'"),
    (["--gallery-size", "5"], "--gallery-size needs --gallery"),
    (["--crf-device", "cuda"], "invalid choice: 'cuda'"),
    (["--crf-device", "gpu", "--crf-cpus", "4"], "--crf-cpus sets how many CRF tasks run at once; with --crf-device "
                                                 "'gpu' the CRF runs in the segment actor and there are none"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, tiny_model, args, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(CORPUS["ok/scene.jpg"][0])
    base = {"--input": str(tmp_path / "in"), "--output": str(tmp_path / "out"), "--model": tiny_model}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv]
    r = subprocess.run([sys.executable, "jobs/segment_dataset.py", *argv], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("damage, message", [
    ("config", "does not match"), ("truncate", "corrupt or truncated safetensors"),
])
def test_a_broken_model_dir_fails_before_any_image(tmp_path, tiny_model, damage, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if damage == "config":
        c = json.loads((model / "config.json").read_text())
        c["architecture"]["fc_dim"] = 32
        (model / "config.json").write_text(json.dumps(c))
    else:
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(CORPUS["ok/scene.jpg"][0])
    r = subprocess.run([sys.executable, "jobs/segment_dataset.py", "--input", str(tmp_path / "in"),
                        "--output", str(tmp_path / "out"), "--model", str(model)], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri, expect", [
    ("s3://b/in/a/b.jpg", "a/b.jpg"),
    ("s3://b/in/../../etc/passwd.jpg", "etc/passwd-"),
    ("s3://b/in//abs/x y ü.jpg", "abs/x y ü.jpg"),
])
def test_relative_keys_never_leave_the_output(uri, expect):
    rel = relative_key(uri, "s3://b/in")
    assert rel.startswith(expect) and ".." not in rel.split("/") and not rel.startswith("/")
