"""Export the segment job's labels for an annotation tool or a training set.

    python jobs/export_labels.py --labels s3://bucket/labels/ --format label-studio --to s3://bucket/exports/ls/

On a cluster, shards go out as Ray tasks (RAY_ADDRESS, set by `ray job submit`, joins it):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/export_labels.py --labels s3://bucket/labels/ --format huggingface --to s3://bucket/hf/

Without RAY_ADDRESS no Ray starts: the shards are written one after another
here, each reading its masks concurrently.

--labels is the segment job's --output: each image's latest row with a mask
is exported (pipeline/export/selection.py). The formats:

    label-studio  tasks-NNNNN.json (tasks with brush predictions) and label_config.xml
    cvat          masks-NNNNN.zip, each a "Segmentation mask 1.1" import
    huggingface   data/train-NNNNN-of-NNNNN.parquet (Image features) and id2label.json

<to>/manifest.json, written last, lists the shards, the filters, the model and
labelling runs, counts, and every image an error left out (a missing or
unreadable mask). A rerun to the same --to replaces the export whole.
Exit codes: 0 exported, 1 some images left out (see the manifest's errors) or
storage failed, 2 a bad argument or nothing labelled under --labels (one line
on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys

from deconvnet.cli import Flag, add_flags, add_storage_option_arg, config_error, flag, storage_options_from
from pipeline.export.driver import SHARD_SIZE, WORKERS, ExportConfig, describe, run_export
from pipeline.export.selection import ORDER_COLUMN, Filters
from pipeline.export.shards import FORMATS


def export_flags() -> list[Flag]:
    """The command's options, each with the config field it sets (ExportConfig's, Filters')."""
    return [
        flag("--labels", required=True, metavar="URI", help="the segment job's --output"),
        flag("--format", required=True, choices=list(FORMATS)),
        flag("--to", required=True, metavar="URI", help="where the export goes (a folder or prefix)"),
        flag("--classes", metavar="NAME,...", help="only images whose mask holds at least one of these classes"),
        flag("--min-confidence", type=float, metavar="X", help=f"only images with {ORDER_COLUMN} >= X"),
        flag("--max-confidence", type=float, metavar="X", help=f"only images with {ORDER_COLUMN} <= X"),
        flag("--review-first", type=int, metavar="N",
             help=f"the N least confident images ({ORDER_COLUMN}), least confident first"),
        flag("--limit", type=int, metavar="N", help="at most N images, the first in export order"),
        flag("--model-id", help="export this model's masks when --labels holds several models'"),
        flag("--image-url-prefix", action="append", default=[], metavar="OLD=NEW",
             help="image URIs starting with OLD start with NEW in the export (repeatable, first match "
                  "wins), e.g. s3://bucket/=https://host/"),
        flag("--shard-size", type=int, default=SHARD_SIZE, help="images per shard"),
        flag("--workers", type=int, default=WORKERS, help="shards in flight at once on Ray"),
    ]


def parser_and_flags() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and its {config field: flag} map (for config_error)."""
    p = argparse.ArgumentParser(prog="export_labels.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag_of = add_flags(p, export_flags())
    flag_of.update(add_storage_option_arg(p))
    return p, flag_of


def build_parser() -> argparse.ArgumentParser:
    return parser_and_flags()[0]


def parse_config(argv: list[str] | None = None) -> ExportConfig:
    """The command line as an ExportConfig; a bad argument exits 2 with one line."""
    p, flags = parser_and_flags()
    a = p.parse_args(argv)
    prefixes = [item.partition("=")[::2] for item in a.image_url_prefix]
    bad = [item for item in a.image_url_prefix if "=" not in item]
    if bad:
        p.error(f"--image-url-prefix: must be OLD=NEW, got {bad[0]!r}")
    classes = tuple(c.strip() for c in (a.classes or "").split(",") if c.strip())
    if a.classes is not None and not classes:
        p.error(f"--classes: no class names in {a.classes!r}")
    try:
        filters = Filters(model_id=a.model_id, classes=classes, min_confidence=a.min_confidence,
                          max_confidence=a.max_confidence, review_first=a.review_first, limit=a.limit)
        return ExportConfig(labels=a.labels, format=a.format, to=a.to, filters=filters,
                            image_url_prefix=tuple(prefixes), shard_size=a.shard_size, workers=a.workers,
                            storage_options=storage_options_from(p, a.storage_option))
    except ValueError as e:
        p.error(config_error(e, flags))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    if os.environ.get("RAY_ADDRESS"):  # on a cluster: shards as Ray tasks
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], ignore_reinit_error=True)
    try:
        manifest = run_export(cfg)
    except ValueError as e:  # nothing labelled, several models, an unknown class: before anything is written
        parser, flags = parser_and_flags()
        parser.error(config_error(e, flags))
    except OSError as e:  # storage unreachable or failing: no manifest was written
        print(f"export_labels: {type(e).__name__}: {e} (no manifest written: the export is incomplete)",
              file=sys.stderr)
        return 1
    print(describe(manifest))
    if manifest["errors"]:
        first = manifest["errors"][0]
        print(f"export_labels: {len(manifest['errors'])} images left out, listed in the manifest's errors; "
              f"first: {first['image_uri']}: {first['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
