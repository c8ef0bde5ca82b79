"""The segment job's driver at scale: its peak memory and CPU per labelled image
with 30k and 300k images labelled in one run, before and after segments and
large blocks; and the done-set read at 10 and 5,000 prediction parts on an S3
endpoint, before and after compaction.

    python bench/scale.py                                   # 30k and 300k, and the S3 part counts
    python bench/scale.py --images 10000 --parts 10         # a quick look
    python bench/scale.py --images 1000000 --parts          # 1M listed, 1% left to label

Objects: empty files with image suffixes under --work, 1,000 to a folder (made
once, kept). Each size and plan runs in its own process (so its peak RSS is
its own) with the stages replaced by no-ops that keep the batch contract: what
is measured is the listing, the done-set, Ray Data's plan and the driver, not
the model. Plan "now" calls the job's own `pipeline.job.run` twice: the first
run labels everything (above --full-max, all but 1 in 100 are seeded as done),
the second finds everything done (done-set lookups over the first run's parts,
compacted by the run itself). Plan "before" (up to --before-max images) is the
plan before segments and large blocks (`previous_plan`: one Dataset, blocks of
one actor batch, the driver making the Parquet rows), measured in the same
invocation after the same warm-up. Driver CPU is the process's user + system
time over all threads (resource.getrusage), per image labelled; its inverse
is the ceiling of images/s one driver core can feed.
Parts: a moto S3 server on 127.0.0.1 (as tests/conftest.py), N parts of
--part-rows rows; read as the job read them before (one after another), as it
reads them now (concurrently), and after compaction.
Prints a table and appends JSON lines to bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import types

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

import numpy as np

import record as bench_record  # bench/record.py: this script's folder is on sys.path

# ...and bench/pipeline.py would shadow the `pipeline` package: take the folder off again.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

PER_FOLDER = 1000


def make_inputs(work: str, n: int) -> str:
    """n empty image files, 1,000 to a folder; made once."""
    root = os.path.join(work, f"in-{n}")
    stamp = os.path.join(work, f"in-{n}.complete")
    if not os.path.exists(stamp):
        t0 = time.perf_counter()
        for i in range(n):
            folder = os.path.join(root, f"{i // PER_FOLDER:05d}")
            if i % PER_FOLDER == 0:
                os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"img_{i:08d}.jpg"), "wb"):
                pass
        with open(stamp, "w") as f:
            f.write(f"{time.perf_counter() - t0:.1f}")
    with open(stamp) as f:
        print(f"{n:,} files under {root} (made in {f.read()} s)", file=sys.stderr)
    return root


# --- no-op stages with the real stages' signatures and batch contract --------------


# Bytes of the decoded image each row carries from the read stage to the write stage
# (--payload-kib): as with real images, Ray Data then cuts the blocks between the
# stages by bytes (job.BLOCK_BYTES), not by the listing's rows.
PAYLOAD_BYTES = int(os.environ.get("SCALE_PAYLOAD_BYTES", "0"))


def _read_and_propose(batch, proposals, storage_options):
    if PAYLOAD_BYTES:
        batch["image"] = np.zeros((len(batch["image_uri"]), PAYLOAD_BYTES), np.uint8)
    return batch


class _SegmentActor:
    def __init__(self, **kwargs):
        pass

    def __call__(self, batch):
        return batch


def _refine(batch, crf):
    return batch


def _stage_rows(batch, num_classes, model_id, labelling_key, run_id) -> dict:
    from pipeline.rows import STAGE_COLUMNS

    n = len(batch["image_uri"])
    text = np.array([""] * n, dtype=object)
    made = {"mask_uri": text, "overlay_uri": text, "status": np.array(["ok"] * n, dtype=object), "error": text,
            "permanent": np.zeros(n, bool), "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32),
            "class_pixels": np.zeros((n, num_classes), np.int64), "mean_confidence": np.zeros(n, np.float32),
            "uncertainty": np.zeros(n, np.float32), "num_proposals": np.zeros(n, np.int32),
            "model_id": np.array([model_id] * n, dtype=object),
            "labelling_key": np.array([labelling_key] * n, dtype=object),
            "run_id": np.array([run_id] * n, dtype=object), "seconds": np.zeros(n)}
    return {k: made[k] if k in made else batch[k] for k in STAGE_COLUMNS}


def _write(batch, output, classes, palette, model_id, labelling_key, run_id, storage_options):
    """The write stage's contract: each row as it goes into Parquet (rows.SCHEMA)."""
    from pipeline.rows import table_from_batch

    return table_from_batch(_stage_rows(batch, len(classes), model_id, labelling_key, run_id), classes)


