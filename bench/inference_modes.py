"""`--inference original` against `--inference default` with the same weights:
how many pixels get the same label, and how well each scores where there is
ground truth.

    python bench/inference_modes.py --model models/synth --images 10

Images: generated VOC-sized scenes (`deconvnet.data.synthetic`, 500x375, with their
labels) plus the photographs given with --photo (no labels: agreement only).
Both modes see the same grid proposals (the default `--proposals` without an
edge model) and the same CRF preset; `original` keeps its own rules (boxes
under 112 px skipped, no whole-image box, black padding, raw-score max-merge,
the release's CRF). A model trained on the scenes (jobs/train.py's learning
check) gives meaningful figures; a random one labels everything one class.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import record  # bench/record.py: this script's folder is on sys.path
from deconvnet import storage
from deconvnet.inference.crf import label_map
from deconvnet.data.imageio import decode_image
from deconvnet.inference import INFERENCE_MODES, for_mode
from deconvnet.inference.modes import setting
from deconvnet.metrics import ConfusionMatrix
from deconvnet.inference.proposals import propose
from deconvnet.records import now_iso
from deconvnet.inference.segmenter import Segmenter
from deconvnet.data.synthetic import sample
from deconvnet.weights import load_model_dir


def labels(seg_by_mode: dict, image: np.ndarray, mode: str, crf: str) -> np.ndarray:
    seg, cfg = seg_by_mode[(mode, crf)]
    probs = seg.probabilities([image], [propose(image, cfg.proposals)])[0]  # (C, H, W)
    return label_map(image, probs, cfg.crf)[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="DeconvNet model directory")
    p.add_argument("--images", type=int, default=10, help="generated 500x375 scenes")
    p.add_argument("--photo", action="append", default=[], help="a photograph (repeatable), no labels")
    p.add_argument("--max-proposals", type=int, default=setting("max_proposals"))
    p.add_argument("--scene-classes", type=int, default=4,
                   help="object classes in the scenes: as many as the model was trained on (synthetic's default 4)")
    p.add_argument("--seed", type=int, default=7, help="scenes from seeds other than the training set's")
    p.add_argument("--out", default=record.default_path("inference_modes"))
    a = p.parse_args(argv)

    model, info = load_model_dir(a.model)
    n = info.config.num_classes
    seg_by_mode = {}
    for mode in INFERENCE_MODES:
        for crf in ("none", "paper"):
            cfg = for_mode(mode, max_proposals=a.max_proposals, crf=crf)
            seg_by_mode[(mode, crf)] = (Segmenter(model, info, cfg.segmenter, device="cpu"), cfg)
    scenes = [sample(np.random.default_rng([a.seed, i]), 375, 500, a.scene_classes) for i in range(a.images)]
    inputs = [(s.image, s.classes) for s in scenes] + [(decode_image(storage.read_bytes(u)), None) for u in a.photo]
    rec = {"bench": "inference_modes", "time": now_iso(), "model": a.model, "model_id": info.model_id,
           "scenes": a.images, "photos": a.photo, "max_proposals": a.max_proposals}
    t0 = time.perf_counter()
    for crf in ("none", "paper"):
        same = total = photo_same = photo_total = 0
        scores = {mode: ConfusionMatrix(n) for mode in INFERENCE_MODES}
        for image, truth in inputs:
            out = {mode: labels(seg_by_mode, image, mode, crf) for mode in INFERENCE_MODES}
            agree = int((out["original"] == out["default"]).sum())
            same, total = same + agree, total + out["original"].size
            if truth is None:
                photo_same, photo_total = photo_same + agree, photo_total + out["original"].size
            else:
                for mode in INFERENCE_MODES:
                    scores[mode].update(out[mode], truth)
        rec[f"crf_{crf}"] = {
            "agreement_pct": round(100 * same / total, 2),
            "photo_agreement_pct": round(100 * photo_same / photo_total, 2) if photo_total else None,
            **{f"{mode}_scene_miou": round(scores[mode].mean_iou(), 4) for mode in INFERENCE_MODES}}
        r = rec[f"crf_{crf}"]
        print(f"--crf {crf}: {r['agreement_pct']}% of pixels labelled alike"
              + (f" ({r['photo_agreement_pct']}% on the photos)" if photo_total else "")
              + f"; scene mIoU original {r['original_scene_miou']}, default {r['default_scene_miou']}")
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return record.report(a.out, rec, f"{len(inputs)} images in {rec['seconds']} s")


if __name__ == "__main__":
    main()
