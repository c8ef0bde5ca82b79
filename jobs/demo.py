"""The embedded demo behind `make demo`: the segment job with the small model
kept in the repository (models/demo/) over held-out generated scenes and a
photo, everything on this machine, no cluster, no downloads.

It runs the same commands a user would:

    python -m deconvnet.data.synthetic --out demo-out/data --images 120 --seed 0
    python jobs/segment_dataset.py --input demo-out/images --output demo-out/labels --model models/demo \\
        --overlays --gallery

The images segmented are the held-out (val) generated scenes, which the kept
model never trained on, plus a real photograph from matplotlib's sample data;
open demo-out/labels/index.html.

`make demo-model` (`python jobs/demo.py --retrain`) trains the kept model again
from scratch on the same scenes, seeded: the tiny preset's recipe in 200 steps
instead of 400 (docs/performance.md's learning check):

    python jobs/train.py --data demo-out/data --preset tiny --num-workers 1 --seed 0 \\
        --stage1-steps 75 --stage2-steps 125 --eval-every 200 \\
        --storage demo-out/runs --name demo-model --export models/demo

Its config.json's provenance names the data and these commands relative to the
repository. With --no-train, a randomly initialised model (`python -m deconvnet
init`) is used instead: its masks mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import matplotlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = "0"  # of the generated scenes and of training
# The tiny preset's recipe in half the steps (75 + 125; evaluated at the end of each
# stage): val mean IoU 0.845 instead of 0.920 (docs/performance.md, the learning check).
TRAIN = ("--preset", "tiny", "--num-workers", "1", "--seed", SEED,
         "--stage1-steps", "75", "--stage2-steps", "125", "--eval-every", "200")
RUN_NAME = "demo-model"


def sh(*args: str) -> None:
    print("$", " ".join(os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def retrain(data: str, scenes: list[str], runs: str, model: str) -> None:
    """Train the demo model from scratch into `model`, then make its provenance
    name the data and the commands relative to the repository. Ray's workers
    need absolute paths; the model id hashes weights and classes, not provenance."""
    run = os.path.join(runs, RUN_NAME)
    if os.path.exists(os.path.join(run, "results", "final.json")):
        shutil.rmtree(run)  # finished before: start again; an interrupted run resumes
    sh("jobs/train.py", "--data", data, *TRAIN, "--storage", runs, "--name", RUN_NAME, "--export", model)
    path = os.path.join(model, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["provenance"].update(
        data=rel(data), made_by="make demo-model",
        data_command=" ".join(["python -m deconvnet.data.synthetic --out", rel(data), *scenes]),
        train_command=" ".join(["python jobs/train.py --data", rel(data), *TRAIN, "--storage", rel(runs),
                                "--name", RUN_NAME, "--export", rel(model)]))
    with open(path, "w") as f:
        f.write(json.dumps(config, indent=2))
    print(f"wrote {rel(model)} (model id {config['model_id']}, "
          f"val mean IoU {config['provenance']['val_mean_iou']:.3f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo-out"))
    p.add_argument("--model", default=os.path.join(ROOT, "models", "demo"), help="the trained demo model")
    p.add_argument("--images", type=int, default=120, help="generated scenes (train + val)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="label with the trained demo model (--no-train: a randomly initialised one)")
    p.add_argument("--retrain", action="store_true", help="train --model from scratch and stop (make demo-model)")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = os.path.abspath(a.out)
    data, images, model = os.path.join(out, "data"), os.path.join(out, "images"), os.path.abspath(a.model)
    scenes = ["--images", str(a.images), "--seed", SEED]  # 3 in 4 train, the rest held out (val)
    if not os.path.exists(os.path.join(data, "ImageSets")):
        sh("-m", "deconvnet.data.synthetic", "--out", data, *scenes)
    if a.retrain:
        retrain(data, scenes, os.path.join(out, "runs"), model)
        return 0
    if not a.train:
        model = os.path.join(out, "untrained")
        if not os.path.exists(os.path.join(model, "config.json")):
            sh("-m", "deconvnet", "init", "--preset", "tiny", "--out", model)
    # Held-out scenes and a real photograph are what the job labels.
    os.makedirs(os.path.join(images, "scenes"), exist_ok=True)
    with open(os.path.join(data, "ImageSets", "Segmentation", "val.txt")) as f:
        val = [line.strip() for line in f if line.strip()]
    # copy2 keeps the files' mtimes, their version on a local disk: a second
    # `make demo` finds nothing new to label.
    for i in val:
        shutil.copy2(os.path.join(data, "JPEGImages", f"{i}.jpg"), os.path.join(images, "scenes", f"{i}.jpg"))
    os.makedirs(os.path.join(images, "photos"), exist_ok=True)
    shutil.copy2(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"),
                 os.path.join(images, "photos", "grace_hopper.jpg"))
    labels = os.path.join(out, "labels")
    sh("jobs/segment_dataset.py", "--input", images, "--output", labels, "--model", model, "--overlays", "--gallery")
    # The review queue as Label Studio tasks (pre-annotations): the 10 least confident images.
    tasks = os.path.join(out, "label-studio")
    sh("jobs/export_labels.py", "--labels", labels, "--format", "label-studio", "--to", tasks,
       "--review-first", "10")
    print(f"\nLook at: {labels}/index.html (the gallery), {labels}/overlays/ (colours over the photos), "
          f"{labels}/masks/ (label maps),\n"
          f"{labels}/predictions/*.parquet (one row per image), {labels}/runs/*.json (the run's record),\n"
          f"{tasks}/ (the 10 least confident as Label Studio tasks with their labelling config: import them to "
          f"correct the masks).\n"
          f"Run `make demo` again: the job finds nothing new and does no work.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