def _write_columns(batch, output, classes, palette, model_id, labelling_key, run_id, storage_options):
    """The write stage's contract before: the columns only; the driver made the rows."""
    return _stage_rows(batch, len(classes), model_id, labelling_key, run_id)


NOOP_STAGES = types.SimpleNamespace(read_and_propose=_read_and_propose, SegmentActor=_SegmentActor,
                                    refine=_refine, write=_write)
BEFORE_STAGES = types.SimpleNamespace(**{**vars(NOOP_STAGES), "write": _write_columns})


def model_dir(work: str) -> str:
    from deconvnet.model import build_model, preset
    from deconvnet.weights import ModelInfo, save_model_dir

    model = os.path.join(work, "model-tiny")
    if not os.path.exists(os.path.join(model, "config.json")):
        save_model_dir(build_model(preset("tiny")), model, ModelInfo(config=preset("tiny")))
    return model


def bench_config(root: str, out: str, work: str):
    """The job's config the runs below use: no CRF (the stages are no-ops anyway)."""
    from pipeline.config import SegmentJobConfig

    return SegmentJobConfig(input=root, output=out, model=model_dir(work), crf="none")


def seed_done(cfg, every: int) -> int:
    """As if earlier runs with `cfg`'s settings labelled every image of its input
    but one in `every`: one compacted part, written a row group at a time.
    Returns the images left to do."""
    import pyarrow.parquet as pq

    from deconvnet import storage
    from deconvnet.weights import read_model_info
    from pipeline import layout, rows
    from pipeline.job import labelling_of
    from pipeline.predictions import compaction

    labelling, left, chunk = labelling_of(cfg, read_model_info(cfg.model)), 0, []
    root, out = cfg.input, cfg.output
    path = layout.compacted_part_uri(out, "00000000T000000Z-seeded")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pq.ParquetWriter(path, rows.SCHEMA) as w:
        for i, f in enumerate(storage.iter_files_detail(root)):
            if i % every == 0:
                left += 1
            else:
                chunk.append(f)
            if len(chunk) == compaction.ROW_GROUP_ROWS:
                w.write_table(_rows(rows, [c.uri for c in chunk], "00000000T000000Z-seeded", labelling.model_id,
                                    [(c.size, c.version) for c in chunk], labelling.key))
                chunk = []
        if chunk:
            w.write_table(_rows(rows, [c.uri for c in chunk], "00000000T000000Z-seeded", labelling.model_id,
                                [(c.size, c.version) for c in chunk], labelling.key))
    return left


