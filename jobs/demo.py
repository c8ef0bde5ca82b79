"""The embedded demo behind `make demo`: everything on this machine, no cluster,
no downloads. It runs the same commands a user would:

    python -m deconvnet.synthetic --out demo-out/data --images 120 --seed 0
    python jobs/train.py --data demo-out/data ... --export demo-out/model   (tiny preset, CPU)
    python jobs/segment_dataset.py --input demo-out/images --output demo-out/labels --model demo-out/model --overlays

The images segmented are the held-out (val) generated scenes plus a real
photograph from matplotlib's sample data. With --no-train, a randomly
initialised tiny model is used instead (fast, but its masks mean nothing).
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
    p.add_argument("--steps", type=int, default=600, help="training steps (stage 1 + stage 2)")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    data, images, model = (os.path.join(a.out, d) for d in ("data", "images", "model"))
    if not os.path.exists(os.path.join(data, "ImageSets")):
        sh("-m", "deconvnet.synthetic", "--out", data, "--images", str(a.images), "--seed", "0")
    if not os.path.exists(os.path.join(model, "config.json")):
        train_script = os.path.join(ROOT, "jobs", "train.py")
        if a.train and os.path.exists(train_script):
            half = str(a.steps // 2)
            sh("jobs/train.py", "--data", data, "--storage", os.path.join(a.out, "runs"), "--name", "demo",
               "--preset", "tiny", "--num-workers", "1", "--stage1-steps", half, "--stage2-steps", half,
               "--export", model)
        else:
            with open(os.path.join(data, "classes.txt"), "w") as f:
                f.write("background\naeroplane\nbicycle\nbird\nboat\n")
            sh("-m", "deconvnet", "init", "--preset", "tiny", "--classes", os.path.join(data, "classes.txt"),
               "--out", model)
    # Held-out scenes and a real photograph are what the job labels.
    os.makedirs(os.path.join(images, "scenes"), exist_ok=True)
    with open(os.path.join(data, "ImageSets", "Segmentation", "val.txt")) as f:
        val = [line.strip() for line in f if line.strip()]
    for i in val:
        shutil.copy(os.path.join(data, "JPEGImages", f"{i}.jpg"), os.path.join(images, "scenes", f"{i}.jpg"))
    os.makedirs(os.path.join(images, "photos"), exist_ok=True)
    shutil.copy(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"),
                os.path.join(images, "photos", "grace_hopper.jpg"))
    labels = os.path.join(a.out, "labels")
    sh("jobs/segment_dataset.py", "--input", images, "--output", labels, "--model", model, "--overlays")
    print(f"\nLook at: {labels}/overlays/ (colours over the photos), {labels}/masks/ (label maps),\n"
          f"{labels}/predictions/*.parquet (one row per image), {labels}/runs/*.json (the run's record).\n"
          f"Run `make demo` again: the job finds nothing new and does no work.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
