"""Every byte the project reads or writes goes through this module.

URIs are resolved with fsspec (`s3://`, `gs://`, `memory://`, `file://`, or a
plain local path), so the rest of the code passes URIs around and never touches
a storage SDK. S3 endpoints are configured the way AWS tools do it: the
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` environment variables and the usual
credential variables, or explicitly through `storage_options`
(e.g. `{"endpoint_url": "http://127.0.0.1:5000", "key": ..., "secret": ...}`).

Many small objects (Parquet parts, label maps) are read concurrently with
`read_concurrently`, the one thread pool for storage reads.

Errors are built-in types raised from their cause: a missing object is
`FileNotFoundError(uri)`, a malformed URI `ValueError`.

Object stores fail transiently (503 SlowDown, a dropped connection, an endpoint
restarting), so every call here retries with exponential backoff and jitter
until `DECONVNET_STORAGE_RETRY_SECONDS` (default 120) have passed, then raises
`StorageUnavailable`, which names the URI and the last error. Errors that
retrying cannot fix (missing object, no permission, a bad URI) are raised at
once. s3fs's own short retries run inside each attempt.
"""

from __future__ import annotations

import itertools
import mimetypes
import os
import posixpath
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import split_protocol

StorageOptions = Mapping[str, Any]

RETRY_SECONDS_ENV = "DECONVNET_STORAGE_RETRY_SECONDS"
READ_THREADS = 16  # objects read at once: object stores answer many small GETs in parallel
_FIRST_WAIT, _MAX_WAIT = 0.2, 10.0  # backoff: 0.2 s doubling up to 10 s, with jitter
# Failures no retry can fix; everything else an object store raises is worth another try.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              FileExistsError, ValueError, TypeError, KeyError, NotImplementedError)


class StorageUnavailable(OSError):
    """Storage kept failing for the whole retry budget (endpoint down, throttled, 5xx)."""


def retry_seconds() -> float:
    return float(os.environ.get(RETRY_SECONDS_ENV, "120"))