def _cpu_seconds() -> float:
    """CPU time of this process over all its threads (Ray's core worker threads too)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_size(n: int, work: str, out: str, plan: str) -> dict:
    """In this process: the job's runs over n listed objects (plan "now": a first
    run, then one finding everything done) or the plan before segments and
    large blocks ("before"); the driver's peak RSS and CPU."""
    import ray

    from pipeline.job import run

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = bench_config(os.path.join(work, f"in-{n}"), out, work)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"images": n, "plan": plan}
    previous_plan(cfg, limit=100)  # start Ray Data's workers, so no run below pays for it
    for name in ("first", "again") if plan == "now" else ("first",):
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        if plan == "now":
            record = run(cfg, log=lambda s: None, stage_fns=NOOP_STAGES)
            c = record["counts"]
            assert c["seen"] == n and c["ok"] + c["skipped"] == n and c["error"] == 0, c
            labelled, listing = c["ok"], record["listing"]
        else:
            labelled, listing = previous_plan(cfg), None
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        result[name] = {"seconds": round(seconds, 2), "driver_cpu_s": round(cpu, 2), "labelled": labelled,
                        "listing": listing, "per_listed_image_ms": round(1000 * seconds / n, 3),
                        "per_labelled_image_ms": round(1000 * seconds / labelled, 3) if labelled else None,
                        "driver_cpu_per_labelled_image_ms": round(1000 * cpu / labelled, 4) if labelled else None}
    result["driver_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["driver_rss_before_runs_mib"] = round(rss0 / 2**20)
    ray.shutdown()
    return result


def previous_plan(cfg, limit: int | None = None) -> int:
    """The plan before segments and large blocks, for comparison: the whole listing
    in one Dataset, blocks of one actor batch, the write stage returning columns
    and the driver making the Parquet rows (rows.table_from_batch), then writing
    them as the job does. Returns the rows labelled."""
    import dataclasses

    from deconvnet.weights import read_model_info
    from pipeline import job, layout, rows
    from pipeline.listing import Segment, Tally
    from pipeline.predictions.writer import PredictionWriter

    info, run_id = read_model_info(cfg.model), layout.new_run_id()
    every = dataclasses.replace(cfg, limit=limit, incremental=False)
    labelling = job.labelling_of(cfg, info)
    writer = PredictionWriter(os.path.join(cfg.output, "previous-plan"), run_id, cfg.rows_per_part)
    ds = job.listed(every, labelling, Tally.remote(), Segment(), run_id, rows_per_block=cfg.images_per_batch)
    ds = job.label(ds, every, info, labelling, run_id, BEFORE_STAGES)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(rows.table_from_batch(batch, info.classes))
    writer.flush()
    return writer.counts["ok"]


# --- the done-set read over many parts on S3 --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parts_bench(part_counts: list[int], part_rows: int) -> list[dict]:
    import logging

    import pyarrow.parquet as pq
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    from deconvnet import storage
    from pipeline import layout, rows
    from pipeline.predictions.compaction import compact
    from deconvnet.inference.modes import default_labelling_key
    from pipeline.predictions.done import DoneIndex, Labelling
    from pipeline.predictions.parts import visible_parts
    from pipeline.predictions.writer import PredictionWriter

    results = []
    try:
        for k in part_counts:
            output = f"s3://bench-{k}/labels"
            storage.url_to_fs(output)[0].mkdir(f"bench-{k}")
            t0 = time.perf_counter()
            for r in range(k):
                run_id = f"2026{r // 9000 + 1:02d}01T{r % 9000:06d}Z-{r:06d}"
                w = PredictionWriter(output, run_id, part_rows)
                w.add(_rows(rows, [f"s3://in/{r:05d}/{i:03d}.jpg" for i in range(part_rows)], run_id))
                w.flush()
            made = time.perf_counter() - t0

            def sequential() -> int:  # how the job read them before: one part after another
                done = {}
                for p in storage.list_files(layout.predictions_uri(output), [layout.PART_SUFFIX]):
                    t = pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=list(rows.DONE_COLUMNS))
                    for u, s, v in zip(t["image_uri"].to_pylist(), t["source_size"].to_pylist(),
                                       t["source_version"].to_pylist()):
                        done[u] = (s, v)
                return len(done)

            def now() -> int:  # the job's own done-set: concurrent reads, one full-range lookup
                index = DoneIndex(output, Labelling("bench-model", default_labelling_key("bench-model")))
                try:
                    return len(index.lookup("", "\U0010ffff"))
                finally:
                    index.close()

            row = {"parts": k, "rows_per_part": part_rows, "write_parts_s": round(made, 2)}
            row["sequential_s"], n_seq = _timed(sequential)
            row["concurrent_s"], n_now = _timed(now)
            t0 = time.perf_counter()
            compact(output)
            row["compact_s"] = round(time.perf_counter() - t0, 2)
            row["parts_after"] = len(visible_parts(output).all)
            row["after_compaction_s"], n_after = _timed(now)
            assert n_seq == n_now == n_after == k * part_rows, (n_seq, n_now, n_after)
            row["speedup_vs_sequential"] = round(row["sequential_s"] / row["after_compaction_s"], 1)
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    finally:
        server.stop()
    return results


def _timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return round(time.perf_counter() - t0, 3), n


