"""Score the segment job's masks against PASCAL VOC-layout ground truth.

    python jobs/evaluate.py --predictions s3://bucket/labels/ --ground-truth s3://bucket/VOC2012/

On a cluster it needs no GPU and no Ray, only storage:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/evaluate.py --predictions s3://bucket/labels/ --ground-truth s3://bucket/VOC2012/

--predictions is the segment job's --output. Its predictions/*.parquet rows
say which image each mask belongs to and which model made it; an image's id
is its file name without the extension, the VOC convention
(JPEGImages/2007_000033.jpg is id 2007_000033). Ground truth is
<ground-truth>/SegmentationClass/<id>.png (class ids, 255 = ignore).

Which ids are scored: the --list file (ids, or 'IMAGE LABEL' paths relative to
--ground-truth, as the training job reads them); without it,
<ground-truth>/ImageSets/Segmentation/val.txt when there is one (the ids the
training job validates on), else every ground-truth id that has a prediction.
A listed id with no prediction (never labelled, an error row, or relabelled
since by another model) fails the run with exit code 1 and the ids named,
unless --allow-missing scores the others and records what was left out.

The scores are the training job's: one confusion matrix over all pixels, with
as many classes as the model that made the masks has (each Parquet row counts
pixels for every class of its model), per-class IoU averaged over the classes
that occur in the ground truth or the predictions. Masks made with `--crf
none` and the training job's proposals (--proposals, --max-proposals = its
--eval-max-proposals) score exactly the val mean IoU the training job reported
for the same model.

Prints the per-class IoU table in the layout of the paper's Table 1, mean IoU,
pixel accuracy and mean accuracy, and writes iou.csv, iou.md and summary.json
under --out (default <predictions>/eval/).
Exit codes: 0 scored, 1 missing or mismatched predictions (or unreadable
files), 2 a bad argument (one line on stderr, before any scoring).
"""

from __future__ import annotations

import argparse
import math
import posixpath
import sys
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from deconvnet import storage
from deconvnet.cli import add_storage_option_arg, storage_options_from
from deconvnet.metrics import ConfusionMatrix
from deconvnet.records import read_json, write_json
from deconvnet.data.voc import VAL_LIST, decode_label_png, read_list
from deconvnet.weights import read_model_info
from pipeline import layout
from pipeline.predictions.parts import iter_rows, latest_rows, read_predictions

ROW_COLUMNS = ["image_uri", "mask_uri", "status", "model_id", "run_id", "class_pixels"]
SHOWN = 10  # ids named in a message before "..."


class EvaluationFailed(RuntimeError):
    """The predictions do not cover (or do not fit) the ground truth: exit code 1."""


@dataclass(frozen=True)
class Pair:
    id: str
    mask: str  # predicted label map (palette PNG of class ids)
    label: str  # ground truth (palette PNG, 255 = ignore)


def image_id(uri: str) -> str:
    """VOC's id of an image: its file name without the extension."""
    return posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0]


def _named(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN]) + (", ..." if len(ids) > SHOWN else "")


def current_masks(predictions: str, storage_options=None) -> list[dict[str, Any]]:
    """The newest `ok` row of every image under the segment job's output.

    Mask paths do not depend on the model, so a later run with another model
    overwrites an image's mask: only the newest row describes the mask stored.
    An error row writes no mask, so it leaves the one before it standing."""
    table = read_predictions(predictions, ROW_COLUMNS, storage_options)
    return list(iter_rows(latest_rows(table.filter(pc.equal(table["status"], "ok")))))


