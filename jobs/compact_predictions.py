"""Compact the segment job's predictions/: many small Parquet parts (one or more
per run) rewritten as few large ones, sorted by image URI, with every row kept.

On a cluster, next to the scheduled labelling (deploy/crontab runs it daily under
the labelling's lock):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/compact_predictions.py --output s3://bucket/labels/

Locally, or anywhere that reaches the bucket (it needs no Ray):

    python jobs/compact_predictions.py --output labels/

Readers never see a row twice or miss one while it runs, and a run may write at
the same time (pipeline/predictions/compaction.py says how). A labelling run also
compacts by itself when parts pile up; this keeps that off the run's critical path.
Exit codes: 0 done, 1 storage failed (what was written stays consistent), 2 a bad argument.
"""

from __future__ import annotations

import argparse
import sys

from deconvnet.cli import add_storage_option_arg, storage_options_from
from pipeline.predictions.compaction import MAX_ROWS, compact
from pipeline.predictions.parts import visible_parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compact_predictions.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="the segment job's --output (predictions/ is under it)")
    p.add_argument("--min-parts", type=int, default=2, help="compact when at least this many small parts")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, help="rows per compacted part at most")
    add_storage_option_arg(p)
    a = p.parse_args(argv)
    opts = storage_options_from(p, a.storage_option)
    for flag, value in (("--min-parts", a.min_parts), ("--max-rows", a.max_rows)):
        if value < 2:
            p.error(f"{flag}: must be >= 2, got {value}")
    try:
        before = visible_parts(a.output, opts)
        done = compact(a.output, opts, min_parts=a.min_parts, max_rows=a.max_rows, log=print)
        after = visible_parts(a.output, opts)
    except (OSError, ValueError) as e:
        print(f"compact_predictions: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"predictions/: {len(before.all)} parts -> {len(after.all)} ({len(done['written'])} written, "
          f"{done['merged']} merged, {done['deleted_leftovers']} leftovers of an earlier compaction removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
