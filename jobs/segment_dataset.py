"""Segment every image under a URI with DeconvNet: PNG label maps + Parquet.

On a cluster (see ray_cluster.yaml):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/segment_dataset.py --input s3://bucket/images/ \\
        --output s3://bucket/labels/ --model s3://bucket/models/deconvnet/

On a laptop (no cluster address: an embedded local Ray is started):

    python jobs/segment_dataset.py --input photos/ --output labels/ --model models/tiny

Run again with the same --output, it labels only what is new or changed
(--incremental, the default), or everything again after a change of the model
or of a setting that changes masks (--crf, --inference, --proposals, ...).
S3 endpoints and credentials come from the usual AWS variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or --storage-option.
Exit codes: 0 done (errors are rows in the output), 1 the run failed (or
--fail-on-error and an input was bad), 2 a bad argument, 143 / 130 stopped by
SIGTERM (`ray job stop`) / Ctrl-C after recording what finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading

from deconvnet import storage
from deconvnet.cli import (Flag, add_flags, add_storage_option_arg, config_error, flag, inference_flags,
                           storage_options_from)
from deconvnet.weights import check_model_dir
from pipeline.config import CRF_DEVICES, IMAGE_SUFFIXES, SegmentJobConfig

DEFAULTS = {f.name: f.default for f in dataclasses.fields(SegmentJobConfig) if f.default is not dataclasses.MISSING}


def _actors(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def flags() -> list[Flag]:
    """Every option and the SegmentJobConfig field it sets; defaults are the
    config's own, or the mode table's (values are checked by the config).
    part_seconds has no flag; --storage-option is added beside these."""
    d = DEFAULTS
    return [
        flag("--input", required=True, help="prefix or single image, any fsspec URI or local path"),
        flag("--output", required=True, help="where masks/, predictions/ and runs/ go"),
        flag("--model", required=True, help="DeconvNet model directory (model.safetensors + config.json)"),
        *inference_flags(),
        flag("--images-per-batch", type=int, default=d["images_per_batch"], help="images per segment-actor call"),
        flag("--gpu-actors", type=_actors, help="segment actors, N or MIN-MAX (default: one per GPU)"),
        flag("--device", choices=["auto", "gpu", "cpu"], default=d["device"],
             help="where segment actors run; auto: GPUs if the cluster has any now (an autoscaling "
                  "cluster at zero GPU nodes needs 'gpu', which asks the autoscaler for them)"),
        flag("--gpus-per-actor", type=float, default=d["gpus_per_actor"], help="GPUs each segment actor holds"),
        flag("--cpus-per-actor", type=float,
             help="CPUs reserved (= torch threads) per actor without GPU (default: reserve 1, "
                  "use the node's cores shared among the pool)"),
        flag("--crf-cpus", type=int, help="CRF tasks at once (default: every free CPU)"),
        flag("--crf-device", choices=list(CRF_DEVICES), default=d["crf_device"],
             help="where the CRF runs: cpu, in CPU tasks (pydensecrf); gpu, in the segment actor "
                  "after the merge (the torch engine on the actor's device), so no probability "
                  "map leaves the GPU node and no CRF tasks run"),
        flag("--limit", type=int, help="only the first N images (sorted by URI)"),
        flag("--incremental", action=argparse.BooleanOptionalAction, default=d["incremental"],
             help="skip images this model already labelled with these settings under --output"),
        flag("--overlays", action="store_true", help="also write overlays/<path>.jpg"),
        flag("--gallery", action="store_true",
             help="write index.html: a sample of images with overlays, classes and confidences, "
                  "and a per-class pixel chart of the whole output"),
        flag("--gallery-size", type=int, help=f"images in the gallery's sample; {d['gallery_size']} when not given"),
        flag("--fail-on-error", action="store_true", help="exit 1 if any image is an error row"),
        flag("--part-rows", "rows_per_part", type=int, default=d["rows_per_part"], metavar="PART_ROWS",
             help="Parquet rows per predictions/ part (a part is also written every "
                  f"{d['part_seconds']:g} s); a killed run keeps every part it wrote"),
        flag("--segment-images", type=int, default=d["segment_images"],
             help="images labelled per Ray Dataset: a larger run goes on in segments of this many, each "
                  "listing on after the last, so the driver's memory does not grow with the run"),
    ]


def parser_and_flags() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and its {config field: flag} map."""
    p = argparse.ArgumentParser(prog="segment_dataset.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return p, {**add_flags(p, flags()), **add_storage_option_arg(p)}


def build_parser() -> argparse.ArgumentParser:
    return parser_and_flags()[0]


def parse_config(argv: list[str] | None = None) -> SegmentJobConfig:
    """Parse and check everything that can be checked before work starts; a
    problem is parser.error: one line, exit code 2."""
    parser, flag_of = parser_and_flags()
    a = parser.parse_args(argv)
    values = {name: value for name, value in vars(a).items() if name in flag_of}
    values["storage_options"] = opts = storage_options_from(parser, a.storage_option)
    try:
        cfg = SegmentJobConfig(**{k: v for k, v in values.items() if v is not None})  # None: the default
    except ValueError as e:
        parser.error(config_error(e, flag_of))
    if a.gallery_size is not None and not a.gallery:
        parser.error("--gallery-size needs --gallery")
    for flag, uri, arch in (("--model", cfg.model, "deconvnet"), ("--fcn-model", cfg.fcn_model, "fcn8s")):
        if uri is None:
            continue
        try:
            info = check_model_dir(uri, opts)  # the weights fit the config, before any image
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"{flag}: {e}")
        if info.config.arch != arch:
            parser.error(f"{flag}: {uri} holds a {info.config.arch} model, expected {arch}")
    try:  # the first image only: the run itself lists the input, once, as a stream
        first = next(storage.iter_files_detail(cfg.input, IMAGE_SUFFIXES, opts), None)
    except FileNotFoundError:
        parser.error(f"--input: nothing at {cfg.input}")
    except (OSError, ValueError) as e:  # unreachable endpoint, bad credentials, bad URI
        parser.error(f"--input: cannot list {cfg.input}: {type(e).__name__}: {e}")
    if first is None:
        parser.error(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) under {cfg.input}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pipeline.job import JobFailed, JobStopped, run
    from pipeline.stopping import StopRequest

    # RAY_ADDRESS (set by `ray job submit`) joins the cluster; without it, an
    # embedded local Ray starts, whose workers inherit this environment.
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    # After ray.init, which sets its own SIGTERM handler: `ray job stop`, SIGTERM and
    # Ctrl-C flush what finished and record `stopped` (exit 128 + the signal's number).
    stop = StopRequest().install() if threading.current_thread() is threading.main_thread() else None
    try:
        record = run(cfg, stop=stop)
    except JobStopped as e:
        print(f"segment_dataset: {e}", file=sys.stderr)
        return 128 + e.signal
    except JobFailed as e:
        print(f"segment_dataset: {e}", file=sys.stderr)
        return 1
    finally:
        if stop:
            stop.restore()
    c = record["counts"]
    print(f"done: {c['ok']} ok, {c['error']} errors, {c['skipped']} skipped of {c['seen']} images "
          f"in {record['seconds']:.1f} s ({record['images_per_second'] or 0:.2f} images/s)")
    print(f"masks: {storage.join(cfg.output, 'masks')}  predictions: {storage.join(cfg.output, 'predictions')}  "
          f"record: {record['record_uri']}")
    if "gallery_uri" in record:
        print(f"gallery: {record['gallery_uri']}")
    if c["error"]:
        print(f"{c['error']} images could not be labelled: see the rows with status='error' in predictions/")
    return 1 if cfg.fail_on_error and c["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
