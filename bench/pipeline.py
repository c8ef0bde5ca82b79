"""Images/s of the whole segment job, next to (a) a plain sequential Python loop
doing the same work with the same model in one process and (b) the model-only
rate for the same proposals; plus peak memory of the driver and the workers.

    python bench/pipeline.py --images 16 --crf paper none
    python bench/pipeline.py --images 16 --scale 10 --crf none     # memory at N and 10N
    python bench/pipeline.py --images 64 --preset paper --crf none  # on a GPU machine

The dataset is generated (deconvnet.data.synthetic, 500x375 like PASCAL VOC) and
cached under --work; the model is a fresh `--preset` model directory (speed does
not depend on the weights). Prints a table and appends JSON lines to
bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch

import record as bench_record  # bench/record.py: this script's folder is on sys.path

# ...and bench/pipeline.py would shadow the `pipeline` package: take the folder off again.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
from deconvnet import storage
from deconvnet.inference import InferenceConfig, for_mode
from deconvnet.inference.crf import CRF_PRESETS, label_map
from deconvnet.inference.modes import NO_CRF, setting
from deconvnet.data.imageio import decode_image
from deconvnet.model import build_model, preset
from deconvnet.inference.proposals import propose
from deconvnet.inference.segmenter import Segmenter
from deconvnet.data.synthetic import generate
from deconvnet.data.voc import encode_label_png
from deconvnet.weights import ModelInfo, save_model_dir


def _rss(pid: str) -> int:
    """Resident bytes of a process, from /proc (Linux); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class RSSSampler(threading.Thread):
    """Peak resident memory, sampled while a job runs: this driver process, and
    Ray's worker processes (sum and largest; titled `ray::...`)."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self._halt = every, threading.Event()
        self.peak_driver = self.peak_sum = self.peak_one = 0

    def run(self):
        me = str(os.getpid())
        while not self._halt.is_set():
            total = biggest = 0
            for path in glob.glob("/proc/[0-9]*/cmdline"):
                pid = path.split("/")[2]
                try:
                    with open(path, "rb") as f:
                        cmd = f.read(200).decode(errors="replace")
                except OSError:
                    continue
                if pid != me and (cmd.startswith("ray::") or "default_worker.py" in cmd):
                    rss = _rss(pid)
                    total, biggest = total + rss, max(biggest, rss)
            self.peak_sum, self.peak_one = max(self.peak_sum, total), max(self.peak_one, biggest)
            self.peak_driver = max(self.peak_driver, _rss(me))
            self._halt.wait(self.every)

    def stop(self):
        self._halt.set()
        self.join()


def dataset(work: str, n: int, size: tuple[int, int]) -> str:
    root = os.path.join(work, f"data-{n}-{size[1]}x{size[0]}")
    if not os.path.exists(os.path.join(root, "ImageSets")):
        generate(root, images=n, seed=0, size=size, val_fraction=0.0)  # size is (H, W)
    return os.path.join(root, "JPEGImages")


def sequential(files: list[str], seg: Segmenter, inference: InferenceConfig, out: str) -> float:
    """The same work as the job, one image after another in this process."""
    t0 = time.perf_counter()
    for f in files:
        image = decode_image(storage.read_bytes(f))
        probs = seg.probabilities([image], [propose(image, inference.proposals)])[0]
        labels = label_map(image, probs, inference.crf)[0]
        storage.write_bytes(os.path.join(out, os.path.basename(f) + ".png"), encode_label_png(labels))
    return time.perf_counter() - t0


def model_only(seg: Segmenter, proposals: int, batch_size: int) -> float:
    """Seconds to forward `proposals` crops in batches of `batch_size`."""
    x = torch.randn(batch_size, 3, 224, 224, device=seg.device)
    seg._forward(seg.model, x)  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(-(-proposals // batch_size)):
            seg._forward(seg.model, x)
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def record_proposals(output: str) -> list[int]:
    """num_proposals of every row the job wrote."""
    from pipeline.predictions.parts import iter_rows, read_predictions

    return [r["num_proposals"] for r in iter_rows(read_predictions(output, ["num_proposals"]))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16, help="N")
    p.add_argument("--scale", type=int, default=None, help="also run the job on scale*N images (memory check)")
    p.add_argument("--size", default="500x375", help="WxH of generated images")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-proposals", type=int, default=setting("max_proposals"))
    p.add_argument("--batch-size", type=int, default=setting("batch_size"), help="proposals per forward")
    p.add_argument("--crf", nargs="+", default=[setting("crf"), NO_CRF], choices=[*sorted(CRF_PRESETS), NO_CRF])
    p.add_argument("--skip-sequential", action="store_true")
    p.add_argument("--work", default="/tmp/deconvnet-bench")
    p.add_argument("--out", default=bench_record.default_path("pipeline"))
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))

    import ray

    from pipeline.config import SegmentJobConfig
    from pipeline.job import run

    model_dir = os.path.join(args.work, f"model-{args.preset}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        cfg = preset(args.preset)
        save_model_dir(build_model(cfg), model_dir, ModelInfo(config=cfg))
    inference = {crf: for_mode(max_proposals=args.max_proposals, batch_size=args.batch_size, crf=crf)
                 for crf in args.crf}
    seg = Segmenter.from_model_dir(model_dir, inference[args.crf[0]].segmenter)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    results = []
    sizes = [args.images] + ([args.images * args.scale] if args.scale else [])
    # Every job first, then the in-process loops: the driver's memory during a job
    # must not carry what the sequential loop allocated in this same process.
    for crf in args.crf:
        for n in sizes:
            out = os.path.join(args.work, f"out-{n}-{crf}-{time.time_ns()}")
            sampler = RSSSampler()
            sampler.start()
            cfg = SegmentJobConfig(input=dataset(args.work, n, (h, w)), output=out, model=model_dir, crf=crf,
                                   max_proposals=args.max_proposals, batch_size=args.batch_size, incremental=False)
            t0 = time.perf_counter()
            record = run(cfg, log=lambda s: None)
            job_s = time.perf_counter() - t0
            sampler.stop()
            results.append({
                "images": n, "size": args.size, "preset": args.preset, "crf": crf, "max_proposals": args.max_proposals,
                "proposals_per_image": round(sum(record_proposals(out)) / n, 1), "device": str(seg.device),
                "machine": f"{platform.machine()} x{os.cpu_count()} cpu" if seg.device.type == "cpu"
                else torch.cuda.get_device_name(),
                "job_images_per_s": round(n / job_s, 3), "ok": record["counts"]["ok"],
                "sequential_images_per_s": None, "model_only_images_per_s": None,
                "driver_peak_rss_mib": round(sampler.peak_driver / 2**20),  # during the job only
                "workers_peak_rss_mib": round(sampler.peak_sum / 2**20),
                "largest_worker_peak_rss_mib": round(sampler.peak_one / 2**20),
            })
            print(json.dumps(results[-1]))
    # The same work at N in this process: a plain sequential loop, and the model alone.
    files = storage.list_files(dataset(args.work, args.images, (h, w)))
    for crf in args.crf:
        job = next(r for r in results if r["crf"] == crf and r["images"] == args.images)
        n = args.images
        if not args.skip_sequential:
            out = os.path.join(args.work, f"out-seq-{crf}-{time.time_ns()}")
            job["sequential_images_per_s"] = round(n / sequential(files, seg, inference[crf], out), 3)
        job["model_only_images_per_s"] = round(n / model_only(seg, int(job["proposals_per_image"] * n),
                                                              args.batch_size), 3)
        print(json.dumps(job))
    bench_record.append(args.out, results)
    print(f"\n{'N':>5} {'crf':>7} {'job img/s':>10} {'sequential':>11} {'model-only':>11} "
          f"{'workers MiB':>12} {'largest':>8} {'driver':>7}")
    for r in results:
        print(f"{r['images']:>5} {r['crf']:>7} {r['job_images_per_s']:>10} {r['sequential_images_per_s'] or '-':>11} "
              f"{r['model_only_images_per_s'] or '-':>11} {r['workers_peak_rss_mib']:>12} "
              f"{r['largest_worker_peak_rss_mib']:>8} {r['driver_peak_rss_mib']:>7}")
    ray.shutdown()
    return results


if __name__ == "__main__":
    main()
