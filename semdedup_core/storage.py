"""fsspec I/O for the run layout: every artifact is written atomically.

Local and other POSIX-like filesystems: write to a unique temporary name beside the
target, then rename over it. Object stores (s3, gs, ...): a single PUT becomes visible
whole or not at all, so the object is written in place.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

_RENAME_ATOMIC_PROTOCOLS = {"file", "local"}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or local path."""
    return url_to_fs(url)


def join(base: str, *parts: str) -> str:
    """Join URL path parts without touching the scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    return posixpath.join(base.rstrip("/"), *parts)


def _is_rename_atomic(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in _RENAME_ATOMIC_PROTOCOLS for p in protocols)


@contextmanager
def atomic_open(url: str) -> Iterator[BinaryIO]:
    """Open ``url`` for binary writing; readers see the old object or the complete new one."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not _is_rename_atomic(fs):
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
    with atomic_open(url) as fh:
        fh.write(data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        return json.load(fh)


def write_npy(url: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(url, buf.getvalue())


def read_npy(url: str) -> np.ndarray:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        return np.load(io.BytesIO(fh.read()), allow_pickle=False)


def write_parquet(url: str, table: pa.Table) -> None:
    with atomic_open(url) as fh:
        pq.write_table(table, fh)


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
    return fs.exists(path)


def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url_pattern: str) -> list[str]:
    """Expand a glob (or a single path) to sorted full URLs of files."""
    fs, path = filesystem(url_pattern)
    if fs.isdir(path):
        return []
    matches = fs.glob(path) if any(ch in path for ch in "*?[") else ([path] if fs.exists(path) else [])
    return sorted(fs.unstrip_protocol(m) if _has_protocol(url_pattern) else m for m in matches if fs.isfile(m))


def _has_protocol(url: str) -> bool:
    return "://" in url
