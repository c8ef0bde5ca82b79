"""How long `python -m deconvnet convert-caffe` takes on a full-size file, and
how much memory it needs.

    python bench/convert_caffe.py [--classes 21] [--preset paper] [--keep DIR]

Writes a paper-size (252M weights, about 1 GB; `--preset tiny` for a quick run)
DeconvNet inference-format .caffemodel (V1 layers, the fork's
BN/DECONVOLUTION/UNPOOLING, random weights) into a temp dir with the tests'
writer (tests/caffenets.py, tests/caffewriter.py), then times the converter in a
child process and reads its peak RSS from wait4's rusage. The file was just
written, so it is read from the page cache (a warm read). Figures are printed
and appended to bench/results/convert_caffe.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from deconvnet.model import PRESETS, DeconvNet, preset
from deconvnet.records import now_iso

import record  # bench/record.py: this script's folder is on sys.path

# The .caffemodel writer is test code: tests/caffenets.py and tests/caffewriter.py.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import caffenets  # noqa: E402
import caffewriter  # noqa: E402


def random_params(num_classes: int, seed: int = 0, name: str = "paper") -> dict[str, list[np.ndarray]]:
    """The release's blobs for random weights of a preset's size (shapes from a meta model)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DeconvNet(preset(name, num_classes=num_classes)).state_dict().items()}
    rng = np.random.default_rng(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = np.zeros((), np.int64)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 2, shape).astype(np.float32)
        else:
            state[k] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    return caffenets.deconvnet_to_caffe(state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--preset", default="paper", choices=sorted(k for k, c in PRESETS.items() if c.arch == "deconvnet"),
                   help="size of the random DeconvNet written (default: paper)")
    p.add_argument("--keep", help="write the files here instead of a temp dir (kept)")
    p.add_argument("--out", default=record.default_path("convert_caffe"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        src, out = os.path.join(work, "DeconvNet_inference.caffemodel"), os.path.join(work, "model")
        t0 = time.perf_counter()
        params = random_params(args.classes, name=args.preset)
        with open(src, "wb") as f:
            for chunk in caffewriter.caffemodel_chunks(caffenets.deconvnet_layers(params, bn_mode=None, stats_tops=True),
                                                       "DeconvNet_make_bn_layer_testable"):
                f.write(chunk)
        del params
        size = os.path.getsize(src)
        print(f"wrote {src}: {size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")
        classes = os.path.join(work, "classes.txt")
        with open(classes, "w") as f:
            f.write("".join(f"class{i}\n" for i in range(args.classes)))
        cmd = [sys.executable, "-m", "deconvnet", "convert-caffe", src, "--out", out, "--classes", classes]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            sys.exit(f"convert-caffe failed with exit code {child.returncode}")
        peak = usage.ru_maxrss * 1024  # Linux reports KiB
        weights = os.path.getsize(os.path.join(out, "model.safetensors"))
        print(f"convert-caffe: {wall:.1f} s wall, peak RSS {peak / 2**20:.0f} MiB "
              f"(the weights are {weights / 2**20:.0f} MiB; {peak / weights:.2f}x)")
        record.append(args.out, [{
            "bench": "convert_caffe", "time": now_iso(), "host": platform.node(), "cpus": os.cpu_count(),
            "preset": args.preset, "source_bytes": size, "weights_bytes": weights, "classes": args.classes,
            "wall_s": round(wall, 2), "peak_rss_bytes": peak, "user_s": round(usage.ru_utime, 2),
            "sys_s": round(usage.ru_stime, 2), "cache": "warm (file just written)",
        }])


if __name__ == "__main__":
    main()