def _retrying(what: str, uri: str, call, *args, **kwargs):
    """`call(*args, **kwargs)`, retried on transient errors for `retry_seconds()`.
    A missing object is `FileNotFoundError(uri)` (a directory, `IsADirectoryError(uri)`)."""
    budget, start, attempt = retry_seconds(), time.monotonic(), 0
    while True:
        try:
            return call(*args, **kwargs)
        except FileNotFoundError as e:
            raise FileNotFoundError(uri) from e
        except IsADirectoryError as e:
            raise IsADirectoryError(uri) from e
        except _PERMANENT:
            raise
        except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp errors share no base class
            attempt += 1
            elapsed = time.monotonic() - start
            wait = min(_MAX_WAIT, _FIRST_WAIT * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if elapsed + wait > budget:
                raise StorageUnavailable(
                    f"{what} {uri}: storage still failing after {attempt} attempts over {elapsed:.0f} s "
                    f"(retry budget {budget:g} s, {RETRY_SECONDS_ENV}): {type(e).__name__}: {e}") from e
            time.sleep(wait)


# Keys whose values must never reach a log, a record or an exception message.
_SECRET_KEYS = ("secret", "token", "password", "key", "credential", "session")


def _options(uri: str, storage_options: StorageOptions | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    protocol, _ = split_protocol(uri)
    if protocol in ("s3", "s3a") and "endpoint_url" not in opts:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = opts.get("client_kwargs") or {}
        if endpoint and "endpoint_url" not in client_kwargs:
            opts["endpoint_url"] = endpoint
    return opts


def url_to_fs(uri: str, storage_options: StorageOptions | None = None):
    """(filesystem, path) for a URI; `storage_options` go to the filesystem."""
    if not uri:
        raise ValueError("empty URI")
    return fsspec.url_to_fs(uri, **_options(uri, storage_options))


def is_local(uri: str) -> bool:
    protocol, _ = split_protocol(uri)
    return protocol in (None, "file", "local")


def join(base: str, *parts: str) -> str:
    """Join URI path parts with '/', whatever the protocol (local paths included)."""
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = url_to_fs(uri, storage_options)
    return _retrying("read", uri, fs.cat_file, path)


def read_range(uri: str, start: int, end: int, storage_options: StorageOptions | None = None) -> bytes:
    """Bytes [start, end) of an object (fewer at its end): a ranged GET on object stores."""
    fs, path = url_to_fs(uri, storage_options)
    return _retrying("read", uri, fs.cat_file, path, start=start, end=end)


def size(uri: str, storage_options: StorageOptions | None = None) -> int:
    fs, path = url_to_fs(uri, storage_options)
    return int(_retrying("check", uri, fs.size, path))


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write a whole object. Object stores replace it atomically; on a local disk
    the bytes go to a temporary file first, so readers never see half a file.
    On S3 and GCS the object gets the content type of its extension, so a bucket
    served over HTTP shows index.html as a page and masks as images."""
    fs, path = url_to_fs(uri, storage_options)
    if is_local(uri):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        _retrying("write", uri, fs.pipe_file, path, data, **_content_type(uri))


def _content_type(uri: str) -> dict[str, str]:
    """The put-object keyword that sets the content type, for the stores that take one."""
    kind = mimetypes.types_map.get(posixpath.splitext(uri)[1].lower())
    protocol, _ = split_protocol(uri)
    if kind is None:
        return {}
    if protocol in ("s3", "s3a"):
        return {"ContentType": kind}
    if protocol in ("gs", "gcs"):
        return {"content_type": kind}
    return {}


def exists(uri: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    fs.invalidate_cache(path)
    return _retrying("check", uri, fs.exists, path)


def isdir(uri: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = url_to_fs(uri, storage_options)
    return _retrying("check", uri, fs.isdir, path)


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    version: str  # ETag on object stores, mtime on disks: changes when the content does


def list_files_detail(
    uri: str,
    suffixes: Iterable[str] | None = None,
    storage_options: StorageOptions | None = None,
) -> list[FileInfo]:
    """Every file under a prefix (recursively), or the file itself, sorted by URI.

    `suffixes` (with the dot, any case) keeps only matching names. A prefix
    that holds nothing is an empty list; one that does not exist raises
    `FileNotFoundError(uri)`. For large prefixes use `iter_files_detail`.
    """
    return list(iter_files_detail(uri, suffixes, storage_options))


def iter_files_detail(
    uri: str,
    suffixes: Iterable[str] | None = None,
    storage_options: StorageOptions | None = None,
    start_after: str | None = None,
) -> Iterator[FileInfo]:
    """`list_files_detail` as a stream, in the same (sorted) order, holding one
    page at a time: S3 lists 1,000 keys a request, already in key order; a local
    disk is walked one directory at a time, each sorted; other filesystems are
    listed whole (fsspec's `find`) and sorted.

    `start_after` (a URI this listing yielded, or any URI under `uri`) resumes
    after it: S3 is asked with `StartAfter`, a local walk skips the folders
    that sort wholly before it, other filesystems are filtered."""
    fs, path = url_to_fs(uri, storage_options)
    fs.invalidate_cache()  # other processes (Ray workers) may have written since
    if _retrying("check", uri, fs.isfile, path):
        info = _retrying("check", uri, fs.info, path)
        if _matches(uri, suffixes) and not (start_after and start_after >= uri):
            yield FileInfo(uri, int(info.get("size") or 0), _version(info))
        return
    root = path.rstrip("/")
    # Where to resume, relative to the prefix as the pages' paths are ("" lists all).
    after = start_after[len(uri.rstrip("/")):] if start_after else ""
    if start_after and not start_after.startswith(uri.rstrip("/")):
        raise ValueError(f"start_after {start_after!r} is not under {uri!r}")
    if is_local(uri):
        pages = _local_pages(root, after=after)
    elif split_protocol(uri)[0] in ("s3", "s3a"):
        pages = _s3_pages(fs, root, uri, after)
    else:
        pages = iter([[(rel, *info) for rel, info in sorted(_retrying("list", uri, _find, fs, root).items())
                       if rel > after]])
    listed = bool(after)  # a resumed listing that finds nothing more is not a missing prefix
    for page in pages:
        for rel, size, version in page:
            listed = True
            # Rebuild each URI from the user's prefix so its style (protocol, slashes) is kept,
            # and the key exactly as stored: "a//b" is a different object from "a/b".
            file_uri = uri.rstrip("/") + rel
            if _matches(file_uri, suffixes):
                yield FileInfo(file_uri, size, version)
    if not listed and not _retrying("check", uri, fs.isdir, path):
        raise FileNotFoundError(uri)


Page = list[tuple[str, int, str]]  # (path relative to the prefix, starting with "/", size, version)


def _find(fs, root: str) -> dict[str, tuple[int, str]]:
    return {p[len(root):]: (int(info.get("size") or 0), _version(info))
            for p, info in fs.find(root, detail=True).items() if info.get("type") != "directory"}


def _s3_pages(fs, root: str, uri: str, after: str = "") -> Iterator[Page]:
    """ListObjectsV2 without a delimiter: every key under the prefix (after the
    relative path `after`), in key (UTF-8 byte = code point) order, 1,000 a
    page, each page retried on its own."""
    bucket, _, key = root.partition("/")
    prefix = f"{key}/" if key else ""
    token: dict[str, str] = {"StartAfter": prefix + after[1:]} if after else {}
    while True:
        page = _retrying("list", uri, fs.call_s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, **token)
        yield [("/" + o["Key"][len(prefix):], int(o.get("Size") or 0), _version(o))
               for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not page.get("IsTruncated"):
            return
        token = {"ContinuationToken": page["NextContinuationToken"]}


def _local_pages(root: str, rel: str = "", after: str = "") -> Iterator[Page]:
    """Files under a local folder in sorted order of their paths, one folder
    in memory at a time: entries sort by name + "/" for folders, which is the
    order of the full paths ("a.jpg" < "a/b.jpg" because "." < "/"). Only
    paths after `after` (relative, like them): a folder whose paths all sort
    before it is not opened."""
    try:
        with os.scandir(root + rel) as it:
            entries = sorted(((e.name + "/" if e.is_dir() else e.name), e) for e in it)
    except FileNotFoundError:
        return
    files: Page = []
    for key, e in entries:
        if key.endswith("/"):
            if f"{rel}/{key}" < after and not after.startswith(f"{rel}/{key}"):
                continue  # every path in it sorts before `after`
            if files:
                yield files
                files = []
            yield from _local_pages(root, f"{rel}/{e.name}", after)
        elif f"{rel}/{e.name}" <= after:
            continue
        else:
            try:
                st = e.stat()
            except FileNotFoundError:  # removed since the folder was read
                continue
            files.append((f"{rel}/{e.name}", st.st_size, str(st.st_mtime)))
    if files:
        yield files


def read_concurrently(read: Callable[[Any], Any], items: Sequence[Any], threads: int = READ_THREADS) -> Iterator[Any]:
    """`read(item)` of each item, in order, `threads` at a time: for reads of many
    small objects (Parquet parts, label maps), where the time goes in waiting on
    storage. At most 2 * `threads` results wait for the consumer, so memory holds
    a few of them however many items there are. An exception is raised when its
    item's turn comes; the items not started yet are then dropped."""
    if len(items) <= 1:
        yield from map(read, items)
        return
    pool = ThreadPoolExecutor(min(threads, len(items)))
    try:
        todo = iter(items)
        pending = deque(pool.submit(read, x) for x in itertools.islice(todo, 2 * threads))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(read, x) for x in itertools.islice(todo, 1))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def open_input(uri: str, storage_options: StorageOptions | None = None):
    """A seekable binary file object for random access (Parquet footers and row groups)."""
    fs, path = url_to_fs(uri, storage_options)
    return _retrying("read", uri, fs.open, path, "rb")


def _version(info: Mapping[str, Any]) -> str:
    for k in ("ETag", "etag", "mtime", "LastModified", "updated", "created"):
        if info.get(k) is not None:
            return str(info[k]).strip('"')
    return ""


def list_files(
    uri: str,
    suffixes: Iterable[str] | None = None,
    storage_options: StorageOptions | None = None,
) -> list[str]:
    """The URIs of `list_files_detail`."""
    return [f.uri for f in list_files_detail(uri, suffixes, storage_options)]


def _matches(uri: str, suffixes: Iterable[str] | None) -> bool:
    return suffixes is None or uri.lower().endswith(tuple(s.lower() for s in suffixes))


def remove(uri: str, recursive: bool = False, storage_options: StorageOptions | None = None) -> None:
    fs, path = url_to_fs(uri, storage_options)
    _retrying("remove", uri, fs.rm, path, recursive=recursive)


def pyarrow_filesystem(uri: str, storage_options: StorageOptions | None = None):
    """(pyarrow FileSystem, path without protocol) for Ray Data and Ray Train.

    Ray wants a pyarrow filesystem plus a `bucket/key` path with no `s3://`;
    wrapping the fsspec filesystem keeps one source of configuration.
    """
    import pyarrow.fs as pafs

    fs, path = url_to_fs(uri, storage_options)
    if is_local(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def redact(options: StorageOptions | None) -> dict[str, Any]:
    """A copy of storage options safe to print or record: secret values hidden."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redact(v)
        elif any(s in k.lower() for s in _SECRET_KEYS) and k.lower() != "endpoint_url":
            out[k] = "***"
        else:
            out[k] = v
    return out


def parse_storage_option(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (key, value); VALUE is read as JSON when it parses (true, 3,
    {"a": 1}), else kept as a string. Raises ValueError on a missing '='."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"storage option must be KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
