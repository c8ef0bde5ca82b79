"""Segment every image under a URI with DeconvNet: PNG label maps + Parquet.

On a cluster (see ray_cluster.yaml):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/segment_dataset.py --input s3://bucket/images/ \\
        --output s3://bucket/labels/ --model s3://bucket/models/deconvnet/

On a laptop (no cluster address: an embedded local Ray is started):

    python jobs/segment_dataset.py --input photos/ --output labels/ --model models/tiny

Run again with the same --output, it labels only what is new or changed
(--incremental, the default). S3 endpoints and credentials come from the usual
AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or --storage-option.
Exit codes: 0 done (errors are rows in the output), 1 the run failed (or
--fail-on-error and an input was bad), 2 a bad argument.
"""

from __future__ import annotations

import argparse
import os
import sys


from deconvnet import storage
from deconvnet.cli import add_storage_option_arg, storage_options_from
from deconvnet.crf import CRF_PRESETS
from deconvnet.proposals import PROPOSAL_METHODS, ProposalConfig
from deconvnet.segmenter import AGGREGATES, ENSEMBLES
from deconvnet.weights import check_model_dir
from pipeline.config import IMAGE_SUFFIXES, SegmentJobConfig


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _actors(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segment_dataset.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="prefix or single image, any fsspec URI or local path")
    p.add_argument("--output", required=True, help="where masks/, predictions/ and runs/ go")
    p.add_argument("--model", required=True, help="DeconvNet model directory (model.safetensors + config.json)")
    p.add_argument("--fcn-model", help="FCN-8s model directory: combine with it (EDeconvNet)")
    p.add_argument("--ensemble", choices=ENSEMBLES, default="mean",
                   help="EDeconvNet rule: mean of probabilities (paper) or product (original code)")
    p.add_argument("--proposals", choices=sorted(PROPOSAL_METHODS), default="grid", help="proposal generator")
    p.add_argument("--edge-model", help="structured-edge model file for --proposals edgeboxes")
    p.add_argument("--max-proposals", type=int, default=50, help="boxes per image (+ the whole image)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="max", help="merge of proposal maps")
    p.add_argument("--crf", choices=[*sorted(CRF_PRESETS), "none"], default="paper", help="dense CRF preset")
    p.add_argument("--crf-max-side", type=_positive, help="run the CRF on at most this longer side")
    p.add_argument("--batch-size", type=_positive, default=32, help="proposals per forward pass")
    p.add_argument("--images-per-batch", type=_positive, default=8, help="images per segment-actor call")
    p.add_argument("--gpu-actors", type=_actors, help="segment actors, N or MIN-MAX (default: one per GPU)")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="where segment actors run; auto: GPUs if the cluster has any now (an autoscaling "
                        "cluster at zero GPU nodes needs 'gpu', which asks the autoscaler for them)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs each segment actor holds")
    p.add_argument("--cpus-per-actor", type=float,
                   help="CPUs reserved (= torch threads) per actor without GPU (default: reserve 1, "
                        "use the node's cores shared among the pool)")
    p.add_argument("--crf-cpus", type=_positive, help="CRF tasks at once (default: every free CPU)")
    p.add_argument("--limit", type=_positive, help="only the first N images (sorted by URI)")
    p.add_argument("--incremental", action=argparse.BooleanOptionalAction, default=True,
                   help="skip images this model already labelled under --output")
    p.add_argument("--overlays", action="store_true", help="also write overlays/<path>.jpg")
    p.add_argument("--gallery", action="store_true",
                   help="write index.html: a sample of images with overlays, classes and confidences, "
                        "and a per-class pixel chart of the whole output")
    p.add_argument("--gallery-size", type=_positive,
                   help=f"images in the gallery's sample; {SegmentJobConfig.gallery_size} when not given")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any image is an error row")
    p.add_argument("--part-rows", type=_positive, default=SegmentJobConfig.rows_per_part,
                   help="Parquet rows per predictions/ part (a part is also written every "
                        f"{SegmentJobConfig.part_seconds:g} s); a killed run keeps every part it wrote")
    add_storage_option_arg(p)
    return p


def parse_config(argv: list[str] | None = None) -> SegmentJobConfig:
    """Parse and check everything that can be checked before work starts; a
    problem is parser.error: one line, exit code 2."""
    parser = build_parser()
    a = parser.parse_args(argv)
    opts = storage_options_from(parser, a.storage_option)
    if a.gallery_size is not None and not a.gallery:
        parser.error("--gallery-size needs --gallery")
    try:
        ProposalConfig(method=a.proposals, max_proposals=a.max_proposals, edge_model=a.edge_model)
    except ValueError as e:
        parser.error(str(e))
    for flag, uri, arch in (("--model", a.model, "deconvnet"), ("--fcn-model", a.fcn_model, "fcn8s")):
        if uri is None:
            continue
        try:
            info = check_model_dir(uri, opts)  # the weights fit the config, before any image
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"{flag}: {e}")
        if info.config.arch != arch:
            parser.error(f"{flag}: {uri} holds a {info.config.arch} model, expected {arch}")
    try:
        found = storage.list_files(a.input, IMAGE_SUFFIXES, opts)
    except FileNotFoundError:
        parser.error(f"--input: nothing at {a.input}")
    except (OSError, ValueError) as e:  # unreachable endpoint, bad credentials, bad URI
        parser.error(f"--input: cannot list {a.input}: {type(e).__name__}: {e}")
    if not found:
        parser.error(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) under {a.input}")
    return SegmentJobConfig(
        input=a.input, output=a.output, model=a.model, fcn_model=a.fcn_model, ensemble=a.ensemble,
        proposals=a.proposals, edge_model=a.edge_model, max_proposals=a.max_proposals, aggregate=a.aggregate,
        crf=a.crf, crf_max_side=a.crf_max_side, batch_size=a.batch_size, images_per_batch=a.images_per_batch,
        gpu_actors=a.gpu_actors, device=a.device, gpus_per_actor=a.gpus_per_actor, cpus_per_actor=a.cpus_per_actor,
        crf_cpus=a.crf_cpus, limit=a.limit, incremental=a.incremental, overlays=a.overlays,
        gallery=a.gallery, fail_on_error=a.fail_on_error, rows_per_part=a.part_rows, storage_options=opts,
        **({"gallery_size": a.gallery_size} if a.gallery_size else {}))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pipeline.job import JobFailed, run

    # RAY_ADDRESS (set by `ray job submit`) joins the cluster; without it, an
    # embedded local Ray starts, whose workers inherit this environment.
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    try:
        record = run(cfg)
    except JobFailed as e:
        print(f"segment_dataset: {e}", file=sys.stderr)
        return 1
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
