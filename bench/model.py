"""Forward-pass throughput of DeconvNet: proposals/s and achieved TFLOP/s.

    python bench/model.py --preset tiny --batch-size 1
    python bench/model.py --preset paper --batch-size 1 --iters 5
    python bench/model.py --preset paper --batch-size 64 --dtype bf16 --channels-last   # on a GPU
    python bench/model.py --preset paper --batch-size 64 --dtype bf16 --channels-last --compile

Warm-up iterations are not timed; on CUDA each timed region ends with a
synchronize. Prints one line of figures and appends a JSON record to
bench/results/model.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import record  # bench/record.py: this script's folder is on sys.path
from deconvnet.model import PRESETS, build_model, macs_per_proposal

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, for the "of limit" column.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def device_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=[k for k in PRESETS if PRESETS[k].arch == "deconvnet"], default="tiny")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--size", type=int, default=224, help="proposal side (the paper: 224)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=record.default_path("model"))
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.iters < 1:
        p.error("--batch-size and --iters must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = PRESETS[args.preset]
    model = build_model(config).eval().to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device).to(memory_format=fmt)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)

    sec = statistics.median(times)
    flop = 2 * macs_per_proposal(config, args.size)
    rate = args.batch_size / sec
    tflops = rate * flop / 1e12
    peak = device_peak(device, dtype)
    rec = {
        "preset": args.preset, "batch_size": args.batch_size, "size": args.size, "dtype": args.dtype,
        "channels_last": args.channels_last, "compile": args.compile, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "ms_per_batch": round(sec * 1e3, 3), "ms_per_batch_min": round(min(times) * 1e3, 3),
        "proposals_per_s": round(rate, 2), "gflop_per_proposal": round(flop / 1e9, 2),
        "tflops": round(tflops, 3), "peak_tflops": peak,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    limit = f" of {peak:.0f} ({100 * tflops / peak:.1f}%)" if peak else ""
    return record.report(args.out, rec, f"{args.preset} {args.dtype}{' channels_last' if args.channels_last else ''}"
                         f"{' compiled' if args.compile else ''} batch {args.batch_size} on {rec['device_name']}: "
                         f"{rec['ms_per_batch']:.1f} ms/batch (median of {args.iters}), "
                         f"{rate:.1f} proposals/s, {tflops:.2f} TFLOP/s{limit}")


if __name__ == "__main__":
    main()
