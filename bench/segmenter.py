"""Milliseconds per image of the segmenter: proposals -> crops -> forward ->
paste-back -> merged map, for one model preset, on generated 500x375 images.

    python bench/segmenter.py --preset tiny --max-proposals 50
    python bench/segmenter.py --preset paper --images 32 --batch-size 64   # on a GPU

Also times the forward pass alone on the same number of crops, so the cost of
cropping, pasting back and merging shows as the difference. Appends a JSON
line to bench/results/segmenter.json.
"""

from __future__ import annotations

import argparse
import statistics
import time


import numpy as np
import torch

import record  # bench/record.py: this script's folder is on sys.path
from deconvnet.model import build_model, preset
from deconvnet.inference import for_mode
from deconvnet.inference.modes import setting
from deconvnet.inference.proposals import propose
from deconvnet.inference.segmenter import AGGREGATES, Segmenter
from deconvnet.data.synthetic import sample
from deconvnet.weights import ModelInfo


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--max-proposals", type=int, default=setting("max_proposals"))
    p.add_argument("--batch-size", type=int, default=setting("batch_size"))
    p.add_argument("--aggregate", default=setting("aggregate"), choices=AGGREGATES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=record.default_path("segmenter"))
    a = p.parse_args(argv)
    cfg = preset(a.preset)
    inference = for_mode(max_proposals=a.max_proposals, batch_size=a.batch_size, aggregate=a.aggregate)
    seg = Segmenter(build_model(cfg), ModelInfo(config=cfg), inference.segmenter, a.device)
    rng = np.random.default_rng(0)
    images = [sample(rng, 375, 500).image for _ in range(a.images)]
    pc = inference.proposals
    t0 = time.perf_counter()
    boxes = [propose(im, pc) for im in images]
    propose_ms = (time.perf_counter() - t0) * 1e3 / a.images
    n_props = sum(len(b) for b in boxes)

    def sync():
        if seg.device.type == "cuda":
            torch.cuda.synchronize()

    seg.probabilities(images[:1], boxes[:1])  # warm-up
    times = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        seg.probabilities(images, boxes)
        sync()
        times.append(time.perf_counter() - t0)
    x = torch.randn(a.batch_size, 3, 224, 224, device=seg.device)
    fwd = []
    with torch.inference_mode():
        for _ in range(a.repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(-(-n_props // a.batch_size)):
                seg._forward(seg.model, x)
            sync()
            fwd.append(time.perf_counter() - t0)
    rec = {"preset": a.preset, "device": str(seg.device), "threads": torch.get_num_threads(), "images": a.images,
           "size": "500x375", "proposals_per_image": n_props / a.images, "batch_size": a.batch_size,
           "propose_ms_per_image": round(propose_ms, 1),
           "segment_ms_per_image": round(statistics.median(times) * 1e3 / a.images, 1),
           "forward_only_ms_per_image": round(statistics.median(fwd) * 1e3 / a.images, 1)}
    summary = f"{a.preset} on {rec['device']} ({rec['threads']} threads), {n_props / a.images:.0f} proposals/image"
    times_ms = (f"propose {rec['propose_ms_per_image']} ms, segment {rec['segment_ms_per_image']} ms/image "
                f"(forward alone {rec['forward_only_ms_per_image']} ms)")
    return record.report(a.out, rec, f"{summary}, batch {a.batch_size}: {times_ms}")


if __name__ == "__main__":
    main()
