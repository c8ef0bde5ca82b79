"""The dense CRF's two engines on the same inputs: pydensecrf (the release's
C++) against the torch permutohedral lattice (deconvnet/inference/lattice.py).

    python bench/crf_engines.py                       # CPU, torch at 1 thread and at all
    python bench/crf_engines.py --threads 1 --repeats 3
    python bench/crf_engines.py --device cuda         # the torch engine on a GPU

Input: a real photograph (matplotlib's sample `grace_hopper.jpg`, resized to
500x375 and 1000x750) and a 21-class probability map built as bench/crf.py
builds one, from labels that quantise the photo's colours into 6 regions
(k-means), so the map's edges roughly follow the photo's. Both engines get the
same image, probabilities and `CRFConfig`, for the two normalisations the
inference modes use: `none` (the `paper` preset as `--inference original`
runs it: const kernel, unclipped -log p) and `symmetric` (as `--inference
default` runs it: diag kernel, p clipped at 1e-5).

Reported per image: CPU time of the process over all threads
(`time.process_time`) and wall time, each the median of the repeats; the % of
pixels whose label (argmax of Q) the torch engine gives as pydensecrf does;
the largest |Q difference|. JSON lines go to bench/results/crf_engines.json.
"""

from __future__ import annotations

import dataclasses

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from matplotlib import cbook
from PIL import Image

import record  # bench/record.py: this script's folder is on sys.path
from crf import network_like_probs  # bench/crf.py
from deconvnet.inference.crf import crf_config, mean_field
from deconvnet.inference.lattice import torch_mean_field
from deconvnet.records import now_iso

SETTINGS = {
    "none": crf_config("paper"),
    "symmetric": crf_config("paper", kernel="diag", normalization="symmetric", unary_clip=1e-5),
}


def photo(width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8: matplotlib's sample photograph resized."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB").resize((width, height), Image.BICUBIC)
    return np.asarray(image)


def colour_regions(image: np.ndarray, k: int = 6, seed: int = 0) -> np.ndarray:
    """(H, W) labels 0..k-1: k-means on the pixels' colours (10 rounds)."""
    rng = np.random.default_rng(seed)
    pixels = image.reshape(-1, 3).astype(np.float32)
    centres = pixels[rng.choice(len(pixels), k, replace=False)]
    for _ in range(10):
        labels = ((pixels[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([pixels[labels == c].mean(0) if (labels == c).any() else centres[c]
                            for c in range(k)])
    return labels.reshape(image.shape[:2]).astype(np.uint8)


def timed(repeats: int, fn, *args) -> tuple[float, float, np.ndarray]:
    """(median CPU seconds over all threads, median wall seconds, last result)."""
    cpu, wall, result = [], [], None
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        result = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()],
                        help="torch CPU threads to measure the torch engine at")
    parser.add_argument("--device", default="cpu", help="the torch engine's device")
    parser.add_argument("--output", default=record.default_path("crf_engines"))
    args = parser.parse_args()

    machine = {"python": platform.python_version(), "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "device": args.device}
    print(f"{'size':>9} {'norm':>9} {'engine':>14} {'cpu s':>7} {'wall s':>7} "
          f"{'agree %':>8} {'max |dQ|':>9}")
    for width, height in ((500, 375), (1000, 750)):
        image = photo(width, height)
        probs = network_like_probs(colour_regions(image))  # (21, H, W)
        for name, config in SETTINGS.items():
            cpu, wall, expected = timed(args.repeats, lambda *a: mean_field(*a).q, image, probs, dataclasses.replace(config, exact=True))
            rows = [("pydensecrf", None, cpu, wall, expected)]
            for threads in args.threads if args.device == "cpu" else [torch.get_num_threads()]:
                torch.set_num_threads(threads)
                cpu, wall, q = timed(args.repeats, torch_mean_field, image, probs, config,
                                     args.device)
                rows.append((f"torch {args.device}/{threads}", threads, cpu, wall, q))
            for engine, threads, cpu, wall, q in rows:
                agree = float((q.argmax(0) == expected.argmax(0)).mean() * 100)
                rec = {"time": now_iso(), "size": f"{width}x{height}", "normalization": name,
                       "engine": engine, "threads": threads, "cpu_s": round(cpu, 3),
                       "wall_s": round(wall, 3), "agreement_pct": round(agree, 3),
                       "max_abs_q_diff": float(np.abs(q - expected).max()),
                       "repeats": args.repeats, "machine": machine}
                record.report(args.output, rec,
                              f"{rec['size']:>9} {name:>9} {engine:>14} {cpu:7.2f} {wall:7.2f} "
                              f"{agree:8.3f} {rec['max_abs_q_diff']:9.2e}")


if __name__ == "__main__":
    main()
