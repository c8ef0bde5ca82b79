"""The segment job's plan: a run is a sequence of segments (listing.Segment),
each listed to its end and then labelled by a Ray Data pipeline

    listing (a Dataset of one task: pages ─> windows ─> done-set ─> blocks; listing.py)
      ─> the segment's blocks, in the object store
    read_and_propose (CPU) ─> SegmentActor (actor pool, GPU) ─> refine (CPU) ─> write (CPU) ─> driver

(no refine with `crf_device` "gpu", where the actor runs the CRF, or without a CRF:
the actor hands labels to write). The write stage returns each row as it goes
into Parquet; the driver writes the parts and keeps counts and the part list.
The next segment is listed (a thread, run()) while one is labelled.

The first segment holds FIRST_SEGMENT_IMAGES images in blocks of one
segment-actor batch and stages whose blocks carry one image (BLOCK_BYTES), so
a small input spreads over every CRF task and reaches predictions/ a batch at
a time; then `segment_images` at a time, in blocks of BLOCK_ROWS and stage
blocks of up to STAGE_BLOCK_BYTES: Ray Data's cost, most of the driver's CPU,
is per block. The driver holds no list of the input, and what Ray Data keeps
per block lasts one segment: its memory does not grow with the bucket or the
run. Every resource setting of the job (batch sizes, GPUs, pool sizes, CRF
parallelism, the CRF's node type: CRF_RESOURCE) is here, and what a stop
request (SIGTERM, Ctrl-C: stopping.StopRequest) does to a run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from deconvnet import storage
from deconvnet.inference.modes import labelling_key
from deconvnet.records import now_iso, write_json
from deconvnet.weights import ModelInfo, read_model_info

from . import gallery, layout, rows, stages
from .config import SegmentJobConfig
from .listing import LISTING_CPUS, Segment, Tally, first_segment, list_todo
from .predictions.compaction import compact, needs_compaction
from .predictions.done import Labelling
from .predictions.parts import iter_latest, iter_rows
from .predictions.writer import PredictionWriter
from .stopping import StopRequest

BLOCK_BYTES = 256 * 2**10  # Ray Data's block target for the listing and the first segment: see listed()
STAGE_BLOCK_BYTES = 32 * 2**20  # ...and for the stages after it: see plan()
BLOCK_ROWS = 512  # listed rows per block after the first segment: see listed()
STREAMING_BUFFER_BLOCKS = 64  # blocks a task may yield ahead of its consumer: see listed()
# The custom resource of the nodes meant for the CRF (ray_cluster.yaml's CPU node type
# advertises one per CPU): the CRF stage asks for one when the cluster has such nodes.
CRF_RESOURCE = "crf"
# The DataContext is the process's, copied by each Dataset when it is made: the listing
# ahead (a thread) and the stages set theirs and make their Dataset under this lock.
_CONTEXT_LOCK = threading.Lock()


class JobFailed(RuntimeError):
    """The run stopped; what finished is recorded in runs/<run_id>.json."""


class JobStopped(JobFailed):
    """The run was asked to stop (SIGTERM, SIGINT): it flushed what it had, recorded
    `stopped`. `signal` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signal = signum


def list_segment(cfg: SegmentJobConfig, labelling: Labelling, tally, segment: Segment,
                 run_id: str) -> list[ray.ObjectRef]:
    """`segment`'s rows to label, listed to its end: its blocks, in the object store
    (run() lists the next segment while this one is labelled)."""
    with _CONTEXT_LOCK:
        ds = listed(cfg, labelling, tally, segment, run_id)
    return ds.to_arrow_refs()


def plan(blocks: list[ray.ObjectRef], segment: Segment, cfg: SegmentJobConfig, info: ModelInfo,
         labelling: Labelling, run_id: str, stage_fns=stages) -> ray.data.Dataset:
    """The Dataset labelling one segment's listed `blocks`. `stage_fns` holds the
    stages (bench/scale.py passes no-ops)."""
    with _CONTEXT_LOCK:
        # Past the first segment decoded images and maps travel a batch or more a block,
        # not one image: Ray Data's cost on the driver is per block.
        _set_data_context(BLOCK_BYTES if segment.first else STAGE_BLOCK_BYTES)
        return label(ray.data.from_arrow_refs(blocks), cfg, info, labelling, run_id, stage_fns)