def _rows(rows, uris: list[str], run_id: str, model_id: str = "bench-model", seen=None, key: str | None = None):
    from deconvnet.inference.modes import default_labelling_key

    n = len(uris)
    seen = seen or [(0, "etag")] * n
    batch = {"image_uri": uris, "mask_uri": [""] * n, "overlay_uri": [""] * n, "status": ["ok"] * n,
             "error": [""] * n, "permanent": [False] * n, "width": [1] * n, "height": [1] * n,
             "class_pixels": np.zeros((n, 2), np.int64), "mean_confidence": [0.0] * n, "uncertainty": [0.0] * n,
             "num_proposals": [0] * n,
             "source_size": [z for z, _ in seen], "source_version": [v for _, v in seen], "model_id": [model_id] * n,
             "labelling_key": [key or default_labelling_key(model_id)] * n, "run_id": [run_id] * n,
             "seconds": [0.0] * n}
    return rows.table_from_batch({k: np.asarray(v) for k, v in batch.items()}, ("background", "x"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="*", default=[30_000, 300_000])
    p.add_argument("--before-max", type=int, default=30_000,
                   help="also run the plan before segments and large blocks up to this many images")
    p.add_argument("--parts", type=int, nargs="*", default=[10, 5000])
    p.add_argument("--part-rows", type=int, default=20, help="rows per prediction part (an hourly run's new images)")
    p.add_argument("--full-max", type=int, default=300_000,
                   help="label every image up to this many; above, earlier runs (one seeded compacted part) "
                        "labelled all but 1 in 100, as for an hourly run over a large bucket")
    p.add_argument("--payload-kib", type=int, default=0,
                   help="bytes each row carries between the stages, as a decoded image does (549 for 500x375 RGB)")
    p.add_argument("--work", default="/tmp/deconvnet-scale")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, in this process
    p.add_argument("--plan", default="now", help=argparse.SUPPRESS)
    p.add_argument("--run-output", help=argparse.SUPPRESS)
    p.add_argument("--out", default=bench_record.default_path("scale"))
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    if args.one:
        print(json.dumps(one_size(args.one, args.work, args.run_output, args.plan)))
        return None
    machine = f"{platform.machine()} x{os.cpu_count()} cpu"
    sizes = []
    for n in args.images:
        root = make_inputs(args.work, n)
        for plan in ("before", "now") if n <= args.before_max else ("now",):
            out = os.path.join(args.work, f"out-{n}-{plan}-{time.time_ns()}")
            t0 = time.perf_counter()
            to_do = n if n <= args.full_max or plan == "before" else seed_done(bench_config(root, out, args.work), 100)
            seeded_s = round(time.perf_counter() - t0, 1) if to_do < n else None
            r = subprocess.run([sys.executable, __file__, "--one", str(n), "--plan", plan, "--work", args.work,
                                "--run-output", out], stdout=subprocess.PIPE, text=True, check=True,
                               env={**os.environ, "SCALE_PAYLOAD_BYTES": str(args.payload_kib * 1024)})
            sizes.append({**json.loads(r.stdout.strip().splitlines()[-1]), "to_do": to_do, "seeded_s": seeded_s,
                          "payload_kib": args.payload_kib,
                          "machine": machine, "kind": "driver", "load_average": os.getloadavg()})
            print(json.dumps(sizes[-1]), file=sys.stderr)
    parts = [{**r, "machine": machine, "kind": "done-set"} for r in parts_bench(args.parts, args.part_rows)]
    bench_record.append(args.out, sizes + parts)
    print(f"\n{'listed':>9} {'to do':>8} {'plan':>7} {'driver peak':>12} {'segments':>9} {'run s':>8} "
          f"{'wall ms/img':>12} {'driver CPU ms/img':>18} {'ceiling img/s':>14} | {'all done: s':>12} "
          f"{'done-set s':>11}")
    for r in sizes:
        f, a = r["first"], r.get("again")
        cpu = f["driver_cpu_per_labelled_image_ms"]
        print(f"{r['images']:>9,} {r['to_do']:>8,} {r['plan']:>7} {r['driver_peak_rss_mib']:>8} MiB "
              f"{(f['listing'] or {}).get('segments', 1):>9} {f['seconds']:>8} {f['per_labelled_image_ms']:>12} "
              f"{cpu:>18} {round(1000 / cpu) if cpu else '-':>14} | "
              f"{a['seconds'] if a else '-':>12} {a['listing']['done_set_seconds'] if a else '-':>11}")
    print(f"\n{'parts':>6} {'rows':>8} {'sequential s':>13} {'concurrent s':>13} {'compacted s':>12} "
          f"{'speed-up':>9} {'parts after':>12}")
    for r in parts:
        print(f"{r['parts']:>6} {r['parts'] * r['rows_per_part']:>8,} {r['sequential_s']:>13} {r['concurrent_s']:>13} "
              f"{r['after_compaction_s']:>12} {r['speedup_vs_sequential']:>8}x {r['parts_after']:>12}")
    return sizes, parts


if __name__ == "__main__":
    main()
