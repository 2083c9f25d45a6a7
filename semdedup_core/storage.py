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

import errno
import hashlib
import io
import json
import os
import re
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any, BinaryIO, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

_RENAME_ATOMIC_PROTOCOLS = {"file", "local"}
STORAGE_ATTEMPTS = int(os.environ.get("SEMDEDUP_STORAGE_ATTEMPTS", "6"))
_BACKOFF_SECONDS = 0.2
_BACKOFF_CAP_SECONDS = 10.0
# Answers callers act on (absent, already there) and data errors (a corrupt file): no retry.
_PASS_THROUGH = (FileNotFoundError, FileExistsError, ValueError, TypeError, KeyError)
# Errors another attempt cannot fix: no retry, reported naming the object.
_PERMANENT = (PermissionError, IsADirectoryError, NotADirectoryError)
# OS errors another attempt cannot fix either: a full disk or quota, a read-only filesystem,
# a file over the size limit.
_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENAMETOOLONG})
# Client-side errors no retry can fix (botocore's, named to keep this module free of it).
_PERMANENT_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "InvalidConfigError", "ProfileNotFound"})
_GLOB_CHARS = "*?["
# Temporary files of atomic writes: "<target>.semdedup-tmp-<uuid hex>", beside the target.
_TEMP_MARK = ".semdedup-tmp-"
_TEMP_NAME = re.compile(r"(?P<target>.+)\.semdedup-tmp-[0-9a-f]{32}")
_T = TypeVar("_T")


class StorageError(OSError):
    """A storage operation that still failed after every retry; names the object."""


# S3 options (credentials, endpoint) of the run being executed in this context: set around
# each unit by whoever executes it, so they reach any process or thread that runs one and
# are never written into a parameter, a result or a log.
_s3_options: ContextVar[dict[str, Any]] = ContextVar("semdedup_s3_options", default={})


@contextmanager
def s3_options(options: dict[str, Any]) -> Iterator[None]:
    """Use these s3fs options (over fsspec's configured defaults) for S3 URLs in this context."""
    token = _s3_options.set({**_s3_options.get(), **options})
    try:
        yield
    finally:
        _s3_options.reset(token)


def current_s3_options() -> dict[str, Any]:
    return dict(_s3_options.get())


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or local path."""
    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        options.update(_s3_options.get())
        configured = {**fsspec.config.conf.get("s3", {}), **options}
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
        except StorageError:
            raise
        except _PERMANENT as exc:
            raise StorageError(f"{url}: {action} failed: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            if exc.errno not in _PERMANENT_ERRNOS and attempt < attempts:
                _forget_cached(url)
                _back_off(attempt)
                continue
            tries = "" if exc.errno in _PERMANENT_ERRNOS else f" after {attempts} attempts"
            raise StorageError(f"{url}: {action} failed{tries}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - transient until proven otherwise
            if type(exc).__name__ in _PERMANENT_NAMES:
                raise StorageError(f"{url}: {action} failed: {type(exc).__name__}: {exc}") from exc
            if attempt == attempts:
                raise StorageError(f"{url}: {action} failed after {attempts} attempts: {type(exc).__name__}: {exc}") from exc
            _forget_cached(url)
            _back_off(attempt)
    raise AssertionError("unreachable")


def _forget_cached(url: str) -> None:
    """Drop what the filesystem cached about ``url`` (listings, ETags): an object rewritten
    since would otherwise fail every retry (s3fs: FileExpired)."""
    with suppress(Exception):
        fs, path = filesystem(url)
        fs.invalidate_cache(path)


def _back_off(attempt: int) -> None:
    delay = min(_BACKOFF_CAP_SECONDS, _BACKOFF_SECONDS * 2 ** (attempt - 1))
    time.sleep(delay * (0.5 + random.random()))


def write_error(url: str, exc: BaseException, action: str = "write") -> StorageError:
    """A failure writing ``url`` as one line naming it and the cause."""
    return exc if isinstance(exc, StorageError) else StorageError(f"{url}: {action} failed: {type(exc).__name__}: {exc}")


def join(base: str, *parts: str) -> str:
    """Join URL path parts without touching the scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    return posixpath.join(base.rstrip("/"), *parts)


def uses_temp_files(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether atomic writes go through a temporary name and a rename (local disks)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in _RENAME_ATOMIC_PROTOCOLS for p in protocols)


def temp_path(path: str) -> str:
    """A temporary name beside ``path`` that no user file plausibly has."""
    return f"{path}{_TEMP_MARK}{uuid.uuid4().hex}"


def temp_target(name: str) -> str | None:
    """The file name a temporary file of ours stands for, or None if ``name`` is not one."""
    match = _TEMP_NAME.fullmatch(name)
    return match.group("target") if match else None