def _set_data_context(block_bytes: int) -> None:
    """The DataContext the next Dataset copies when it is made (see listed())."""
    ctx = ray.data.DataContext.get_current()
    # A stage's exception reaches the driver as itself (RayTaskError.cause), not as
    # Ray Data's UserCodeException whose cause is lost on the way (see failure()).
    ctx.raise_original_map_exception = True
    ctx.target_max_block_size = block_bytes
    # Each task of the listing's split yields hundreds of small blocks; Ray Data lets a
    # task run only 2 blocks ahead of its consumer (a private setting, no public one
    # yet), which made the split the bottleneck: 25 instead of ~4 ms of overhead per
    # image (bench/scale.py, measured with one split task).
    if hasattr(ctx, "_max_num_blocks_in_streaming_gen_buffer"):
        ctx._max_num_blocks_in_streaming_gen_buffer = STREAMING_BUFFER_BLOCKS


def labelling_of(cfg: SegmentJobConfig, info: ModelInfo) -> Labelling:
    """The run's model and labelling key: its settings and models (the FCN-8s
    model's id read from its directory), what its rows hold and skip by."""
    fcn_id = read_model_info(cfg.fcn_model, cfg.storage_options).model_id if cfg.fcn_model else None
    return Labelling(info.model_id, labelling_key(cfg.inference_config(), info.model_id, fcn_id))


def block_rows(cfg: SegmentJobConfig, segment: Segment) -> int:
    """Rows per block of `segment`'s listing: one segment-actor batch in the first
    (it spreads a small input over every task and actor), BLOCK_ROWS after."""
    return cfg.images_per_batch if segment.first else max(cfg.images_per_batch, BLOCK_ROWS)


def listed(cfg: SegmentJobConfig, labelling: Labelling, tally, segment: Segment, run_id: str,
           rows_per_block: int | None = None) -> ray.data.Dataset:
    """The segment's rows to label (listing.TODO_SCHEMA), streamed from the listing
    in blocks of `rows_per_block` (block_rows())."""
    # Ray Data gathers what a task yields into blocks of up to target_max_block_size
    # bytes before passing them on: with the default 128 MiB, the listing's small rows
    # would leave only when it ends. At 256 KiB they leave in blocks of about 2,300
    # rows, so each task of the split below is short (it takes a whole CPU while it
    # runs: at 4 MiB, 37,000 rows a block, it held back the stages for seconds on 2
    # cores). In the first segment's stages (plan()) decoded images and maps then
    # travel one image a block, so a small input's CRF spreads over every task.
    _set_data_context(BLOCK_BYTES)  # a Dataset copies the context when it is made: set it first
    # The listing is one task (a generator over one seed row), pulled as the stages
    # downstream have room: the driver holds none of it.
    ds = ray.data.from_items([{"listing": 0}]).map_batches(
        list_todo, batch_size=None, batch_format="pyarrow", num_cpus=LISTING_CPUS, **_remote_env(),
        fn_kwargs={"cfg": cfg, "labelling": labelling, "tally": tally, "segment": segment, "run_id": run_id})
    # A streaming split, not a shuffle. Ray Data's cost is per block and operator, on
    # the driver (bench/scale.py): blocks of one actor batch cost it about 2 ms of CPU
    # an image with no-op stages, blocks of BLOCK_ROWS a fraction of that.
    return ds.repartition(target_num_rows_per_block=rows_per_block or block_rows(cfg, segment))