def pick_model(rows: list[dict[str, Any]], model_id: str | None) -> tuple[str, list[dict[str, Any]]]:
    """(model id, its rows): the only model in `rows`, or the one asked for. ValueError otherwise."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["model_id"]] = counts.get(r["model_id"], 0) + 1
    if model_id is None:
        if len(counts) > 1:
            found = ", ".join(f"{m} ({n} images)" for m, n in sorted(counts.items()))
            raise ValueError(f"masks from {len(counts)} models: {found}; choose one with --model-id")
        (model_id,) = counts
    elif model_id not in counts:
        raise ValueError(f"--model-id {model_id}: no masks by that model (the newest mask of every image "
                         f"is by {', '.join(sorted(counts))})")
    return model_id, [r for r in rows if r["model_id"] == model_id]


def class_names(predictions: str, row: dict[str, Any], num_classes: int, storage_options=None) -> list[str] | None:
    """The model's class names, from the model directory its run recorded; None
    when that directory is gone or holds another model by now."""
    try:
        record = read_json(layout.run_record_uri(predictions, row["run_id"]), storage_options)
        info = read_model_info(record["config"]["model"], storage_options)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.model_id != row["model_id"] or len(info.classes) != num_classes:
        return None
    return list(info.classes)


def listed_labels(ground_truth: str, list_uri: str | None, predicted_ids: set[str],
                  storage_options=None) -> tuple[list[tuple[str, str]], str]:
    """((id, ground-truth label URI) of every image to score, where the list came from)."""
    if list_uri is None:
        val = storage.join(ground_truth, VAL_LIST)
        if storage.exists(val, storage_options):
            list_uri = val
    if list_uri is not None:
        try:
            items = read_list(ground_truth, list_uri, has_objects=False, storage_options=storage_options)
            return [(item.id, item.classes) for item in items], list_uri
        except FileNotFoundError:
            raise ValueError(f"--list: no such file {list_uri}") from None
    try:
        labels = storage.list_files(storage.join(ground_truth, "SegmentationClass"), [".png"], storage_options)
    except FileNotFoundError:
        raise ValueError(f"--ground-truth: no SegmentationClass/ under {ground_truth} "
                         f"(expected the PASCAL VOC layout)") from None
    listed = [(image_id(u), u) for u in labels if image_id(u) in predicted_ids]
    return listed, "every ground-truth id with a prediction"


def match(listed: list[tuple[str, str]], rows: list[dict[str, Any]]) -> tuple[list[Pair], list[str]]:
    """(pairs of mask and ground truth, listed ids without a prediction).
    EvaluationFailed when an id names more than one predicted image."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_id.setdefault(image_id(r["image_uri"]), []).append(r)
    pairs, missing, ambiguous = [], [], []
    for id_, label in listed:
        found = by_id.get(id_, [])
        if len(found) > 1:
            ambiguous.append(f"{id_} ({', '.join(sorted(r['image_uri'] for r in found))})")
        elif found:
            pairs.append(Pair(id_, found[0]["mask_uri"], label))
        else:
            missing.append(id_)
    if ambiguous:
        raise EvaluationFailed(f"{len(ambiguous)} ids name several predicted images: {_named(ambiguous)}; "
                               f"segment one image per id, or evaluate a narrower --predictions")
    return pairs, missing


def score(pairs: list[Pair], num_classes: int, storage_options=None) -> ConfusionMatrix:
    """One confusion matrix over every pair's pixels (masks and labels read concurrently)."""
    def read(p: Pair):
        return (decode_label_png(storage.read_bytes(p.mask, storage_options)),
                decode_label_png(storage.read_bytes(p.label, storage_options)))

    cm = ConfusionMatrix(num_classes)
    wrong = []
    for p, (pred, label) in zip(pairs, storage.read_concurrently(read, pairs)):
        if pred.shape != label.shape:
            wrong.append(f"{p.id} (mask {pred.shape[1]}x{pred.shape[0]}, "
                         f"ground truth {label.shape[1]}x{label.shape[0]})")
            continue
        cm.update(pred, label)
    if wrong:
        raise EvaluationFailed(f"{len(wrong)} masks are not the size of their ground truth: {_named(wrong)}")
    return cm


