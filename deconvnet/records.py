"""What runs leave behind for people and later runs to read: UTC timestamps and
small JSON documents (run records, training results, checkpoint state) in storage."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from . import storage


def now_iso() -> str:
    """The current UTC time, to the second, as ISO 8601 ('2026-11-25T02:33:07+00:00')."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_json(uri: str, storage_options: storage.StorageOptions | None = None) -> Any:
    """A JSON document; FileNotFoundError(uri) when there is none."""
    return json.loads(storage.read_bytes(uri, storage_options))


def write_json(uri: str, value: Any, storage_options: storage.StorageOptions | None = None,
               indent: int | None = 2) -> str:
    """Write `value` as JSON (objects it cannot encode as their str()); returns the URI."""
    storage.write_bytes(uri, json.dumps(value, indent=indent, default=str).encode(), storage_options)
    return uri