def _make_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the folder of ``path`` on local disks (object stores have no folders, and a
    makedirs there may create a bucket)."""
    parent = posixpath.dirname(path)
    if parent and uses_temp_files(fs):
        try:
            fs.makedirs(parent, exist_ok=True)
        except FileExistsError as exc:  # not an answer to act on here: a file is in the way
            raise NotADirectoryError(errno.ENOTDIR, f"{parent} or a folder above it is a file") from exc


class _NamedErrors:
    """A writable file whose write/flush/close failures raise StorageError naming the object
    (streaming writers run outside :func:`with_retries`, which would name it otherwise)."""

    def __init__(self, fh: Any, url: str):
        self._fh = fh
        self._url = url

    def _call(self, method: Callable[..., _T], *args: Any) -> _T:
        try:
            return method(*args)
        except OSError as exc:
            raise write_error(self._url, exc) from exc

    def write(self, data: Any) -> int:
        return self._call(self._fh.write, data)

    def flush(self) -> None:
        self._call(self._fh.flush)

    def close(self) -> None:
        self._call(self._fh.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@contextmanager
def atomic_open(url: str) -> Iterator[BinaryIO]:
    """Open ``url`` for binary writing; readers see the old object or the complete new one.

    A failure of the storage (disk full, read-only, a file in the way, a missing bucket)
    raises :class:`StorageError` naming ``url``; errors of the caller's code pass through."""
    with _atomic_write(url, named_errors=True) as fh:
        yield fh


@contextmanager
def _atomic_write(url: str, named_errors: bool) -> Iterator[Any]:
    fs, path = filesystem(url)
    local = uses_temp_files(fs)
    target = temp_path(path) if local else path

    def storage_step(step: Callable[[], _T], action: str = "write") -> _T:
        if not named_errors:
            return step()
        try:
            return step()
        except OSError as exc:
            raise write_error(url, exc, action) from exc

    storage_step(lambda: _make_parent(fs, path), "creating its folder")
    fh = storage_step(lambda: fs.open(target, "wb"))
    try:
        try:
            yield _NamedErrors(fh, url) if named_errors else fh
        except BaseException:
            with suppress(OSError):  # the caller's error is the one to report
                fh.close() if local else _discard(fh)
            raise
        storage_step(fh.close)
        if local:
            storage_step(lambda: fs.mv(target, path))
    except BaseException:
        if local and os.path.lexists(target):
            os.unlink(target)
        raise


def _discard(fh: Any) -> None:
    """Drop an unfinished object-store upload instead of completing it on close."""
    discard = getattr(fh, "discard", None)
    if discard is None:
        fh.close()
        return
    discard()
    fh.closed = True  # closing would upload what was buffered