def report(cm: ConfusionMatrix, names: list[str] | None, facts: dict[str, Any]) -> tuple[str, str, dict]:
    """(text for the terminal, Markdown, summary JSON)."""
    means = (f"mean IoU {cm.mean_iou():.4f}, pixel accuracy {cm.pixel_accuracy():.4f}, "
             f"mean accuracy {cm.mean_accuracy():.4f}")
    scope = (f"{facts['images']} images ({facts['list']}), {int(cm.matrix.sum())} pixels, "
             f"model {facts['model_id']}")
    left_out = (f"\n{len(facts['missing'])} listed ids had no prediction and are not scored: "
                f"{_named(facts['missing'])}" if facts["missing"] else "")
    text = f"{scope}{left_out}\n\n{cm.table(names, name='IoU %')}\n\n{means}"
    markdown = (f"# Evaluation of {facts['predictions']}\n\nAgainst {facts['ground_truth']}: {scope}.{left_out}\n\n"
                f"{cm.to_markdown(names, name='IoU %')}\n\n{means}\n")
    summary = {**facts, **{k: (None if math.isnan(v) else v) for k, v in cm.summary(names).items()},
               "num_classes": cm.num_classes, "pixels": int(cm.matrix.sum())}
    return text, markdown, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--predictions", required=True, metavar="URI", help="the segment job's --output")
    p.add_argument("--ground-truth", required=True, metavar="URI",
                   help="VOC-layout root: SegmentationClass/<id>.png (255 = ignore), ImageSets/Segmentation/")
    p.add_argument("--list", metavar="FILE",
                   help="ids to score (or 'IMAGE LABEL' lines); default: ImageSets/Segmentation/val.txt "
                        "under --ground-truth if present, else every ground-truth id with a prediction")
    p.add_argument("--out", metavar="URI", help="where iou.csv, iou.md and summary.json go "
                                                "(default: <predictions>/eval)")
    p.add_argument("--model-id", help="score this model's masks when --predictions holds several models'")
    p.add_argument("--allow-missing", action="store_true",
                   help="score the listed ids that have a prediction instead of failing on the others")
    add_storage_option_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    opts = storage_options_from(parser, a.storage_option)
    try:
        rows = current_masks(a.predictions, opts)
    except (OSError, ValueError) as e:  # unreachable endpoint, bad credentials, bad URI
        parser.error(f"--predictions: cannot read {a.predictions}: {type(e).__name__}: {e}")
    if not rows:
        parser.error(f"--predictions: no labelled images in {layout.predictions_uri(a.predictions)} "
                     f"(expected the segment job's --output)")
    try:
        model_id, rows = pick_model(rows, a.model_id)
        listed, source = listed_labels(a.ground_truth, a.list, {image_id(r["image_uri"]) for r in rows}, opts)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # unreachable endpoint, bad credentials
        parser.error(f"--ground-truth: cannot read {a.ground_truth}: {type(e).__name__}: {e}")
    if not listed:
        parser.error(f"--ground-truth: nothing to score ({source} under {a.ground_truth})")
    sizes = {len(r["class_pixels"]) for r in rows}
    assert len(sizes) == 1, f"rows of one model with different class counts: {sizes}"
    (num_classes,) = sizes
    out = a.out or layout.evaluation_uri(a.predictions)
    try:
        pairs, missing = match(listed, rows)
        if missing and not a.allow_missing:
            raise EvaluationFailed(
                f"{len(missing)} of {len(listed)} listed ids have no prediction by model {model_id} under "
                f"{a.predictions}: {_named(missing)}; label them, or pass --allow-missing to score the "
                f"{len(pairs)} that have one")
        if not pairs:
            raise EvaluationFailed(f"none of the {len(listed)} listed ids has a prediction under {a.predictions}")
        cm = score(pairs, num_classes, opts)
    except EvaluationFailed as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"evaluate.py: cannot read {e}", file=sys.stderr)
        return 1
    names = class_names(a.predictions, rows[0], num_classes, opts)
    facts = {"predictions": a.predictions, "ground_truth": a.ground_truth, "list": source,
             "model_id": model_id, "images": len(pairs), "missing": missing}
    text, markdown, summary = report(cm, names, facts)
    print(text)
    storage.write_bytes(storage.join(out, "iou.csv"), cm.to_csv(names).encode(), opts)
    storage.write_bytes(storage.join(out, "iou.md"), markdown.encode(), opts)
    write_json(storage.join(out, "summary.json"), summary, opts)
    print(f"written: {storage.join(out, 'iou.csv')}, iou.md, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
