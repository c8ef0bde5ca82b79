"""predictions/ under the output prefix: the Parquet rows of every run, one per
input processed (the row: pipeline/rows.py; the paths: pipeline/layout.py).

    writer.py      PredictionWriter: a run's rows, written as parts while it runs
    parts.py       which parts to read (`visible_parts`), reading them, latest rows
    done.py        the done-set an incremental run skips, a window of keys at a time
    compaction.py  many small parts rewritten as few large ones, invisibly to readers

Parts are written by the driver as rows arrive, after their masks exist: a run
killed half-way leaves only rows that are really done, and the next
incremental run skips exactly those.
"""
