"""fsspec I/O for the run layout: atomic writes, bounded retries, clear final errors.

Atomicity. Local and other POSIX-like filesystems: write to a unique temporary name
beside the target, then rename over it. Object stores (s3, gs, ...): a PUT (or a
completed multipart upload) becomes visible whole or not at all, so the object is
written in place; each stage writes its completion marker last.

Faults. Every request to S3 is retried by botocore (standard mode: 5xx, throttling,
connection errors); on top of that each whole operation here (read an object, write an
object, read a byte range, list) is retried with exponential backoff on anything that
is not a permanent error, and finally raises :class:`StorageError` naming the object.

Credentials never pass through here: s3fs takes them from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3``, ...) or from ``fsspec.config.conf``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

_RENAME_ATOMIC_PROTOCOLS = {"file", "local"}
STORAGE_ATTEMPTS = int(os.environ.get("SEMDEDUP_STORAGE_ATTEMPTS", "4"))
_BACKOFF_SECONDS = 0.2
_BACKOFF_CAP_SECONDS = 10.0
# Answers callers act on (absent, already there) and data errors (a corrupt file): no retry.
_PASS_THROUGH = (FileNotFoundError, FileExistsError, ValueError, TypeError, KeyError)
# Errors another attempt cannot fix: no retry, reported naming the object.
_PERMANENT = (PermissionError, IsADirectoryError, NotADirectoryError)
_T = TypeVar("_T")


class StorageError(OSError):
    """A storage operation that still failed after every retry; names the object."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or local path."""
    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        configured = fsspec.config.conf.get("s3", {})
        # Three layers retry (botocore per request, s3fs per call on connection errors,
        # with_retries per operation): keep botocore's small so a dead object fails in
        # seconds rather than minutes.
        if "config_kwargs" not in configured:
            options["config_kwargs"] = {"retries": {"max_attempts": 3, "mode": "standard"}}
    return url_to_fs(url, **options)


def with_retries(action: str, url: str, operation: Callable[[], _T], attempts: int | None = None) -> _T:
    """Run ``operation``; retry transient failures with exponential backoff and jitter."""
    attempts = attempts or STORAGE_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except _PASS_THROUGH:
            raise
        except _PERMANENT as exc:
            raise StorageError(f"{url}: {action} failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - transient until proven otherwise
            if attempt == attempts:
                raise StorageError(f"{url}: {action} failed after {attempts} attempts: {type(exc).__name__}: {exc}") from exc
            delay = min(_BACKOFF_CAP_SECONDS, _BACKOFF_SECONDS * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random()))
    raise AssertionError("unreachable")


def join(base: str, *parts: str) -> str:
    """Join URL path parts without touching the scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    return posixpath.join(base.rstrip("/"), *parts)


def uses_temp_files(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether atomic writes go through a temporary name and a rename (local disks)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in _RENAME_ATOMIC_PROTOCOLS for p in protocols)


@contextmanager
def atomic_open(url: str) -> Iterator[BinaryIO]:
    """Open ``url`` for binary writing; readers see the old object or the complete new one."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not uses_temp_files(fs):
        with fs.open(path, "wb") as fh:
            yield fh
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as fh:
            yield fh
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    def write() -> None:
        with atomic_open(url) as fh:
            fh.write(data)

    with_retries("write", url, write)


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` with ``data`` only if it does not exist; readers never see it half written.

    Local disks: write a temporary file, then hard-link it to the name (fails if the name
    exists). Object stores: one PUT with ``If-None-Match: *``.
    """
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)

    def create() -> bool:
        try:
            if uses_temp_files(fs):
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            else:
                with fs.open(path, "xb") as fh:
                    fh.write(data)
            return True
        except FileExistsError:
            return False

    return with_retries("create", url, create)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return with_retries("read", url, lambda: fs.cat_file(path))


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object, exactly (a ranged GET on object storage)."""
    fs, path = filesystem(url)

    def read() -> bytes:
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:
            raise OSError(f"short read: {len(data)} of {end - start} bytes at offset {start}")
        return data

    return with_retries("read", url, read)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_npy(url: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(url, buf.getvalue())


def read_npy(url: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)


def write_parquet(url: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(url, buf.getvalue())


def read_parquet(url: str, columns: list[str] | None = None, row_groups: list[int] | None = None) -> pa.Table:
    """A parquet table (or some of its row groups), read with retries."""
    fs, path = filesystem(url)

    def read() -> pa.Table:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            return pf.read(columns=columns) if row_groups is None else pf.read_row_groups(row_groups, columns=columns)

    return with_retries("read", url, read)


@contextmanager
def parquet_writer(url: str, schema: pa.Schema, **options: Any) -> Iterator[pq.ParquetWriter]:
    """Stream row groups into one parquet file that appears atomically when closed."""
    with atomic_open(url) as fh:
        writer = pq.ParquetWriter(fh, schema, **options)
        try:
            yield writer
        finally:
            writer.close()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries("check", url, lambda: fs.exists(path))


def remove(url: str) -> None:
    fs, path = filesystem(url)

    def rm() -> None:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    with_retries("delete", url, rm)


def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url_pattern: str) -> list[str]:
    """Expand a glob (or a single path) to sorted full URLs of files."""
    fs, path = filesystem(url_pattern)

    def expand() -> list[str]:
        # Types come from the listing itself: a per-file check would turn a failing object
        # into "not a file" and drop it silently.
        if any(ch in path for ch in "*?["):
            matches = [m for m, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]
        else:
            try:
                matches = [path] if fs.info(path).get("type") == "file" else []
            except FileNotFoundError:
                matches = []
        return sorted(fs.unstrip_protocol(m) if _has_protocol(url_pattern) else m for m in matches)

    return with_retries("list", url_pattern, expand)


def _has_protocol(url: str) -> bool:
    return "://" in url


def expand_input(entry: str) -> tuple[list[str], str | None]:
    """Files of one input entry (a glob, a file or a folder, searched recursively), sorted,
    and the folder they were found under (for image ids) when the entry is a folder."""
    fs, path = filesystem(entry)
    is_dir = not any(ch in path for ch in "*?[") and with_retries("list", entry, lambda: fs.isdir(path))
    if not is_dir:
        return list_files(entry), None
    found = with_retries("list", entry, lambda: fs.find(path, detail=True))
    files = sorted(p for p, info in found.items() if info.get("type") == "file" and not posixpath.basename(p).startswith("."))
    as_url = (lambda p: fs.unstrip_protocol(p)) if "://" in entry else (lambda p: p)
    return [as_url(p) for p in files], as_url(path.rstrip("/"))
