"""jobs/evaluate.py: the segment job's masks scored against VOC-layout ground truth.

The headline test runs the three jobs as a user would, on a moto S3 bucket:
jobs/train.py trains a tiny model for 2 steps (its val evaluation uses 3 grid
proposals), jobs/segment_dataset.py labels every generated image with those
proposals and `--crf none`, and evaluate.py must score exactly the val IoU
table the training job reported, every class's IoU and pixel count. The other
tests use hand-made outputs (real Parquet parts and palette PNGs) to pin the
arithmetic and the failure modes.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deconvnet import storage
from deconvnet.data import synthetic
from deconvnet.data.voc import encode_label_png
from jobs import evaluate, segment_dataset
from tinymodels import varied_model
from pipeline import layout, rows
from pipeline.predictions.writer import PredictionWriter

ROOT = Path(__file__).resolve().parents[1]
PROPOSALS = ["--proposals", "grid"]  # the training job's default for its val evaluation
MAX_PROPOSALS = "3"  # val: 3 grid boxes + the whole image, in both jobs


# ------------------------------------------------ train -> segment -> evaluate

@pytest.fixture(scope="module")
def trained(train_job_by_value, s3_endpoint):
    """A bucket with generated data and a 2-step tiny training run (from a model
    whose labels vary) that evaluates on val and exports."""
    import s3fs

    bucket = "s3://eval-flow"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket[5:])
    data = f"{bucket}/synth"
    synthetic.generate(data, images=16, seed=3, size=96)  # 12 train, 4 val
    varied_model(f"{bucket}/init", data)
    rc = train_job_by_value.main([
        "--data", data, "--storage", f"{bucket}/runs", "--name", "e1", "--preset", "tiny", "--num-workers", "1",
        "--batch-size", "4", "--stage1-steps", "1", "--stage2-steps", "1", "--eval-every", "100", "--lr", "0.0001",
        "--init", f"{bucket}/init", *PROPOSALS, "--eval-max-proposals", MAX_PROPOSALS, "--export", f"{bucket}/model"])
    assert rc == 0
    results = f"{bucket}/runs/e1/results"
    return {"bucket": bucket, "data": data, "model": f"{bucket}/model",
            "final": json.loads(storage.read_bytes(f"{results}/final.json")),
            "val_csv": storage.read_bytes(f"{results}/val_iou.csv").decode()}


@pytest.fixture(scope="module")
def labelled(trained):
    """Every generated image (train and val) labelled the way the training job evaluates."""
    out = f"{trained['bucket']}/labels"
    assert segment_dataset.main(["--input", f"{trained['data']}/JPEGImages", "--output", out,
                                 "--model", trained["model"], "--crf", "none", *PROPOSALS,
                                 "--max-proposals", MAX_PROPOSALS, "--batch-size", "8",
                                 "--images-per-batch", "4"]) == 0
    return out


def test_evaluate_reproduces_the_training_jobs_val_scores(trained, labelled, capsys):
    assert evaluate.main(["--predictions", labelled, "--ground-truth", trained["data"]]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(storage.read_bytes(f"{labelled}/eval/summary.json"))
    val = trained["final"]["val"]
    print(f"training val mean IoU {val['mean_iou']!r}, evaluate.py {summary['mean_iou']!r}")
    # The default list is val.txt: the 4 val images, not the 12 training images also labelled.
    assert summary["images"] == 4 and summary["list"].endswith("ImageSets/Segmentation/val.txt")
    assert summary["mean_iou"] == pytest.approx(val["mean_iou"], abs=1e-12)
    assert summary["pixel_accuracy"] == pytest.approx(val["pixel_accuracy"], abs=1e-12)
    assert summary["mean_accuracy"] == pytest.approx(val["mean_accuracy"], abs=1e-12)
    # Every class, every pixel count: the same confusion matrix as the training job's.
    assert storage.read_bytes(f"{labelled}/eval/iou.csv").decode() == trained["val_csv"]
    rows = list(csv.DictReader(io.StringIO(trained["val_csv"])))
    assert sum(1 for r in rows[:-2] if r["iou"] and float(r["iou"]) > 0) >= 3, \
        f"labels of one or two classes would make this comparison weak: {rows}"
    # The paper's Table 1 layout, with the model's class names.
    assert "background" in printed and "mean" in printed and f"mean IoU {val['mean_iou']:.4f}" in printed
    assert "| IoU % |" in storage.read_bytes(f"{labelled}/eval/iou.md").decode()


def test_a_listed_id_without_prediction_fails_unless_allowed(trained, labelled, capsys):
    ids = storage.read_bytes(f"{trained['data']}/ImageSets/Segmentation/val.txt").decode().split()
    listing = f"{trained['bucket']}/lists/val-plus.txt"
    storage.write_bytes(listing, "\n".join([*ids, "2026_999999"]).encode())
    # The id has ground truth (a copy of another's) but was never labelled.
    storage.write_bytes(f"{trained['data']}/SegmentationClass/2026_999999.png",
                        storage.read_bytes(f"{trained['data']}/SegmentationClass/{ids[0]}.png"))
    argv = ["--predictions", labelled, "--ground-truth", trained["data"], "--list", listing,
            "--out", f"{trained['bucket']}/eval-plus"]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 of 5 listed ids have no prediction" in err and "2026_999999" in err and "--allow-missing" in err
    assert not storage.exists(f"{trained['bucket']}/eval-plus/summary.json")
    assert evaluate.main([*argv, "--allow-missing"]) == 0
    summary = json.loads(storage.read_bytes(f"{trained['bucket']}/eval-plus/summary.json"))
    assert summary["images"] == 4 and summary["missing"] == ["2026_999999"]
    assert summary["mean_iou"] == pytest.approx(trained["final"]["val"]["mean_iou"], abs=1e-12)


# ------------------------------------------------------- hand-made outputs

def _output(base: str, masks: dict[str, np.ndarray], model_id: str, run_id: str,
            status: str = "ok", num_classes: int = 3) -> None:
    """What a segment run leaves: masks/<rel>.png and one Parquet part of rows."""
    writer = PredictionWriter(base, run_id, rows_per_part=100)
    for rel, labels in masks.items():
        mask = layout.mask_uri(base, rel)
        if status == "ok":
            storage.write_bytes(mask, encode_label_png(labels))
        pixels = np.bincount(labels.ravel(), minlength=num_classes).tolist()
        writer.add(pa.Table.from_pylist([{"image_uri": f"s3://in/{rel}", "mask_uri": mask if status == "ok" else "",
                     "overlay_uri": "", "status": status, "error": "" if status == "ok" else "bad",
                     "permanent": False, "width": labels.shape[1], "height": labels.shape[0],
                     "classes": [], "class_pixels": pixels, "mean_confidence": 1.0, "num_proposals": 1,
                     "source_size": 1, "source_version": "1", "model_id": model_id, "run_id": run_id,
                     "seconds": 0.0}], schema=rows.SCHEMA))
    writer.flush()


def _summary(output: str) -> dict:
    """The summary.json evaluate.py wrote where it writes by default, under the output."""
    return json.loads(storage.read_bytes(storage.join(layout.evaluation_uri(output), "summary.json")))


def _ground_truth(base: str, labels: dict[str, np.ndarray], val: list[str] | None = None) -> None:
    for i, lab in labels.items():
        storage.write_bytes(f"{base}/SegmentationClass/{i}.png", encode_label_png(lab))
    if val is not None:
        storage.write_bytes(f"{base}/ImageSets/Segmentation/val.txt", "\n".join(val).encode())


PRED = np.array([[0, 1], [1, 1]], np.uint8)
GT = np.array([[0, 1], [255, 0]], np.uint8)  # 255: not counted


def test_scores_by_hand(tmp_path, capsys):
    # Counted pixels: (gt 0, pred 0), (gt 1, pred 1), (gt 0, pred 1). Class 0: TP 1, FN 1 -> IoU 1/2;
    # class 1: TP 1, FP 1 -> 1/2; class 2 occurs nowhere and is not averaged (mean IoU 1/2).
    _output(str(tmp_path / "out"), {"a/x.jpg": PRED}, "m1", "20260101T000000Z-aaaaaa")
    _ground_truth(str(tmp_path / "gt"), {"x": GT})  # no val.txt: every id with a prediction
    assert evaluate.main(["--predictions", str(tmp_path / "out"), "--ground-truth", str(tmp_path / "gt")]) == 0
    summary = _summary(str(tmp_path / "out"))
    assert summary["mean_iou"] == pytest.approx(0.5) and summary["pixel_accuracy"] == pytest.approx(2 / 3)
    assert summary["mean_accuracy"] == pytest.approx(0.75) and summary["num_classes"] == 3
    assert summary["pixels"] == 3 and summary["list"] == "every ground-truth id with a prediction"
    # No run record to find the model by: class names fall back to VOC's first 3.
    table = capsys.readouterr().out
    assert "background aeroplane bicycle mean" in " ".join(table.split())
    assert "50.0 50.0 - 50.0" in " ".join(table.split())


def test_only_the_newest_ok_row_of_an_image_counts(tmp_path):
    out, gt = str(tmp_path / "out"), str(tmp_path / "gt")
    _ground_truth(gt, {"x": GT}, val=["x"])
    _output(out, {"x.jpg": np.zeros((2, 2), np.uint8)}, "old", "20260101T000000Z-aaaaaa")
    _output(out, {"x.jpg": PRED}, "new", "20260102T000000Z-bbbbbb")  # overwrites the old mask
    _output(out, {"x.jpg": PRED}, "new", "20260103T000000Z-cccccc", status="error")  # a failed retry
    assert evaluate.main(["--predictions", out, "--ground-truth", gt]) == 0
    summary = _summary(out)
    assert summary["model_id"] == "new" and summary["mean_iou"] == pytest.approx(0.5)
    # The old model's mask was overwritten, so asking for it finds nothing to score.
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--predictions", out, "--ground-truth", gt, "--model-id", "old"])
    assert e.value.code == 2


def test_masks_of_two_models_need_model_id(tmp_path, capsys):
    out, gt = str(tmp_path / "out"), str(tmp_path / "gt")
    _ground_truth(gt, {"x": GT, "y": GT}, val=["x", "y"])
    _output(out, {"x.jpg": PRED}, "m1", "20260101T000000Z-aaaaaa")
    _output(out, {"y.jpg": PRED}, "m2", "20260102T000000Z-bbbbbb")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--predictions", out, "--ground-truth", gt])
    assert e.value.code == 2
    assert "masks from 2 models: m1 (1 images), m2 (1 images)" in capsys.readouterr().err
    assert evaluate.main(["--predictions", out, "--ground-truth", gt, "--model-id", "m1", "--allow-missing"]) == 0
    assert _summary(out)["missing"] == ["y"]


def test_a_mask_of_the_wrong_size_fails_naming_it(tmp_path, capsys):
    out, gt = str(tmp_path / "out"), str(tmp_path / "gt")
    _ground_truth(gt, {"x": GT}, val=["x"])
    _output(out, {"x.jpg": np.zeros((3, 2), np.uint8)}, "m1", "20260101T000000Z-aaaaaa")
    assert evaluate.main(["--predictions", out, "--ground-truth", gt]) == 1
    assert "x (mask 2x3, ground truth 2x2)" in capsys.readouterr().err


def test_one_id_for_two_images_fails(tmp_path, capsys):
    out, gt = str(tmp_path / "out"), str(tmp_path / "gt")
    _ground_truth(gt, {"x": GT}, val=["x"])
    _output(out, {"a/x.jpg": PRED, "b/x.png": PRED}, "m1", "20260101T000000Z-aaaaaa")
    assert evaluate.main(["--predictions", out, "--ground-truth", gt]) == 1
    assert "x (s3://in/a/x.jpg, s3://in/b/x.png)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--predictions", "{tmp}/nothing"], "--predictions: no labelled images in"),
    (["--ground-truth", "{tmp}/nothing"], "--ground-truth: no SegmentationClass/ under"),
    (["--list", "{tmp}/no-list.txt"], "--list: no such file"),
    (["--model-id", "m9"], "--model-id m9: no masks by that model"),
    (["--storage-option", "novalue"], "KEY=VALUE"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    _output(str(tmp_path / "out"), {"x.jpg": PRED}, "m1", "20260101T000000Z-aaaaaa")
    _ground_truth(str(tmp_path / "gt"), {"x": GT})
    base = {"--predictions": str(tmp_path / "out"), "--ground-truth": str(tmp_path / "gt")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate.main([x for kv in base.items() for x in kv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after argparse's usage lines
    assert last.startswith("evaluate.py: error: ") and message in last and "Traceback" not in err
    assert not storage.exists(layout.evaluation_uri(str(tmp_path / "out")))


def test_command_line_bad_argument_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--predictions", str(tmp_path / "none"),
                        "--ground-truth", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("evaluate.py: error: --predictions:")