def label(ds: ray.data.Dataset, cfg: SegmentJobConfig, info: ModelInfo, labelling: Labelling, run_id: str,
          stage_fns=stages) -> ray.data.Dataset:
    """The stages over `ds`'s rows to label: one prediction row (rows.SCHEMA) out per row in."""
    opts = cfg.storage_options
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpus > 0)
    if cfg.gpu_actors:
        lo, hi = cfg.gpu_actors
    else:  # one actor per GPU up now (at least one); one CPU actor without GPUs
        lo = hi = max(1, int(gpus // cfg.gpus_per_actor)) if on_gpu else 1
    actor_resources = {"num_gpus": cfg.gpus_per_actor} if on_gpu else {"num_cpus": cfg.cpus_per_actor or 1}
    inference = cfg.inference_config()  # proposals, segmenter and CRF of --inference
    # The CRF on CPU workers (refine), or in the segment actor on its device: no map leaves it.
    actor_crf = inference.crf if cfg.crf_device == "gpu" else None
    with_crf = inference.crf is not None and actor_crf is None
    remote = _remote_env()
    # Reading and decoding wait on storage as much as they compute: half a CPU
    # each (writing too). The different request also keeps Ray from fusing them
    # into the segment actor, where they would stall the model.
    ds = ds.map_batches(stage_fns.read_and_propose, batch_size=cfg.images_per_batch, num_cpus=0.5, **remote,
                        fn_kwargs={"proposals": inference.proposals, "storage_options": opts})
    ds = ds.map_batches(
        stage_fns.SegmentActor, batch_size=cfg.images_per_batch,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        fn_constructor_kwargs={
            "model": cfg.model, "fcn_model": cfg.fcn_model,
            "config": inference.segmenter,
            "with_crf": with_crf, "crf": actor_crf,
            "cpu_threads": int(cfg.cpus_per_actor) if cfg.cpus_per_actor else None, "pool_size": hi,
            "storage_options": opts},
        # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1: a
        # lost actor is replaced and its batch retried; writes are idempotent.
        **actor_resources, **remote)
    # After the CRF, writing asks for what refine asks, so Ray fuses the two into one
    # task. Alone, it takes half a CPU: encoding a PNG takes milliseconds, the PUTs far
    # longer. With a whole one, reads (half) took every free CPU and rows reached the
    # driver only once all reading was done (no-op stages, 2 cores: the first row
    # after 15-25 s instead of 2-6 s).
    write_resources: dict[str, Any] = {"num_cpus": 0.5}
    if with_crf:
        write_resources = {"num_cpus": 1, "compute": ray.data.TaskPoolStrategy(size=cfg.crf_cpus)
                           if cfg.crf_cpus else None, **crf_node_resources()}
        ds = ds.map_batches(stage_fns.refine, batch_size=1, **write_resources, **remote,
                            fn_kwargs={"crf": inference.crf})
    ds = ds.map_batches(stage_fns.write, batch_size=cfg.images_per_batch, **write_resources, **remote, fn_kwargs={
        "output": cfg.output, "classes": info.classes, "palette": info.palette_array(),
        "model_id": info.model_id, "labelling_key": labelling.key, "run_id": run_id, "storage_options": opts})
    return ds


def crf_node_resources() -> dict[str, Any]:
    """What keeps the CRF (and the write fused with it) off the GPU nodes, whose CPUs
    read and decode for the GPUs: one CRF_RESOURCE per task when a node has it now or
    the autoscaler's node types (as KubeRay reports them) include one; nothing when
    none does (a laptop, the embedded Ray, a cluster without such nodes): any CPU."""
    if ray.cluster_resources().get(CRF_RESOURCE, 0) > 0:
        return {"resources": {CRF_RESOURCE: 1}}
    try:  # Ray Data reads the autoscaler's node types the same way; None without them
        limits = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - a private API: without it, only the nodes up now count
        limits = {}
    return {"resources": {CRF_RESOURCE: 1}} if limits.get(CRF_RESOURCE) else {}


def _remote_env() -> dict[str, Any]:
    """Options for every task and actor: the driver's storage retry budget, when set,
    holds in their workers too (Ray merges these env_vars with the job's runtime_env)."""
    env = {k: os.environ[k] for k in (storage.RETRY_SECONDS_ENV,) if k in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def run(cfg: SegmentJobConfig, log: Callable[[str], None] = print, stage_fns=stages,
        stop: StopRequest | None = None) -> dict[str, Any]:
    """Run the job; returns the run record (also written to runs/<run_id>.json).
    Raises FileNotFoundError / ValueError for a bad model before any work starts
    (the command line also checks the input), JobFailed when the run breaks off,
    and JobStopped when `stop` (or a KeyboardInterrupt) ends it: see StopRequest."""
    stop = stop or StopRequest()
    opts = cfg.storage_options
    info = read_model_info(cfg.model, opts)
    labelling = labelling_of(cfg, info)
    run_id = layout.new_run_id()
    record_uri = layout.run_record_uri(cfg.output, run_id)
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running", "started": now_iso(), "model_id": info.model_id,
        "labelling_key": labelling.key, "config": cfg.record(),
        "counts": {"seen": 0, "skipped": 0, "ok": 0, "error": 0},
    }
    log(f"run {run_id}: images under {cfg.input}" + (f", skipping those model {info.model_id} already labelled "
                                                      f"with these settings (key {labelling.key})"
                                                      if cfg.incremental else ""))
    writer = PredictionWriter(cfg.output, run_id, cfg.rows_per_part, opts, part_seconds=cfg.part_seconds)
    tally = Tally.remote()
    ahead = ThreadPoolExecutor(1, thread_name_prefix="listing")  # the next segment's listing
    t0 = time.perf_counter()
    try:
        write_json(record_uri, record, opts)  # "running": a killed run stays visible as one
        if needs_compaction(cfg.output, opts):  # before the done-set is read: few parts to read
            # In a task: the compactor holds up to compaction.MAX_ROWS rows, the driver stays small.
            with stop.waiting():
                record["compaction"] = ray.get(ray.remote(compact).options(num_cpus=1, **_remote_env()).remote(
                    cfg.output, opts))
        segment: Segment | None = first_segment(cfg)
        listing = ahead.submit(list_segment, cfg, labelling, tally, segment, run_id)
        while segment is not None:
            with stop.waiting():  # a stop request cuts the wait short: nothing half-added
                blocks = listing.result()
                after = ray.get(tally.next_segment.remote(segment.index))
            if after is not None:  # listed while this segment is labelled
                listing = ahead.submit(list_segment, cfg, labelling, tally, after, run_id)
            if blocks:
                ds = plan(blocks, segment, cfg, info, labelling, run_id, stage_fns)
                tables = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
                while True:
                    with stop.waiting():
                        table = next(tables, None)
                    if table is None:
                        break
                    writer.add(rows.conform(table, rows.SCHEMA))
                del ds, tables  # what Ray Data keeps of this segment goes with its Dataset
            segment, blocks = after, None  # the finished segment's listed blocks can go
        writer.flush()
        _count_listing(record, tally)
        if writer.counts["ok"] + writer.counts["error"] == 0:
            log("nothing new to label: no segmentation work done")
        if cfg.gallery:
            record["counts"].update(writer.counts)
            # In a task too: the page summarises every image's latest row.
            with stop.waiting():
                record["gallery_uri"] = ray.get(ray.remote(write_gallery).options(
                    num_cpus=1, **_remote_env()).remote(cfg, info, record))
        record["status"] = "completed"
    except KeyboardInterrupt as e:  # Stopped, or a plain Ctrl-C where no StopRequest is installed
        signum = stop.signum or signal.SIGINT
        record["status"], record["stopped_by"] = "stopped", signal.Signals(signum).name
        _flush_what_finished(record, writer, log)
        _count_listing(record, tally, timeout=2)  # quickly: `ray job stop` kills after a few seconds
        raise JobStopped(f"run {run_id} stopped by {record['stopped_by']} after "
                         f"{writer.counts['ok'] + writer.counts['error']} images ({len(writer.parts)} Parquet "
                         "parts saved); the next incremental run labels the rest", signum) from e
    except Exception as e:
        record["status"], record["error"] = "failed", failure(e)
        _flush_what_finished(record, writer, log)
        _count_listing(record, tally)
        raise JobFailed(f"run {run_id} failed after {writer.counts['ok'] + writer.counts['error']} images "
                        f"({len(writer.parts)} Parquet parts saved): {record['error']}") from e
    finally:
        elapsed = time.perf_counter() - t0
        record["counts"].update(writer.counts)
        record.update(ended=now_iso(), seconds=round(elapsed, 3), prediction_parts=writer.parts,
                      images_per_second=round((writer.counts["ok"] + writer.counts["error"]) / elapsed, 3)
                      if elapsed > 0 else None)
        try:
            record["record_uri"] = write_json(record_uri, record, opts)
        except Exception as e:  # storage gone: say what finished here instead
            log(f"could not write {record_uri} ({type(e).__name__}: {e}); the record: "
                f"{json.dumps({k: record.get(k) for k in ('status', 'error', 'counts', 'prediction_parts')})}")
            if record["status"] == "completed":
                raise JobFailed(f"run {run_id} labelled everything but could not write its record: "
                                f"{type(e).__name__}: {e}") from e
        ahead.shutdown(wait=False, cancel_futures=True)
        try:  # after the record: a stopped run has seconds before `ray job stop` kills it
            ray.kill(tally)
        except Exception:  # noqa: BLE001 - Ray itself going down (Ctrl-C reaches its processes too)
            pass
    return record


def _flush_what_finished(record: dict[str, Any], writer: PredictionWriter, log: Callable[[str], None]) -> None:
    """The rows received, written: what finished stays finished, the next incremental run skips it."""
    try:
        writer.flush()
    except Exception as flush_error:  # storage down: those rows are redone next run
        record["unsaved_rows"] = writer.pending
        log(f"could not write the last {writer.pending} rows: {type(flush_error).__name__}: {flush_error}")


def _count_listing(record: dict[str, Any], tally, timeout: float = 60) -> None:
    """The listing's counts (seen, skipped) and times, from its tally actor."""
    try:
        listed = ray.get(tally.totals.remote(), timeout=timeout)
    except Exception:  # noqa: BLE001 - the run's own error matters more; counts stay as they were
        return
    record["counts"].update(seen=int(listed["seen"]), skipped=int(listed["skipped"]))
    record["listing"] = {"segments": int(listed["segments"]), "windows": int(listed["windows"]),
                         "seconds": round(listed["listing_seconds"], 3),
                         "done_set_seconds": round(listed["done_seconds"], 3)}


def failure(e: BaseException) -> str:
    """'Type: message' (one line) of what really went wrong.

    A stage's exception reaches the driver as a RayTaskError whose `cause` is
    the exception the stage raised, because plan() sets Ray Data's
    `raise_original_map_exception` (Ray Data appends its retry note on later
    lines: the first line is the message). Without that flag Ray Data wraps it
    in a UserCodeException and the original's type survives only as text in
    the traceback Ray formats; that text is the fallback, for a Dataset built
    elsewhere."""
    while isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        if isinstance(e.cause, ray.exceptions.UserCodeException):
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).rsplit("The above exception was the direct cause", 1)[0]
            raised = [line for line in text.splitlines() if re.match(r"[A-Za-z_][\w.]*: ", line)]
            if raised:
                return raised[-1]
        e = e.cause
    if not isinstance(e, ray.exceptions.RayError):
        while e.__cause__ is not None:
            e = e.__cause__
    message = str(e).strip().splitlines()
    return f"{type(e).__name__}: {message[0] if message else ''}"


def write_gallery(cfg: SegmentJobConfig, info: ModelInfo, run: dict[str, Any]) -> str:
    """index.html over every image under the output (the latest row of each), so the
    page shows the whole output even after a run that labelled nothing new. The rows
    stream by in bounded batches (parts.iter_latest): memory does not grow with them."""
    latest = iter_latest(cfg.output, list(gallery.COLUMNS), cfg.storage_options)
    summary = gallery.summarize((r for table in latest for r in iter_rows(table)), cfg.gallery_size)
    page = gallery.render(summary, output=cfg.output, classes=info.classes, palette=info.palette_array(), run=run)
    uri = layout.gallery_uri(cfg.output)
    storage.write_bytes(uri, page.encode("utf-8", "replace"), cfg.storage_options)
    return uri
