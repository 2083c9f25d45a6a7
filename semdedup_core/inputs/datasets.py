"""Readers for raw datasets (the embedding stage's input): webdataset tars, parquet with a
text or image-bytes column, jsonl text, and image folders.

Every item gets a stable id and a ``source`` (where it lives, for ``failed.parquet``):

| kind       | id                                             | source                  |
| ---------- | ---------------------------------------------- | ----------------------- |
| webdataset | the sample key (img2dataset: ``000010005``)    | ``TAR member NAME``     |
| parquet    | ``id_column`` (default ``id``), else URL:row   | ``FILE row N``          |
| jsonl      | ``id_column`` field (default ``id``), else URL:line | ``FILE line N``    |
| images     | the path relative to the input folder          | the file URL            |

:func:`scan_items` reads each item once (no decoding) and yields what the exact-duplicate
pass and the embedder need: content bytes to hash, text, and for images where the bytes
live, so the embedder reads exactly those bytes back (:func:`read_payloads`).
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.utils import infer_compression
from pydantic import BaseModel

from semdedup_core.config import RunConfig
from semdedup_core.inputs.precomputed import (
    InputError,
    _check_metadata_types,
    _open_parquet,
    canonical_id,
    canonical_id_array,
    check_id_type,
    check_url_text,
    one_line,
    utf8_values,
)
from semdedup_core.storage import expand_input, filesystem, with_retries

RAW_FORMATS = ("webdataset", "parquet", "jsonl", "images")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2", ".jsonl.xz")
# Image folders are cut into shards of this many files, one embedding task each.
IMAGES_PER_SHARD = 10_000
SCAN_BATCH_ROWS = 8192
# Compressed jsonl is decompressed this many input bytes at a time.
READ_CHUNK_BYTES = 1 << 20
# fsspec's name for each compression of JSONL_SUFFIXES -> the module that reads and writes it.
COMPRESSION_MODULES = {"gzip": "zlib", "bz2": "bz2", "xz": "lzma", "zstd": "zstandard"}


class RawShard(BaseModel):
    """One raw input unit, small enough to pass between tasks."""

    index: int
    kind: Literal["webdataset", "parquet", "jsonl", "images"]
    url: str  # the file; for image folders the folder ids are relative to
    modality: Literal["image", "text"]
    id_column: str | None = None  # parquet/jsonl; None: ids are "<url>:<row>"
    content_column: str | None = None  # parquet/jsonl column or webdataset extension holding the text
    files: list[str] = []  # image folders: this shard's file URLs

    @property
    def name(self) -> str:
        return self.url

    @property
    def basename(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))


@dataclass
class ScannedItem:
    """One item as read by :func:`scan_items` (nothing decoded)."""

    row: int  # position in the shard (webdataset: sample number; jsonl: line number)
    id: str
    source: str
    error: str | None = None
    content: bytes | None = None  # image bytes to hash (not kept after hashing)
    text: str | None = None
    offset: int = -1  # webdataset: where the image bytes start in the tar
    size: int = -1
    metadata: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- discovery


def _suffix_kind(url: str) -> str | None:
    name = url.lower()
    if name.endswith(".tar"):
        return "webdataset"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
        return "images"
    return None


def detect_format(cfg: RunConfig) -> str:
    """The format of the inputs: cfg.format, or for 'auto' recognised from the files."""
    if cfg.format != "auto":
        return cfg.format
    from semdedup_core.inputs.precomputed import _is_clip_folder

    kinds: dict[str, str] = {}
    for entry in cfg.input:
        if _is_clip_folder(entry):
            kinds[entry] = "clip-retrieval"
            continue
        files, _ = expand_input(entry)
        if not files:
            raise InputError(f"{entry}: no input files match")
        kind = next((k for k in map(_suffix_kind, files) if k), None)
        if kind is None:
            raise InputError(f"{entry}: cannot tell the format from the file names (e.g. {files[0]}); pass --format")
        if kind == "parquet":
            names = _open_parquet(files[0]).schema_arrow.names
            raw = cfg.embedding_column not in names and (cfg.text_column in names or cfg.image_column in names)
            kind = "parquet" if raw else "embeddings"
        kinds[entry] = kind
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{e} ({k})" for e, k in kinds.items())
        raise InputError(f"the inputs mix formats: {described}; run them separately or pass --format")
    return next(iter(kinds.values()))


def discover_raw_shards(cfg: RunConfig, fmt: str) -> list[RawShard]:
    """The raw input shards, with the columns each needs checked before any work."""
    shards: list[RawShard] = []
    for entry in cfg.input:
        files, root = expand_input(entry)
        if fmt == "images":
            files = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
            if not files:
                raise InputError(f"{entry}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            base = root if root is not None else _common_folder(files)
            check_url_text(base)
            for start in range(0, len(files), IMAGES_PER_SHARD):
                part = files[start : start + IMAGES_PER_SHARD]
                shards.append(RawShard(index=len(shards), kind="images", url=base, modality="image", files=part))
            continue
        wanted = {"webdataset": (".tar",), "jsonl": JSONL_SUFFIXES, "parquet": (".parquet",)}[fmt]
        if root is not None:  # a folder: only the files of the format
            files = [f for f in files if f.lower().endswith(wanted)]
        if not files:
            raise InputError(f"{entry}: no input files match")
        for url in files:
            check_url_text(url)
            shards.append(_raw_shard(url, len(shards), fmt, cfg))
    seen: set[str] = set()
    for s in shards:
        for url in s.files or [s.url]:
            if url in seen:
                raise InputError(f"{url}: listed twice in the inputs")
            seen.add(url)
    if cfg.write_dataset or cfg.write_removed:
        names: dict[str, str] = {}
        for s in shards:
            if s.kind != "images" and names.setdefault(s.basename, s.url) != s.url:
                raise InputError(f"{s.url} and {names[s.basename]} share the file name {s.basename!r}; writing the dataset back needs distinct names")
    return shards


def _common_folder(urls: list[str]) -> str:
    """The deepest folder holding every file of a glob: image ids are relative to it."""
    prefix = posixpath.commonprefix([posixpath.dirname(u) + "/" for u in urls])
    return prefix[: prefix.rfind("/")]


def _modality(cfg: RunConfig, default: str) -> str:
    return default if cfg.modality == "auto" else cfg.modality


def _raw_shard(url: str, index: int, fmt: str, cfg: RunConfig) -> RawShard:
    if fmt == "webdataset":
        modality = _modality(cfg, "image")
        # The text of a sample is a file extension; the default text column means the caption (.txt).
        ext = ("txt" if cfg.text_column == "text" else cfg.text_column) if modality == "text" else None
        return RawShard(index=index, kind="webdataset", url=url, modality=modality, content_column=ext)
    if fmt == "jsonl":
        if _modality(cfg, "text") != "text":
            raise InputError(f"{url}: jsonl inputs hold text; modality 'image' is not supported for them")
        compression = infer_compression(url)
        if compression is not None and compression not in COMPRESSION_MODULES:
            raise InputError(f"{url}: {compression} compression is not supported for jsonl (gz, bz2, xz and zst are)")
        if compression is not None and importlib.util.find_spec(COMPRESSION_MODULES[compression]) is None:
            raise InputError(f"{url}: reading {compression} needs the {COMPRESSION_MODULES[compression]!r} package, which is not installed")
        return RawShard(index=index, kind="jsonl", url=url, modality="text", id_column=cfg.id_column or "id", content_column=cfg.text_column)
    # parquet: images when the image column is there (or asked for), else text
    schema = _open_parquet(url).schema_arrow
    names = schema.names
    modality = cfg.modality if cfg.modality != "auto" else ("image" if cfg.image_column in names else "text")
    column = cfg.image_column if modality == "image" else cfg.text_column
    if column not in names:
        what = "image bytes" if modality == "image" else "text"
        raise InputError(f"{url}: no {what} column {column!r}; has {', '.join(names)} (name it with --{'image' if modality == 'image' else 'text'}-column)")
    if cfg.id_column is not None and cfg.id_column not in names:
        raise InputError(f"{url}: missing id column {cfg.id_column!r}; has {', '.join(names)}")
    if cfg.id_column is not None or "id" in names:
        check_id_type(url, cfg.id_column or "id", schema.field(cfg.id_column or "id").type)
    missing = [m for m in _metadata_names(cfg) if m not in names]
    if missing:
        raise InputError(f"{url}: missing metadata column(s) {', '.join(missing)}; has {', '.join(names)}")
    _check_metadata_types(url, schema, cfg)
    id_column = cfg.id_column or ("id" if "id" in names else None)
    return RawShard(index=index, kind="parquet", url=url, modality=modality, id_column=id_column, content_column=column)


def _metadata_names(cfg: RunConfig) -> list[str]:
    return [spec.partition(":")[0] for spec in cfg.metadata_columns]


# ---------------------------------------------------------------- scanning


def scan_items(shard: RawShard, metadata_columns: list[str]) -> Iterator[ScannedItem]:
    """Every item of a shard, in order, read but not decoded. Unreadable items carry an error."""
    meta = [spec.partition(":")[0] for spec in metadata_columns]
    if shard.kind == "webdataset":
        yield from _scan_tar(shard, meta)
    elif shard.kind == "parquet":
        yield from _scan_parquet(shard, meta)
    elif shard.kind == "jsonl":
        yield from _scan_jsonl(shard, meta)
    else:
        yield from _scan_images(shard)


def split_key(member_name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_sample(shard: RawShard, row: int, key: str, members: dict[str, tuple[tarfile.TarInfo, bytes]], meta: list[str]) -> ScannedItem:
    item = ScannedItem(row=row, id=key, source=f"{shard.url} member {key}")
    names = ", ".join(sorted(members))
    if shard.modality == "image":
        ext = next((e for e in members if e in IMAGE_EXTENSIONS), None)
        if ext is None:
            item.error = f"sample has no image (files: {names})"
            return item
        info, data = members[ext]
        item.source = f"{shard.url} member {info.name}"
        item.offset, item.size, item.content = info.offset_data, info.size, data
        if not data:
            item.error = f"{info.name} is empty (0 bytes)"
    else:
        ext = shard.content_column or "txt"
        if ext not in members:
            item.error = f"sample has no .{ext} text (files: {names})"
            return item
        info, data = members[ext]
        item.source = f"{shard.url} member {info.name}"
        try:
            item.text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            item.error = f"{info.name} is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if meta and item.error is None:
        _sample_metadata(item, members, meta)
    return item


def _sample_metadata(item: ScannedItem, members: dict[str, tuple[tarfile.TarInfo, bytes]], meta: list[str]) -> None:
    if "json" not in members:
        item.error = f"sample has no .json with metadata field(s) {', '.join(meta)}"
        return
    try:
        record = json.loads(members["json"][1])
    except ValueError as exc:
        item.error = f"{members['json'][0].name} is not valid JSON ({exc})"
        return
    _take_metadata(item, record, meta)


def _take_metadata(item: ScannedItem, record: dict, meta: list[str]) -> None:
    for name in meta:
        value = record.get(name) if isinstance(record, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            item.error = f"metadata field {name!r} is {'missing' if value is None else f'not a number ({value!r})'}"
            return
        item.metadata[name] = float(value)


def unreadable_shard(shard: RawShard, reason: str) -> ScannedItem:
    """A shard none of whose items can be known: one failed row standing for the whole shard."""
    return ScannedItem(row=-1, id=shard.url, source=shard.url, error=f"unreadable shard: {reason}")


def _scan_tar(shard: RawShard, meta: list[str]) -> Iterator[ScannedItem]:
    fs, path = filesystem(shard.url)
    try:
        fh = with_retries("open", shard.url, lambda: fs.open(path, "rb"))
    except Exception as exc:  # noqa: BLE001 - the whole shard is unreadable
        yield unreadable_shard(shard, one_line(exc))
        return
    row = 0
    key: str | None = None
    members: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    current: tarfile.TarInfo | None = None
    with fh:
        try:
            # Stream mode: one sequential pass, also over object storage.
            archive = tarfile.open(fileobj=fh, mode="r|")
            for info in archive:
                current = info
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if k != key:
                    if key is not None:
                        yield _tar_sample(shard, row, key, members, meta)
                        row += 1
                    key, members = k, {}
                members[ext] = (info, archive.extractfile(info).read())
                current = None
        except (tarfile.TarError, EOFError, OSError) as exc:
            where = f"in member {current.name}" if current is not None else f"after {row + (key is not None)} samples"
            if row == 0 and key is None and current is None:
                yield unreadable_shard(shard, f"not a tar ({one_line(exc)})")
                return
            # A tar cut off mid-member: the samples before are fine, the one being read is
            # failed, and nothing after it can be known.
            if key is not None:
                yield ScannedItem(row=row, id=key, source=f"{shard.url} member {key}", error=f"tar is cut off {where} ({exc})")
            return
        # tarfile ends an archive quietly at a missing, short or invalid header: only the
        # end-of-archive block tells that the last sample is whole and nothing came after.
        if key is not None and not with_retries("read", shard.url, lambda: _end_of_archive(fh, archive.offset)):
            last = max((info for info, _ in members.values()), key=lambda info: info.offset).name
            yield ScannedItem(row=row, id=key, source=f"{shard.url} member {key}", error=f"tar is cut off after member {last} (no end-of-archive block)")
            return
    if key is not None:
        yield _tar_sample(shard, row, key, members, meta)


def _end_of_archive(fh, offset: int) -> bool:
    """Whether the block where tarfile stopped reading is the end-of-archive marker (zeros)."""
    fh.seek(offset)
    return fh.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE


def synthetic_id(shard: RawShard, row: int) -> str:
    """The id of an item whose own id is missing or unusable: where it is, as in ``source``
    (jsonl lines count from 1)."""
    return f"{shard.url}:{row + 1 if shard.kind == 'jsonl' else row}"


def _parquet_ids(shard: RawShard, column: pa.Array, start: int) -> list[tuple[str, str | None]]:
    """(id, None), or (synthetic id, why) for a null or non-UTF-8 id, per row of a batch."""
    out = []
    for r, (value, problem) in enumerate(utf8_values(canonical_id_array(column)), start=start):
        if value is None:
            out.append((synthetic_id(shard, r), f"id in column {shard.id_column!r} {problem or 'is null'}"))
        else:
            out.append((value, None))
    return out


def _image_bytes_column(column: pa.Array) -> pa.Array:
    """The bytes of an image column: binary, or the 'bytes' field of a struct (Hugging Face
    datasets' Image), read without the struct's other fields."""
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        return pc.struct_field(column, "bytes")
    return column


def _text_values(column: pa.Array) -> list[tuple[str | None, str | None]]:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or (
        pa.types.is_dictionary(column.type) and pa.types.is_string(column.type.value_type)
    ):
        return utf8_values(column)
    return [(None, None) if v is None else (None, f"is not text ({type(v).__name__})") for v in column.to_pylist()]


def _parquet_items(shard: RawShard, meta: list[str], batch: pa.RecordBatch, start: int) -> Iterator[ScannedItem]:
    def column(name: str) -> pa.Array:
        return batch.column(batch.schema.get_field_index(name))

    n = batch.num_rows
    ids = _parquet_ids(shard, column(shard.id_column), start) if shard.id_column else [(synthetic_id(shard, r), None) for r in range(start, start + n)]
    content = column(shard.content_column)
    if shard.modality == "image":
        data = _image_bytes_column(content)
        binary = pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type) or pa.types.is_fixed_size_binary(data.type)
        values = [(v, None) for v in data.to_pylist()] if binary else [(None, f"is not image bytes ({data.type})")] * n
    else:
        values = _text_values(content)
    meta_values = {m: column(m).to_pylist() for m in meta}
    for i, ((item_id, id_error), (value, problem)) in enumerate(zip(ids, values)):
        item = ScannedItem(row=start + i, id=item_id, source=f"{shard.url} row {start + i}", error=id_error)
        if item.error is not None:
            pass
        elif problem is not None:
            item.error = f"{shard.content_column} {problem}"
        elif value is None:
            item.error = f"{shard.content_column} is null"
        elif shard.modality == "image":
            if not value:
                item.error = f"{shard.content_column} is empty (0 bytes)"
            else:
                item.content = value
        else:
            item.text = value
        if meta and item.error is None:
            _take_metadata(item, {m: meta_values[m][i] for m in meta}, meta)
        yield item


def _scan_parquet(shard: RawShard, meta: list[str]) -> Iterator[ScannedItem]:
    """Row group by row group: the rows of a group that cannot be read fail (with their ids when
    the id column still reads), the other groups count."""
    pf = _open_parquet(shard.url)
    columns = list(dict.fromkeys(c for c in (shard.id_column, shard.content_column, *meta) if c))
    start = 0
    for group in range(pf.num_row_groups):
        stop = start + pf.metadata.row_group(group).num_rows
        batches = pf.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=columns, row_groups=[group])
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:  # noqa: BLE001 - a corrupt page fails the rest of its row group
                yield from _unreadable_rows(shard, pf, group, start, stop, f"row group {group} cannot be read ({one_line(exc)})")
                break
            if batch is None:
                break
            yield from _parquet_items(shard, meta, batch, start)
            start += batch.num_rows
        start = stop


def _unreadable_rows(shard: RawShard, pf, group: int, start: int, stop: int, reason: str) -> Iterator[ScannedItem]:
    group_start = stop - pf.metadata.row_group(group).num_rows
    ids: list[tuple[str, str | None]] = []
    if shard.id_column:
        try:
            column = pf.read_row_group(group, columns=[shard.id_column]).column(0).combine_chunks()
            ids = _parquet_ids(shard, column.slice(start - group_start), start)
        except Exception:  # noqa: BLE001 - the ids are unreadable too: the rows are named by position
            ids = []
    for row in range(start, stop):
        item_id = ids[row - start][0] if ids else synthetic_id(shard, row)
        yield ScannedItem(row=row, id=item_id, source=f"{shard.url} row {row}", error=reason)


def _scan_jsonl(shard: RawShard, meta: list[str]) -> Iterator[ScannedItem]:
    fs, path = filesystem(shard.url)
    try:
        fh = with_retries("open", shard.url, lambda: fs.open(path, "rb"))
    except Exception as exc:  # noqa: BLE001 - the whole shard is unreadable
        yield unreadable_shard(shard, one_line(exc))
        return
    explicit_id = shard.id_column != "id"
    with fh:
        for line_no, raw in enumerate(jsonl_lines(fh, infer_compression(shard.url))):
            item = ScannedItem(row=line_no, id=synthetic_id(shard, line_no), source=f"{shard.url} line {line_no + 1}")
            if isinstance(raw, Exception):
                item.error = f"file is cut off or corrupt here ({one_line(raw)})"
                yield item
                return
            if not raw.strip():
                continue  # blank lines are not items
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than Python's stack
                item.error = f"line is not valid JSON ({one_line(exc)})"
                yield item
                continue
            if not isinstance(record, dict):
                item.error = f"line is a JSON {type(record).__name__}, expected an object"
                yield item
                continue
            # No id field: the line names the item (an error if --id-column named the field). A
            # null id fails the item under that name, as a null in a parquet id column does.
            if shard.id_column in record:
                item_id, problem = canonical_id(record[shard.id_column])
                if problem is not None:
                    item.error = f"id field {shard.id_column!r} {problem}"
                else:
                    item.id = item_id
            elif explicit_id:
                item.error = f"id field {shard.id_column!r} is missing"
            text = record.get(shard.content_column)
            if item.error is None:
                if text is None:
                    item.error = f"text field {shard.content_column!r} is missing"
                elif not isinstance(text, str):
                    item.error = f"text field {shard.content_column!r} is not a string ({type(text).__name__})"
                else:
                    item.text = text
            if meta and item.error is None:
                _take_metadata(item, record, meta)
            yield item


def _decompressor(compression: str):
    """A fresh decompressor for one stream (gzip member, bz2 stream, xz stream, zstd frame):
    all have ``decompress``, ``eof`` and ``unused_data``."""
    if compression == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if compression == "bz2":
        return bz2.BZ2Decompressor()
    if compression == "xz":
        return lzma.LZMADecompressor()
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _decompressed_chunks(fh: BinaryIO, compression: str | None) -> Iterator[bytes]:
    """The file's bytes, decompressed; concatenated streams are read one after the other. A
    stream that stops before its end marker raises EOFError after the bytes before the cut."""
    if compression is None:
        while chunk := fh.read(READ_CHUNK_BYTES):
            yield chunk
        return
    decompressor, fed = _decompressor(compression), False
    while chunk := fh.read(READ_CHUNK_BYTES):
        while chunk:
            fed = True
            if out := decompressor.decompress(chunk):
                yield out
            chunk = b""
            if decompressor.eof:  # the next stream, if any, starts in the unused bytes
                chunk, decompressor, fed = decompressor.unused_data, _decompressor(compression), False
    if fed and not decompressor.eof:
        raise EOFError(f"the {compression} stream ends before its end marker (the file is cut off)")


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    if importlib.util.find_spec("zstandard") is not None:
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def jsonl_lines(fh: BinaryIO, compression: str | None) -> Iterator[bytes | Exception]:
    """The lines of a (possibly compressed) file, each with its newline except maybe the last;
    a truncated or corrupt stream ends with the error instead of raising, so the lines before
    it are still used (a line cut by the error is not one of them)."""
    tail: list[bytes] = []  # the line being assembled, in pieces: no quadratic joins for long lines
    try:
        for chunk in _decompressed_chunks(fh, compression):
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                yield b"".join([*tail, chunk[start : end + 1]])
                tail, start = [], end + 1
            if start < len(chunk):
                tail.append(chunk[start:])
    except _stream_errors() as exc:
        yield exc
        return
    if tail:
        yield b"".join(tail)


@contextmanager
def compressed_writer(fh: BinaryIO, compression: str | None) -> Iterator[BinaryIO]:
    """Write through the given compression into ``fh`` (left open: the caller commits it)."""
    if compression is None:
        yield fh
        return
    if compression == "gzip":
        out = gzip.GzipFile(filename="", fileobj=fh, mode="wb", mtime=0)
    elif compression == "bz2":
        out = bz2.BZ2File(fh, "wb")
    elif compression == "xz":
        out = lzma.LZMAFile(fh, "wb")
    else:
        import zstandard

        out = zstandard.ZstdCompressor().stream_writer(fh, closefd=False)
    with out:
        yield out


def _scan_images(shard: RawShard) -> Iterator[ScannedItem]:
    for row, url in enumerate(shard.files):
        item = ScannedItem(row=row, id=relative_id(shard.url, url), source=url)
        fs, path = filesystem(url)
        try:
            item.content = with_retries("read", url, lambda: fs.cat_file(path))
        except Exception as exc:  # noqa: BLE001 - one unreadable file fails one item
            item.error = f"unreadable file ({type(exc).__name__}: {exc})"
        if item.content is not None and not item.content:
            item.error = "file is empty (0 bytes)"
        yield item


def relative_id(root: str, url: str) -> str:
    return url[len(root) :].lstrip("/") if url.startswith(root) else url


# ---------------------------------------------------------------- reading image bytes back


def read_payloads(shard: RawShard, rows: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, sources: list[str]) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(row, image bytes, error) for the given scanned rows, reading only their bytes."""
    if shard.kind == "webdataset":
        fs, path = filesystem(shard.url)
        with fs.open(path, "rb") as fh:
            for row, offset, size in zip(rows, offsets, sizes):
                fh.seek(int(offset))
                data = fh.read(int(size))
                yield int(row), data, None if len(data) == size else f"short read ({len(data)} of {size} bytes)"
    elif shard.kind == "images":
        for row, url in zip(rows, sources):
            fs, path = filesystem(url)
            try:
                yield int(row), with_retries("read", url, lambda: fs.cat_file(path)), None
            except Exception as exc:  # noqa: BLE001
                yield int(row), None, f"unreadable file ({type(exc).__name__}: {exc})"
    else:
        yield from _parquet_payloads(shard, rows)


def _parquet_payloads(shard: RawShard, rows: np.ndarray) -> Iterator[tuple[int, bytes | None, str | None]]:
    pf = _open_parquet(shard.url)
    bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    groups = np.searchsorted(bounds, rows, side="right") - 1
    for g in np.unique(groups):
        column = _image_bytes_column(pf.read_row_group(int(g), columns=[shard.content_column]).column(0).combine_chunks())
        for row in rows[groups == g]:
            yield int(row), column[int(row - bounds[g])].as_py(), None

