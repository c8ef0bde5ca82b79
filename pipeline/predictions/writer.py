"""A run's rows into predictions/, written by the driver as they arrive."""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deconvnet import storage

from .. import layout


class PredictionWriter:
    """Buffers result rows on the driver and writes them as Parquet parts: one
    every `rows_per_part` rows or `part_seconds` seconds, whichever comes first,
    so a killed run loses little finished work (its masks are rewritten next time)."""

    def __init__(self, output: str, run_id: str, rows_per_part: int, storage_options=None,
                 part_seconds: float = 60.0):
        self.output = output
        self.run_id, self.rows_per_part, self.storage_options = run_id, rows_per_part, storage_options
        self.part_seconds, self.last_flush = part_seconds, time.monotonic()
        self.tables: list[pa.Table] = []
        self.pending = 0  # rows buffered, not yet in a part
        self.parts: list[str] = []
        self.counts = {"ok": 0, "error": 0}

    def add(self, table: pa.Table) -> None:
        """Rows with the prediction schema (rows.table_from_batch)."""
        self.tables.append(table)
        self.pending += table.num_rows
        ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
        self.counts["ok"] += ok
        self.counts["error"] += table.num_rows - ok
        if self.pending >= self.rows_per_part or time.monotonic() - self.last_flush >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(self.tables), buf)
        uri = layout.run_part_uri(self.output, self.run_id, len(self.parts))
        storage.write_bytes(uri, buf.getvalue(), self.storage_options)
        self.parts.append(uri)
        self.tables, self.pending, self.last_flush = [], 0, time.monotonic()