def write_bytes(url: str, data: bytes) -> None:
    def write() -> None:
        try:
            with _atomic_write(url, named_errors=False) as fh:
                fh.write(data)
        except FileNotFoundError as exc:  # writing, this is no answer but a missing bucket or folder
            raise write_error(url, exc) from exc

    with_retries("write", url, write)


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` with ``data`` only if it does not exist; readers never see it half written.

    Local disks: write a temporary file, then hard-link it to the name (fails if the name
    exists). Object stores: one PUT with ``If-None-Match: *``.
    """
    fs, path = filesystem(url)

    def create() -> bool:
        _make_parent(fs, path)
        try:
            if uses_temp_files(fs):
                tmp = temp_path(path)
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
        except FileNotFoundError as exc:
            raise write_error(url, exc, "create") from exc

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


def read_range_into(url: str, start: int, out: np.ndarray) -> None:
    """Fill ``out`` (C-contiguous) with the bytes of an object from ``start``, exactly.

    On a local disk the bytes go straight into ``out`` (no intermediate bytes object:
    a generation reads the collection's earlier vectors this way, gigabytes per night);
    elsewhere it is a ranged GET copied in."""
    if out.nbytes == 0:
        return
    fs, path = filesystem(url)
    view = memoryview(out).cast("B")
    end = start + view.nbytes

    def read() -> None:
        if uses_temp_files(fs):
            with open(path, "rb") as fh:
                fh.seek(start)
                filled = 0
                while filled < view.nbytes and (got := fh.readinto(view[filled:])):
                    filled += got
        else:
            data = fs.cat_file(path, start=start, end=end)
            filled = len(data)
            view[:filled] = data[: view.nbytes]
        if filled != view.nbytes:
            raise OSError(f"short read: {filled} of {view.nbytes} bytes at offset {start}")

    with_retries("read", url, read)


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


def _literal_type(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """'file' or 'directory' when ``path`` exists as written (glob characters included), else None."""
    try:
        return fs.info(path).get("type")
    except FileNotFoundError:
        return None


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in _GLOB_CHARS)


def list_files(url_pattern: str) -> list[str]:
    """Expand a glob (or a single path) to sorted full URLs of files. A path that exists as
    written is taken literally, glob characters and all (``part[1].parquet``)."""
    fs, path = filesystem(url_pattern)
    _forget_listings(fs, path)

    def expand() -> list[str]:
        # Types come from the listing itself: a per-file check would turn a failing object
        # into "not a file" and drop it silently.
        literal = _literal_type(fs, path)
        if literal is None and _has_glob(path):
            matches = [m for m, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]
        else:
            matches = [path] if literal == "file" else []
        return sorted(fs.unstrip_protocol(m) if _has_protocol(url_pattern) else m for m in matches)

    return with_retries("list", url_pattern, expand)


def _forget_listings(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Inputs keep filling (a bucket that gains shards every night): drop what this process's
    filesystem cached about them, so a listing and the opens after it see the store as it is."""
    static = path.split("*")[0].split("?")[0].split("[")[0]
    fs.invalidate_cache(static.rstrip("/") or path)


def _has_protocol(url: str) -> bool:
    return "://" in url


def expand_input(entry: str) -> tuple[list[str], str | None]:
    """Files of one input entry (a glob, a file or a folder, searched recursively), sorted,
    and the folder they were found under (for image ids) when the entry is a folder."""
    fs, path = filesystem(entry)
    _forget_listings(fs, path)
    is_dir = with_retries("list", entry, lambda: _literal_type(fs, path)) == "directory"
    if not is_dir:
        return list_files(entry), None
    found = with_retries("list", entry, lambda: fs.find(path, detail=True))
    files = sorted(p for p, info in found.items() if info.get("type") == "file" and not posixpath.basename(p).startswith("."))
    as_url = (lambda p: fs.unstrip_protocol(p)) if "://" in entry else (lambda p: p)
    return [as_url(p) for p in files], as_url(path.rstrip("/"))


def path_kind(url: str) -> str | None:
    """'file' or 'directory' when ``url`` exists as written (no glob expansion), else None."""
    fs, path = filesystem(url)
    return with_retries("check", url, lambda: _literal_type(fs, path))


# Object metadata that changes whenever an object is rewritten, best first.
_VERSION_KEYS = ("ETag", "etag", "VersionId", "generation", "md5Hash")
_TIME_KEYS = ("LastModified", "mtime", "updated", "last_modified")


def fingerprints(urls: list[str]) -> dict[str, str]:
    """A short string per file that changes when the file is rewritten: size and mtime_ns on
    local disks; ETag / version id (else size and modification time) on object stores.
    One listing per folder, not one request per file."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rstrip("/").rsplit("/", 1)[0], []).append(url)
    out: dict[str, str] = {}
    for folder, members in by_folder.items():
        fs, folder_path = filesystem(folder)
        if uses_temp_files(fs):
            for url in members:
                st = with_retries("check", url, lambda url=url: os.stat(filesystem(url)[1]))
                out[url] = f"size={st.st_size} mtime_ns={st.st_mtime_ns}"
            continue

        def listing(fs=fs, folder_path=folder_path) -> dict[str, dict]:
            fs.invalidate_cache(folder_path)  # a cached listing would hide a rewrite
            return {info["name"]: info for info in fs.ls(folder_path, detail=True)}

        infos = with_retries("list", folder, listing)
        for url in members:
            path = filesystem(url)[1]
            info = infos.get(path) or with_retries("check", url, lambda path=path, fs=fs: fs.info(path))
            out[url] = _describe_version(info)
    return out


def _describe_version(info: dict) -> str:
    parts = [f"size={info.get('size')}"]
    parts += [f"{key}={info[key]}" for key in _VERSION_KEYS if info.get(key)]
    if len(parts) == 1:
        parts += [f"{key}={info[key]}" for key in _TIME_KEYS if info.get(key)]
    return " ".join(parts)


def digest(parts: list[str]) -> str:
    """One short digest standing for many fingerprints."""
    # surrogateescape: file names that are not UTF-8 (kept as surrogates by os.fsdecode) still digest.
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def has_buckets(fs: fsspec.AbstractFileSystem) -> bool:
    """Object stores whose first path component is a bucket (s3, gcs, ...)."""
    return not uses_temp_files(fs) and hasattr(fs, "split_path")


def bucket_exists(url: str) -> bool:
    """Whether the bucket of ``url`` exists. Unreachable endpoints, refused credentials and
    the like raise StorageError naming the bucket and the cause."""
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    scheme = url.split("://", 1)[0]

    def check() -> bool:
        try:
            fs.info(bucket)
        except FileNotFoundError:
            return False
        return True

    return with_retries("check", f"{scheme}://{bucket}", check)
