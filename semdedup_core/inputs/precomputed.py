"""Dataset readers for precomputed embeddings, read shard by shard and batch by batch.

Two layouts:
- parquet shards with an id column and an embedding column (list of floats);
- clip-retrieval output: ``img_emb/img_emb_N.npy`` (float16, n x d) row-aligned with
  ``metadata/metadata_N.parquet`` (N may be zero-padded).

Everything a run needs to know before work starts (shards, row counts, dimension,
columns, unique ids) comes from :func:`discover_shards` and :func:`check_unique_ids`,
which read footers, headers and id columns only.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from semdedup_core.config import RunConfig
from semdedup_core.storage import expand_input, filesystem, join, list_files, with_retries
from semdedup_core.inputs.vectors import prepare_vectors

CLIP_ID_CANDIDATES = ("id", "key", "image_path", "url")
_CLIP_EMB = re.compile(r"img_emb_(\d+)\.npy$")
_CLIP_META = re.compile(r"metadata_(\d+)\.parquet$")


class InputError(ValueError):
    """Input that cannot be used: names the shard (and item) and the reason."""


# ---------------------------------------------------------------- ids and text that become Arrow strings
#
# Every reader, writer and result file compares ids as Arrow strings, so there is one
# canonical form: string ids as they are, integer ids in decimal. Other types have no
# faithful text form (1.0 vs "1", bytes, lists) and are refused before any work.

ID_TYPES = "ids must be strings or integers"


def id_type_ok(typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)


def check_id_type(url: str, column: str, typ: pa.DataType) -> None:
    if not id_type_ok(typ):
        raise InputError(f"{printable(url)}: id column {column!r} has type {typ}; {ID_TYPES} (cast the column first)")


def canonical_id_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An id column (checked with :func:`check_id_type`) as canonical Arrow strings; nulls stay null."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column if pa.types.is_string(column.type) else pc.cast(column, pa.string())


def canonical_id(value) -> tuple[str | None, str | None]:
    """A Python id (a JSON value) in canonical form, or None and why it cannot be an id."""
    if value is None:
        return None, "is null"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"is a {_json_type(value)}; {ID_TYPES}"
    text = str(value)
    problem = unicode_problem(text)
    return (None, f"is not valid Unicode ({problem})") if problem else (text, None)


def _json_type(value) -> str:
    names = {bool: "boolean", float: "number with a fraction or exponent", dict: "JSON object", list: "JSON array"}
    return names.get(type(value), type(value).__name__)


def unicode_problem(text: str) -> str | None:
    """Why a str cannot be stored as UTF-8 (a lone surrogate, e.g. from JSON's "\\ud800" or a
    file name decoded with surrogateescape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    return None


def printable(text: str) -> str:
    """Text for messages and ``source`` columns: lone surrogates spelled out as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def utf8_values(column: pa.Array) -> list[tuple[str | None, str | None]]:
    """(str, None), (None, None) for null, or (None, reason) per value of a string column:
    parquet readers do not check that string columns hold valid UTF-8."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    out: list[tuple[str | None, str | None]] = []
    for raw in column.cast(pa.large_binary()).to_pylist():
        if raw is None:
            out.append((None, None))
            continue
        try:
            out.append((raw.decode("utf-8"), None))
        except UnicodeDecodeError as exc:
            out.append((None, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})"))
    return out


def check_url_text(url: str) -> None:
    """File names that are not valid UTF-8 cannot name anything in the results."""
    problem = unicode_problem(url)
    if problem:
        raise InputError(f"{printable(url)}: the file name is not valid UTF-8 ({problem}); rename it")


def one_line(exc: BaseException) -> str:
    """An exception as one line of a message: type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return printable(f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)


class Shard(BaseModel):
    """One input unit, small enough to pass between tasks."""

    index: int
    kind: str  # "parquet" | "clip-retrieval"
    url: str  # the embeddings file
    metadata_url: str | None = None  # clip-retrieval metadata parquet
    n_rows: int
    dim: int
    id_column: str | None  # None: ids are synthesised as "<embeddings file URL>:<row>"
    embedding_column: str | None = None  # parquet shards only

    @property
    def name(self) -> str:
        return self.url


@dataclass
class Batch:
    """Rows [start, start + len) of a shard, before vector validation."""

    start: int
    ids: pa.Array  # string
    vectors: np.ndarray  # float (n, d); rows listed in ``bad_rows`` hold zeros
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    bad_rows: dict[int, str] = field(default_factory=dict)  # batch row -> reason


# ---------------------------------------------------------------- discovery


def parquet_objects(entry: str) -> list[str]:
    """The parquet files of one input entry of embeddings (a file, a glob, or a folder's .parquet files)."""
    files, root = expand_input(entry)
    if root is not None:  # a folder: its parquet files
        files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise InputError(f"{entry}: no input files match")
    return files


def discover_shards(cfg: RunConfig, only: set[str] | None = None) -> list[Shard]:
    """Expand the inputs, recognise the format and check each shard's columns and dimension.
    ``only``: open just these parquet files of the inputs (a collection's new objects)."""
    shards: list[Shard] = []
    lengths: dict[int, Counter] = {}  # shard index -> embedding lengths of its sampled rows
    uniform: set[int] = set()  # shards whose rows all have one length (clip-retrieval, fixed-size lists)
    for entry in cfg.input:
        fmt = cfg.format
        if fmt in ("auto", "clip-retrieval") and _is_clip_folder(entry):
            found = _discover_clip(entry, cfg, start=len(shards))
            lengths.update({s.index: Counter({s.dim: s.n_rows}) for s in found})
            uniform.update(s.index for s in found)
        elif fmt == "clip-retrieval":
            raise InputError(f"{entry}: not a clip-retrieval folder (expected img_emb/img_emb_N.npy and metadata/metadata_N.parquet)")
        else:
            files = parquet_objects(entry)
            if only is not None:
                files = [f for f in files if f in only]
            found = []
            for url in files:
                index = len(shards) + len(found)
                shard, lengths[index], fixed = _discover_parquet(url, cfg, index)
                found.append(shard)
                if fixed:
                    uniform.add(index)
        shards.extend(found)
    if not shards:
        raise InputError("no input shards found")
    seen: dict[str, int] = {}
    for s in shards:
        if s.url in seen:
            raise InputError(f"{s.url}: listed twice in the inputs")
        seen[s.url] = s.index
    nonempty = [s for s in shards if s.n_rows]
    if not nonempty:
        raise InputError("the input has no rows")
    dim = _agree_dimension(nonempty, lengths, uniform)
    return [s.model_copy(update={"dim": dim}) for s in shards]


def _agree_dimension(shards: list[Shard], lengths: dict[int, Counter], uniform: set[int]) -> int:
    """The input's dimension: the most common embedding length over every shard's sample.

    Rows of another length fail one by one, wherever they are (a shard's first row
    included); a shard is refused only when none of its sampled rows has the input's
    dimension and at least two agree on another one (or all of its rows have one length:
    clip-retrieval arrays, fixed-size lists): then it is a shard of another model.
    """
    total: Counter = Counter()
    for s in shards:
        total.update(lengths[s.index])
    if not total:
        raise InputError(f"{shards[0].name}: no embedding in the sampled rows of any shard has values (all null or empty)")
    dim = min(total, key=lambda n: (-total[n], n))
    first = next(s for s in shards if lengths[s.index][dim])
    for s in shards:
        own = lengths[s.index]
        if own and not own[dim]:
            other, count = own.most_common(1)[0]
            if count >= 2 or s.index in uniform:
                raise InputError(f"{s.name}: embeddings have dimension {other}, but {first.name} has {dim}")
    return dim


# Read size of a streaming reader (see _open_parquet).
STREAM_BUFFER_BYTES = 2**20


def _open_parquet(url: str, streaming: bool = False) -> pq.ParquetFile:
    """The parquet file at ``url``. ``streaming``: for reading a few rows only: pages are read
    as they are decoded, not each column chunk whole first (a 512-dim shard of 100,000 rows has
    a 200 MB chunk)."""
    check_url_text(url)
    fs, path = filesystem(url)
    options = {"pre_buffer": False, "buffer_size": STREAM_BUFFER_BYTES} if streaming else {}
    try:
        return with_retries("open", url, lambda: pq.ParquetFile(fs.open(path, "rb"), **options))
    except Exception as exc:  # noqa: BLE001 - any reader error means the shard is unreadable
        raise InputError(f"{url}: unreadable parquet shard ({one_line(exc)})") from exc


# Rows per shard whose embedding lengths decide the input's dimension.
DIMENSION_SAMPLE_ROWS = 4096


def _discover_parquet(url: str, cfg: RunConfig, index: int) -> tuple[Shard, Counter, bool]:
    """The shard, the embedding lengths of its first rows, and whether they are fixed-size lists."""
    pf = _open_parquet(url, streaming=True)
    schema = pf.schema_arrow
    id_col = cfg.id_column or "id"
    wanted = [id_col, cfg.embedding_column, *(_metadata_names(cfg))]
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        hint = ""
        if cfg.embedding_column in missing and cfg.format == "auto":
            hint = (
                " (precomputed embeddings need an id column and an embedding column: --id-column/--embedding-column name them;"
                " raw text needs a text column, images an image-bytes column: --text-column/--image-column)"
            )
        raise InputError(f"{url}: missing column(s) {', '.join(missing)}; has {', '.join(schema.names)}{hint}")
    check_id_type(url, id_col, schema.field(id_col).type)
    emb_type = schema.field(cfg.embedding_column).type
    if not (pa.types.is_list(emb_type) or pa.types.is_large_list(emb_type) or pa.types.is_fixed_size_list(emb_type)) or not pa.types.is_floating(
        emb_type.value_type
    ):
        raise InputError(f"{url}: column {cfg.embedding_column!r} has type {emb_type}, expected a list of floats")
    _check_metadata_types(url, schema, cfg)
    n_rows = pf.metadata.num_rows
    if pa.types.is_fixed_size_list(emb_type):
        lengths = Counter({emb_type.list_size: n_rows}) if emb_type.list_size and n_rows else Counter()
    else:
        lengths = _sample_lengths(pf, cfg.embedding_column, url)
    dim = lengths.most_common(1)[0][0] if lengths else 0
    shard = Shard(index=index, kind="parquet", url=url, n_rows=n_rows, dim=dim, id_column=id_col, embedding_column=cfg.embedding_column)
    return shard, lengths, pa.types.is_fixed_size_list(emb_type)


def _sample_lengths(pf: pq.ParquetFile, column: str, url: str) -> Counter:
    """How many of the first rows have each (non-zero) embedding length."""
    lengths: Counter = Counter()
    seen = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[column]):
            values = pc.list_value_length(batch.column(0)).drop_null().to_numpy(zero_copy_only=False)
            lengths.update(int(n) for n in values[values > 0])
            seen += batch.num_rows
            if seen >= DIMENSION_SAMPLE_ROWS:
                break
    except Exception as exc:  # noqa: BLE001 - a corrupt page: the shard cannot be read
        raise InputError(f"{url}: unreadable parquet data in column {column!r} ({one_line(exc)})") from exc
    return lengths


def _metadata_names(cfg: RunConfig) -> list[str]:
    return [spec.partition(":")[0] for spec in cfg.metadata_columns]


def _check_metadata_types(url: str, schema: pa.Schema, cfg: RunConfig) -> None:
    for name in _metadata_names(cfg):
        typ = schema.field(name).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
            raise InputError(f"{url}: metadata column {name!r} has type {typ}; keep='metadata' needs numbers")


def _is_clip_folder(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path) and fs.isdir(posixpath.join(path, "img_emb"))


def _discover_clip(root: str, cfg: RunConfig, start: int) -> list[Shard]:
    emb_files = {int(m.group(1)): u for u in list_files(join(root, "img_emb", "img_emb_*.npy")) if (m := _CLIP_EMB.search(u))}
    meta_files = {int(m.group(1)): u for u in list_files(join(root, "metadata", "metadata_*.parquet")) if (m := _CLIP_META.search(u))}
    if not emb_files:
        raise InputError(f"{root}: no img_emb/img_emb_N.npy files")
    shards = []
    for offset, n in enumerate(sorted(emb_files)):
        emb_url = emb_files[n]
        meta_url = meta_files.get(n)
        if meta_url is None:
            raise InputError(f"{emb_url}: no matching metadata/metadata_{n}.parquet")
        shape, _, _ = _npy_header(emb_url)
        if len(shape) != 2:
            raise InputError(f"{emb_url}: expected a 2-D array, got shape {shape}")
        pf = _open_parquet(meta_url)
        if pf.metadata.num_rows != shape[0]:
            raise InputError(f"{emb_url}: {shape[0]} embeddings but {meta_url} has {pf.metadata.num_rows} rows (they must be row-aligned)")
        names = pf.schema_arrow.names
        if cfg.id_column is not None:
            if cfg.id_column not in names:
                raise InputError(f"{meta_url}: missing id column {cfg.id_column!r}; has {', '.join(names)}")
            id_col = cfg.id_column
        else:
            id_col = next((c for c in CLIP_ID_CANDIDATES if c in names), None)
        if id_col is not None:
            check_id_type(meta_url, id_col, pf.schema_arrow.field(id_col).type)
        missing = [c for c in _metadata_names(cfg) if c not in names]
        if missing:
            raise InputError(f"{meta_url}: missing metadata column(s) {', '.join(missing)}; has {', '.join(names)}")
        _check_metadata_types(meta_url, pf.schema_arrow, cfg)
        shards.append(
            Shard(index=start + offset, kind="clip-retrieval", url=emb_url, metadata_url=meta_url, n_rows=shape[0], dim=shape[1], id_column=id_col)
        )
    return shards


def _npy_header(url: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, from its header alone."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        size = fs.size(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{url}: unreadable .npy shard ({one_line(exc)})") from exc
    if fortran:
        raise InputError(f"{url}: Fortran-ordered .npy is not supported")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size < expected:
        rows = (size - offset) // max(1, int(np.prod(shape[1:])) * dtype.itemsize)
        raise InputError(f"{url}: file is truncated: header says {shape[0]} rows, data holds {rows}")
    return shape, dtype, offset


# ---------------------------------------------------------------- ids


def read_ids(shard: Shard) -> pa.Array:
    """All ids of a shard as strings (synthesised ids when the shard has no id column)."""
    if shard.id_column is None:
        return _synthetic_ids(shard, 0, shard.n_rows)
    url = shard.metadata_url or shard.url
    table = _read_parquet_columns(url, [shard.id_column])
    return _ids_as_strings(table.column(0).combine_chunks(), shard, 0)


def _read_parquet_columns(url: str, columns: list[str]) -> pa.Table:
    pf = _open_parquet(url)
    try:
        return pf.read(columns=columns)
    except Exception as exc:  # noqa: BLE001 - a corrupt page: the shard cannot be read
        raise InputError(f"{url}: unreadable parquet data in column(s) {', '.join(map(repr, columns))} ({one_line(exc)})") from exc


def _synthetic_ids(shard: Shard, start: int, stop: int) -> pa.Array:
    # The full file URL keeps ids unique when several clip-retrieval folders are combined.
    return pa.array([f"{shard.url}:{r}" for r in range(start, stop)], type=pa.string())


def _ids_as_strings(ids: pa.Array, shard: Shard, start: int) -> pa.Array:
    """Canonical ids of precomputed rows: a null or non-UTF-8 id refuses the input (at plan time,
    when :func:`check_unique_ids` reads every id)."""
    where = f"{shard.metadata_url or shard.name}: row"
    if ids.null_count:
        row = start + int(pc.index(pc.is_null(ids), True).as_py())
        raise InputError(f"{where} {row} has a null id in column {shard.id_column!r}")
    ids = canonical_id_array(ids)
    try:
        ids.validate(full=True)
    except pa.ArrowInvalid:
        row, reason = next((r, e) for r, (_, e) in enumerate(utf8_values(ids)) if e)
        raise InputError(f"{where} {start + row} has an id in column {shard.id_column!r} that {reason}") from None
    return ids


def first_duplicate_id(per_shard_ids: list[pa.Array]) -> tuple[str, int] | None:
    """A duplicated id across the shards' ids and how many other ids are duplicated, or None."""
    ids = pa.chunked_array(per_shard_ids, type=pa.string())
    if len(pc.unique(ids)) == len(ids):  # the common case, and twice as fast as counting
        return None
    counts = pc.value_counts(ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    return (dup[0]["values"].as_py(), len(dup) - 1) if len(dup) else None


def duplicate_id_error(dup_id: str, n_more: int, where: list[str]) -> InputError:
    more = f" ({n_more} more duplicated ids)" if n_more else ""
    return InputError(f"duplicate id {dup_id!r} in {' and '.join(where)}{more}; ids must be unique across the input")


def check_unique_ids(shards: list[Shard]) -> None:
    """Ids must be unique across the whole input; names a duplicate and where it occurs."""
    per_shard = [read_ids(s) for s in shards]
    found = first_duplicate_id(per_shard)
    if found is None:
        return
    dup_id, n_more = found
    where = [f"{s.name} row {int(pc.index(ids, dup_id).as_py())}" for s, ids in zip(shards, per_shard) if pc.any(pc.equal(ids, dup_id)).as_py()]
    raise duplicate_id_error(dup_id, n_more, where)


# ---------------------------------------------------------------- reading rows


def iter_batches(shard: Shard, batch_rows: int, metadata_columns: list[str] | None = None) -> Iterator[Batch]:
    """The shard's rows in order, ``batch_rows`` at a time."""
    names = [spec.partition(":")[0] for spec in metadata_columns or []]
    if shard.kind == "parquet":
        yield from _parquet_batches(shard, batch_rows, names)
    else:
        yield from _clip_batches(shard, batch_rows, names)


def _parquet_batches(shard: Shard, batch_rows: int, meta: list[str]) -> Iterator[Batch]:
    pf = _open_parquet(shard.url)
    columns = [shard.id_column, shard.embedding_column, *meta]
    start = 0
    batches = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            rb = next(batches, None)
        except Exception as exc:  # noqa: BLE001 - a corrupt page: the shard cannot be read
            raise InputError(f"{shard.name}: unreadable parquet data after row {start} ({one_line(exc)})") from exc
        if rb is None:
            return
        ids = _ids_as_strings(rb.column(0), shard, start)
        vectors, bad = _list_to_matrix(rb.column(1), shard.dim)
        metadata = {m: _as_float(rb.column(2 + i)) for i, m in enumerate(meta)}
        yield Batch(start=start, ids=ids, vectors=vectors, metadata=metadata, bad_rows=bad)
        start += rb.num_rows


def _as_float(col: pa.Array) -> np.ndarray:
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def _list_to_matrix(col: pa.Array, dim: int) -> tuple[np.ndarray, dict[int, str]]:
    """(n, dim) float array from a list column; null or wrong-length rows become zeros + a reason."""
    n = len(col)
    if pa.types.is_fixed_size_list(col.type) and col.null_count == 0:
        return col.flatten().to_numpy(zero_copy_only=False).reshape(n, dim), {}
    lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
    good = lengths == dim
    if good.all():
        return col.flatten().to_numpy(zero_copy_only=False).reshape(n, dim), {}
    bad = {}
    for r in np.flatnonzero(~good):
        bad[int(r)] = "embedding is null" if lengths[r] < 0 else f"embedding has {lengths[r]} values, expected {dim}"
    out = np.zeros((n, dim), dtype=np.float32)
    kept = col.filter(pa.array(good))
    out[good] = kept.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return out, bad


def _clip_batches(shard: Shard, batch_rows: int, meta: list[str]) -> Iterator[Batch]:
    shape, dtype, offset = _npy_header(shard.url)
    row_bytes = shape[1] * dtype.itemsize
    # The metadata columns needed (ids, ranking columns) are small next to the vectors.
    meta_cols = ([shard.id_column] if shard.id_column else []) + meta
    table = _read_parquet_columns(shard.metadata_url, meta_cols) if meta_cols else None
    fs, path = filesystem(shard.url)
    with fs.open(path, "rb") as fh:
        fh.seek(offset)
        for start in range(0, shard.n_rows, batch_rows):
            stop = min(start + batch_rows, shard.n_rows)
            raw = fh.read((stop - start) * row_bytes)
            if len(raw) != (stop - start) * row_bytes:
                raise InputError(f"{shard.name}: file is truncated at row {start + len(raw) // row_bytes}")
            vectors = np.frombuffer(raw, dtype=dtype).reshape(stop - start, shape[1])
            part = table.slice(start, stop - start) if table is not None else None
            if shard.id_column:
                ids = _ids_as_strings(part.column(shard.id_column).combine_chunks(), shard, start)
            else:
                ids = _synthetic_ids(shard, start, stop)
            metadata = {m: _as_float(part.column(m).combine_chunks()) for m in meta}
            yield Batch(start=start, ids=ids, vectors=vectors, metadata=metadata)


def read_rows(shard: Shard, rows: np.ndarray, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of the given sorted row numbers (for the k-means sample), with a validity mask."""
    out = np.zeros((len(rows), shard.dim), dtype=np.float32)
    valid = np.zeros(len(rows), dtype=bool)
    for batch in iter_batches(shard, batch_rows):
        lo, hi = np.searchsorted(rows, [batch.start, batch.start + len(batch.ids)])
        if lo == hi:
            continue
        local = rows[lo:hi] - batch.start
        picked = batch.vectors[local]
        prepared = prepare_vectors(picked)  # unreadable rows arrive as zeros: invalid here too
        out[lo:hi][prepared.valid] = prepared.vectors
        valid[lo:hi] = prepared.valid
    return out, valid
