"""The segment job's plan: list on the driver, then a Ray Data pipeline

    from_items ─> load (CPU) ─> Segment (actor pool, GPU) ─> refine (CPU) ─> write (CPU) ─> driver

and Parquet parts written by the driver as results stream back. Every resource
setting of the job (batch sizes, GPUs, pool sizes, CRF parallelism) is here.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from deconvnet import storage
from deconvnet.crf import crf_config
from deconvnet.proposals import ProposalConfig
from deconvnet.segmenter import SegmenterConfig
from deconvnet.records import now_iso
from deconvnet.weights import ModelInfo, read_model_info

from . import gallery, stages
from .config import IMAGE_SUFFIXES, SegmentJobConfig
from .outputs import (PredictionWriter, input_root, iter_rows, latest_rows, new_run_id, read_done, read_predictions,
                      relative_key, write_run_record)


class JobFailed(RuntimeError):
    """The run stopped; what finished is recorded in runs/<run_id>.json."""


def plan(cfg: SegmentJobConfig, todo: list[dict[str, Any]], info: ModelInfo, run_id: str) -> ray.data.Dataset:
    opts = cfg.storage_options
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpus > 0)
    if cfg.gpu_actors:
        lo, hi = cfg.gpu_actors
    else:  # one actor per GPU up now (at least one); one CPU actor without GPUs
        lo = hi = max(1, int(gpus // cfg.gpus_per_actor)) if on_gpu else 1
    actor_resources = {"num_gpus": cfg.gpus_per_actor} if on_gpu else {"num_cpus": cfg.cpus_per_actor or 1}
    with_crf = cfg.crf != "none"
    # The driver's storage retry budget, when set, holds in every stage's workers too
    # (Ray merges these env_vars with the job's own runtime_env).
    env = {k: os.environ[k] for k in (storage.RETRY_SECONDS_ENV,) if k in os.environ}
    remote = {"runtime_env": {"env_vars": env}} if env else {}

    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), len(todo) // cfg.images_per_batch)))
    proposals = ProposalConfig(method=cfg.proposals, max_proposals=cfg.max_proposals, edge_model=cfg.edge_model)
    # Reading and decoding wait on storage as much as they compute: half a CPU
    # each. The different request also keeps Ray from fusing them into the
    # segment actor, where they would stall the model.
    ds = ds.map_batches(stages.load, batch_size=cfg.images_per_batch, num_cpus=0.5, **remote,
                        fn_kwargs={"proposals": proposals, "storage_options": opts})
    ds = ds.map_batches(
        stages.Segment, batch_size=cfg.images_per_batch,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        fn_constructor_kwargs={
            "model": cfg.model, "fcn_model": cfg.fcn_model,
            "config": SegmenterConfig(batch_size=cfg.batch_size, aggregate=cfg.aggregate, ensemble=cfg.ensemble),
            "with_crf": with_crf,
            "cpu_threads": int(cfg.cpus_per_actor) if cfg.cpus_per_actor else None, "pool_size": hi,
            "storage_options": opts},
        # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1: a
        # lost actor is replaced and its batch retried; writes are idempotent.
        **actor_resources, **remote)
    if with_crf:
        crf = crf_config(cfg.crf, max_side=cfg.crf_max_side)
        ds = ds.map_batches(stages.refine, batch_size=1, num_cpus=1, **remote,
                            compute=ray.data.TaskPoolStrategy(size=cfg.crf_cpus) if cfg.crf_cpus else None,
                            fn_kwargs={"crf": crf})
    ds = ds.map_batches(stages.write, batch_size=cfg.images_per_batch, num_cpus=1, **remote, fn_kwargs={
        "output": cfg.output, "num_classes": info.config.num_classes, "palette": info.palette_array(),
        "model_id": info.model_id, "run_id": run_id, "storage_options": opts})
    return ds


def _rows(batch: dict[str, np.ndarray], classes: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(batch["image_uri"])):
        pixels = [int(v) for v in batch["class_pixels"][i]]
        rows.append({
            "image_uri": str(batch["image_uri"][i]), "mask_uri": str(batch["mask_uri"][i]),
            "overlay_uri": str(batch["overlay_uri"][i]), "status": str(batch["status"][i]),
            "error": str(batch["error"][i]), "permanent": bool(batch["permanent"][i]),
            "width": int(batch["width"][i]), "height": int(batch["height"][i]),
            "classes": [classes[k] for k, v in enumerate(pixels) if v],
            "class_pixels": pixels, "mean_confidence": float(batch["mean_confidence"][i]),
            "num_proposals": int(batch["num_proposals"][i]), "source_size": int(batch["source_size"][i]),
            "source_version": str(batch["source_version"][i]), "model_id": str(batch["model_id"][i]),
            "run_id": str(batch["run_id"][i]), "seconds": float(batch["seconds"][i]),
        })
    return rows


def run(cfg: SegmentJobConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job; returns the run record (also written to runs/<run_id>.json).
    Raises FileNotFoundError / ValueError for bad inputs before any work starts,
    and JobFailed when the run breaks off."""
    opts = cfg.storage_options
    info = read_model_info(cfg.model, opts)
    files = storage.list_files_detail(cfg.input, IMAGE_SUFFIXES, opts)
    root = input_root(cfg.input, is_file=len(files) == 1 and files[0].uri == cfg.input)
    if cfg.limit is not None:
        files = files[: cfg.limit]
    done = read_done(cfg.output, info.model_id, opts) if cfg.incremental else {}
    # Overlays for every image with --overlays; with --gallery, for the images it will show.
    shown = gallery.sample([f.uri for f in files], cfg.gallery_size) if cfg.gallery else set()
    todo = [{"image_uri": f.uri, "rel": relative_key(f.uri, root), "source_size": f.size,
             "source_version": f.version, "overlay": cfg.overlays or f.uri in shown}
            for f in files if done.get(f.uri) != (f.size, f.version)]
    run_id = new_run_id()
    record: dict[str, Any] = {
        "run_id": run_id, "status": "running", "started": now_iso(), "model_id": info.model_id,
        "config": cfg.record(), "counts": {"seen": len(files), "skipped": len(files) - len(todo), "ok": 0, "error": 0},
    }
    log(f"run {run_id}: {len(files)} images under {cfg.input}, {len(todo)} to label, "
        f"{len(files) - len(todo)} already labelled by model {info.model_id}")
    writer = PredictionWriter(cfg.output, run_id, cfg.rows_per_part, opts, part_seconds=cfg.part_seconds)
    t0 = time.perf_counter()
    try:
        write_run_record(cfg.output, run_id, record, opts)  # "running": a killed run stays visible as one
        if todo:
            for batch in plan(cfg, todo, info, run_id).iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(_rows(batch, info.classes))
        else:
            log("nothing new to label: no segmentation work done")
        writer.flush()
        if cfg.gallery:
            record["counts"].update(writer.counts)
            record["gallery_uri"] = write_gallery(cfg, info, record)
        record["status"] = "completed"
    except Exception as e:
        record["status"], record["error"] = "failed", failure(e)
        try:
            writer.flush()  # what finished stays finished: the next incremental run skips it
        except Exception as flush_error:  # storage down: those rows are redone next run
            record["unsaved_rows"] = len(writer.rows)
            log(f"could not write the last {len(writer.rows)} rows: {type(flush_error).__name__}: {flush_error}")
        raise JobFailed(f"run {run_id} failed after {writer.counts['ok'] + writer.counts['error']} images "
                        f"({len(writer.parts)} Parquet parts saved): {record['error']}") from e
    finally:
        elapsed = time.perf_counter() - t0
        record["counts"].update(writer.counts)
        record.update(ended=now_iso(), seconds=round(elapsed, 3), prediction_parts=writer.parts,
                      images_per_second=round((writer.counts["ok"] + writer.counts["error"]) / elapsed, 3)
                      if elapsed > 0 else None)
        try:
            record["record_uri"] = write_run_record(cfg.output, run_id, record, opts)
        except Exception as e:  # storage gone: say what finished here instead
            log(f"could not write runs/{run_id}.json ({type(e).__name__}: {e}); the record: "
                f"{json.dumps({k: record.get(k) for k in ('status', 'error', 'counts', 'prediction_parts')})}")
            if record["status"] == "completed":
                raise JobFailed(f"run {run_id} labelled everything but could not write its record: "
                                f"{type(e).__name__}: {e}") from e
    return record


def failure(e: BaseException) -> str:
    """'Type: message' of what really went wrong. A stage's exception reaches
    the driver only as text inside Ray Data's UserCodeException (the object
    itself is not kept), so it is read back from that text."""
    if isinstance(e, ray.exceptions.RayTaskError):
        # The stage's chain, then "...direct cause of..." Ray's own wrapper: keep the former.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).rsplit("The above exception was the direct cause", 1)[0]
        raised = [line for line in text.splitlines() if re.match(r"[A-Za-z_][\w.]*: ", line)]
        if raised:
            return raised[-1]
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


def write_gallery(cfg: SegmentJobConfig, info: ModelInfo, run: dict[str, Any]) -> str:
    """index.html over every image under --output (the latest row of each), so the
    page shows the whole output even after a run that labelled nothing new."""
    rows = latest_rows(read_predictions(cfg.output, list(gallery.COLUMNS), cfg.storage_options))
    summary = gallery.summarize(iter_rows(rows), cfg.gallery_size)
    page = gallery.render(summary, output=cfg.output, classes=info.classes, palette=info.palette_array(), run=run)
    uri = storage.join(cfg.output, "index.html")
    storage.write_bytes(uri, page.encode("utf-8", "replace"), cfg.storage_options)
    return uri
