"""The embedded demo behind `make demo`: everything on this machine, no cluster,
no downloads. It runs the same commands a user would:

    python -m deconvnet.data.synthetic --out demo-out/data --images 120 --seed 0
    python jobs/train.py --data demo-out/data --preset tiny --num-workers 1 ... --export demo-out/model
    python jobs/segment_dataset.py --input demo-out/images --output demo-out/labels --model demo-out/model \
        --overlays --gallery

The tiny model is trained from scratch on CPU with the preset's recipe (400
steps, about ten minutes on two cores; the learning check in docs/performance.md is this run).
The images segmented are the held-out (val) generated scenes plus a real
photograph from matplotlib's sample data; open demo-out/labels/index.html.
With --no-train, a randomly initialised model (`python -m deconvnet init`) is
used instead: fast, but its masks mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import matplotlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo-out"))
    p.add_argument("--images", type=int, default=120, help="generated scenes (train + val)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="train the tiny model first so the masks mean something")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    data, images, model = (os.path.join(a.out, d) for d in ("data", "images", "model"))
    if not os.path.exists(os.path.join(data, "ImageSets")):
        sh("-m", "deconvnet.data.synthetic", "--out", data, "--images", str(a.images), "--seed", "0")
    if not a.train:
        model = os.path.join(a.out, "untrained")
        if not os.path.exists(os.path.join(model, "config.json")):
            sh("-m", "deconvnet", "init", "--preset", "tiny", "--out", model)
    elif not os.path.exists(os.path.join(model, "config.json")):
        # Interrupted? The same command resumes the run from its latest checkpoint.
        sh("jobs/train.py", "--data", data, "--preset", "tiny", "--num-workers", "1",
           "--storage", os.path.join(a.out, "runs"), "--name", "demo", "--export", model)
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
    labels = os.path.join(a.out, "labels")
    sh("jobs/segment_dataset.py", "--input", images, "--output", labels, "--model", model, "--overlays", "--gallery")
    print(f"\nLook at: {labels}/index.html (the gallery), {labels}/overlays/ (colours over the photos), "
          f"{labels}/masks/ (label maps),\n"
          f"{labels}/predictions/*.parquet (one row per image), {labels}/runs/*.json (the run's record).\n"
          f"Run `make demo` again: the job finds nothing new and does no work.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
