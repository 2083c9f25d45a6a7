"""The embedding stage for raw inputs: scan[shard] ─▶ resolve exact duplicates ─▶ embed[shard].

- ``scan_shard`` reads every item once without decoding: id, source, a content hash
  (image bytes, or normalised text), the text itself, where an image's bytes live, and
  the reason when an item is unusable.
- ``resolve_exact`` checks ids are unique over the whole input and keeps the first copy
  (shard order, then row order) of every content hash: later copies are removed with
  reason ``exact`` and never embedded.
- ``embed_shard`` embeds the rest (images decoded in DataLoader workers) into
  ``embeddings/shard-N.parquet`` (id + float32 embedding): a precomputed-embeddings shard
  that the rest of the pipeline reads like any other.

Each unit returns its result; the DAG stores it as the unit's marker, last.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import time
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from semdedup_core.config import RunConfig
from semdedup_core.embedding.models import ImageEmbedder, TextEmbedder, load_embedder
from semdedup_core.dedup.partitions import FAILED_SCHEMA
from semdedup_core.inputs.datasets import RawShard, ScannedItem, read_payloads, scan_items, synthetic_id
from semdedup_core.run.plan import RunPlan, default_buckets
from semdedup_core.run.stage_results import EmbedResult, ExactResult, ScanResult
from semdedup_core.inputs.precomputed import Shard, duplicate_id_error, first_duplicate_id, printable, unicode_problem
from semdedup_core.storage import current_s3_options, parquet_writer, s3_options, read_json, read_parquet, write_parquet

HASH_BYTES = 16
# Text is tokenized in chunks of this many texts whose windows are sorted by length, so a
# batch pads to similar lengths.
TEXT_SORT_CHUNK = 4096
EXACT_SCHEMA = pa.schema([("id", pa.string()), ("dup_of", pa.string()), ("shard", pa.int32()), ("row", pa.int64()), ("source", pa.string())])


def scan_schema(metadata: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.string()),
            ("source", pa.string()),
            ("error", pa.string()),
            ("hash", pa.binary(HASH_BYTES)),
            ("offset", pa.int64()),
            ("size", pa.int64()),
            ("text", pa.string()),
            *[(f"meta_{m}", pa.float64()) for m in metadata],
        ]
    )


def _meta_names(cfg: RunConfig) -> list[str]:
    return [spec.partition(":")[0] for spec in cfg.metadata_columns]


# ---------------------------------------------------------------- scan


def normalise_text(text: str) -> str:
    """What counts as the same text: Unicode NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_hash(item: ScannedItem) -> bytes:
    data = item.content if item.content is not None else normalise_text(item.text or "").encode()
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def scan_shard(plan: RunPlan, shard_index: int) -> ScanResult:
    """scan/shard-N.parquet: one row per item, unusable ones with their reason."""
    layout, cfg = plan.layout, plan.config
    shard = plan.sources[shard_index]
    meta = _meta_names(cfg)
    columns: dict[str, list] = {name: [] for name in scan_schema(meta).names}
    for item in scan_items(shard, cfg.metadata_columns):
        _make_storable(shard, item)
        if item.error is None and shard.modality == "text" and not item.text.strip():
            item.error = "text is empty" if not item.text else "text is only whitespace"
        columns["row"].append(item.row)
        columns["id"].append(item.id)
        columns["source"].append(item.source)
        columns["error"].append(item.error)
        columns["hash"].append(content_hash(item) if item.error is None else None)
        columns["offset"].append(item.offset)
        columns["size"].append(item.size)
        columns["text"].append(item.text if item.error is None else None)
        for m in meta:
            columns[f"meta_{m}"].append(item.metadata.get(m, np.nan))
    table = pa.table(columns, schema=scan_schema(meta))
    write_parquet(layout.scan(shard_index), table)
    n_failed = table.num_rows - pc.sum(pc.is_null(table.column("error"))).as_py() if table.num_rows else 0
    return ScanResult(shard=shard_index, n_items=table.num_rows, n_failed=int(n_failed))


def _make_storable(shard: RawShard, item: ScannedItem) -> None:
    """Every string of an item becomes UTF-8 in Arrow: an id or text that cannot (a lone
    surrogate from JSON's escapes, a tar member name that is not UTF-8) fails the item under
    its synthetic id; names in ``source`` and ``error`` are spelled out with escapes."""
    if problem := unicode_problem(item.id):
        item.error = item.error or f"id is not valid Unicode ({problem})"
        item.id = synthetic_id(shard, item.row) if shard.kind != "images" else printable(item.id)
    if item.text is not None and (problem := unicode_problem(item.text)):
        item.error, item.text = item.error or f"text is not valid Unicode ({problem})", None
    item.source = printable(item.source)
    if item.error is not None:
        item.error = printable(item.error)


# ---------------------------------------------------------------- exact duplicates


def resolve_exact(plan: RunPlan) -> ExactResult:
    """Unique ids across the input; later copies of identical content -> exact/duplicates.parquet."""
    layout = plan.layout
    scans = [read_parquet(layout.scan(s.index), columns=["row", "id", "source", "error", "hash"]) for s in plan.sources]
    _check_unique_ids(scans)
    ids = pa.chunked_array([t.column("id") for t in scans], type=pa.string()).combine_chunks()
    sources = pa.chunked_array([t.column("source") for t in scans], type=pa.string()).combine_chunks()
    shard_of = np.concatenate([np.full(t.num_rows, i, np.int32) for i, t in enumerate(scans)]) if scans else np.zeros(0, np.int32)
    rows = np.concatenate([t.column("row").to_numpy() for t in scans]) if scans else np.zeros(0, np.int64)
    valid = np.concatenate([pc.is_null(t.column("error")).to_numpy(zero_copy_only=False) for t in scans]) if scans else np.zeros(0, bool)
    duplicates = EXACT_SCHEMA.empty_table()
    if plan.config.exact_dedup and valid.any():
        hashes = pa.chunked_array([t.column("hash") for t in scans]).combine_chunks().filter(pa.array(valid))
        keys = np.frombuffer(hashes.buffers()[1], dtype=[("hi", "<u8"), ("lo", "<u8")], count=len(hashes), offset=hashes.offset * HASH_BYTES)
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)  # stable: first copy in input order
        valid_rows = np.flatnonzero(valid)
        original = valid_rows[first[inverse.reshape(-1)]]
        copies = original != valid_rows
        dup_rows, of_rows = valid_rows[copies], original[copies]
        duplicates = pa.table(
            {
                "id": ids.take(pa.array(dup_rows)),
                "dup_of": ids.take(pa.array(of_rows)),
                "shard": shard_of[dup_rows],
                "row": rows[dup_rows],
                "source": sources.take(pa.array(dup_rows)),
            },
            schema=EXACT_SCHEMA,
        )
    write_parquet(layout.exact_duplicates, duplicates)
    return ExactResult(n_items=len(ids), n_failed=int((~valid).sum()), n_exact=duplicates.num_rows)


def _check_unique_ids(scans: list[pa.Table]) -> None:
    found = first_duplicate_id([t.column("id").combine_chunks() for t in scans])
    if found is None:
        return
    dup_id, n_more = found
    where = [source for t in scans for source in t.filter(pc.equal(t.column("id"), dup_id)).column("source").to_pylist()]
    raise duplicate_id_error(dup_id, n_more, where[:2])


# ---------------------------------------------------------------- embed


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


def open_image(data: bytes) -> Image.Image:
    """Decode fully and convert to RGB; modes without a faithful RGB conversion are refused."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.UnidentifiedImageError:  # its message names a BytesIO object's address
        raise ImageError("cannot decode image (not a known image format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image ({exc})") from None
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        raise ImageError("palette image with transparency is not supported (convert it to RGB or RGBA first)")
    if mode == "CMYK":
        raise ImageError("CMYK image is not supported (convert it to RGB first)")
    if mode.startswith("I") or mode == "F":
        raise ImageError(f"{'16' if ';16' in mode else '32'}-bit image (mode {mode}) is not supported (convert it to 8-bit RGB first)")
    if mode in ("L", "1", "P", "RGBA", "LA"):
        return img.convert("RGB")
    raise ImageError(f"image mode {mode} is not supported")


class DecodedImages(torch.utils.data.IterableDataset):
    """Batches of (rows, pixels, failures) for the given scanned rows of one shard.

    Each DataLoader worker reads and decodes a contiguous part of the rows, so the model
    never waits on I/O and no bytes are read twice. A batch is always the same run of
    ``batch_size`` input rows (less the ones that fail to decode), whatever the number of
    workers: the model sees the same batches, so the embeddings do not depend on
    ``decode_workers``.
    """

    def __init__(self, shard: RawShard, scanned: pa.Table, preprocess, batch_size: int):
        self.shard = shard
        self.rows = scanned.column("row").to_numpy()
        self.offsets = scanned.column("offset").to_numpy()
        self.sizes = scanned.column("size").to_numpy()
        self.sources = scanned.column("source").to_pylist()
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.s3_options = current_s3_options()  # decoder processes do not inherit the context

    def __iter__(self):
        with s3_options(self.s3_options):
            yield from self._decoded()

    def _decoded(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n_batches = -(-len(self.rows) // self.batch_size)
        lo = n_batches * worker // workers * self.batch_size
        hi = min(len(self.rows), n_batches * (worker + 1) // workers * self.batch_size)
        rows, pixels, failures = [], [], []
        payloads = read_payloads(self.shard, self.rows[lo:hi], self.offsets[lo:hi], self.sizes[lo:hi], self.sources[lo:hi])
        for i, (row, data, error) in enumerate(payloads, start=1):
            if error is None:
                try:
                    pixels.append(self.preprocess(open_image(data)))
                    rows.append(row)
                except ImageError as exc:
                    failures.append((row, str(exc)))
            else:
                failures.append((row, error))
            if i % self.batch_size == 0 or lo + i == hi:  # the end of a batch of input rows
                if rows or failures:
                    yield np.array(rows, dtype=np.int64), torch.stack(pixels) if pixels else None, failures
                rows, pixels, failures = [], [], []


def _decoder_context() -> multiprocessing.context.BaseContext:
    """forkserver: a forked worker inherits the task runner's threads, locks and exit
    handlers (Prefect's API and log threads, a storage client) and can die at exit;
    forkserver workers fork from a clean server instead. The server imports the decoding
    stack once per process (seconds, once), so each shard's workers start at once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "open_clip", "torchvision.transforms"])
    return ctx


def _embed_images(embedder: ImageEmbedder, shard: RawShard, todo: pa.Table, cfg: RunConfig, device: str):
    dataset = DecodedImages(shard, todo, embedder.preprocess, cfg.batch_size)
    workers = min(cfg.decode_workers, max(1, todo.num_rows // cfg.batch_size))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=_decoder_context() if workers else None,
        pin_memory=device.startswith("cuda"),
    )
    for rows, pixels, failures in loader:
        vectors = embedder.encode(pixels) if pixels is not None else np.zeros((0, embedder.dim), np.float32)
        yield rows, vectors, failures


def _embed_texts(embedder: TextEmbedder, todo: pa.Table, cfg: RunConfig, counts: dict[str, int]):
    """Texts in chunks tokenized once into windows; a text longer than the model's limit is
    chunked (all its windows pooled), truncated (its first window) or failed, per
    ``cfg.long_text``, and counted in ``counts["n_long_texts"]``."""
    rows = todo.column("row").to_numpy()
    texts = todo.column("text").to_pylist()
    for lo in range(0, len(texts), TEXT_SORT_CHUNK):
        chunk_rows, chunk = rows[lo : lo + TEXT_SORT_CHUNK], texts[lo : lo + TEXT_SORT_CHUNK]
        windows = embedder.windows(chunk)
        counts["n_long_texts"] += int(windows.long.sum())
        failures = []
        if cfg.long_text == "fail" and windows.long.any():
            long_at = np.flatnonzero(windows.long)
            tokens = embedder.too_long([chunk[i] for i in long_at])
            failures = [(int(chunk_rows[i]), f"text has {n} tokens, more than max_length {embedder.max_length} (truncation is off)") for i, n in zip(long_at, tokens)]
            fits = np.flatnonzero(~windows.long)
            windows, chunk_rows = windows.select(fits), chunk_rows[fits]
        if cfg.long_text != "chunk":
            windows = windows.first_only()
        if len(chunk_rows):
            yield chunk_rows, embedder.encode_windows(windows, cfg.batch_size), failures
        elif failures:
            yield np.zeros(0, np.int64), np.zeros((0, embedder.dim), np.float32), failures


def embedding_schema(dim: int, metadata: list[str]) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim)), *[(m, pa.float64()) for m in metadata]])


def embed_shard(plan: RunPlan, shard_index: int) -> EmbedResult:
    """embeddings/shard-N.parquet (rows in input order) + .failed.parquet."""
    layout, cfg = plan.layout, plan.config
    started = time.perf_counter()
    shard = plan.sources[shard_index]
    meta = _meta_names(cfg)
    scan = read_parquet(layout.scan(shard_index))
    duplicates = read_parquet(layout.exact_duplicates, columns=["shard", "row"])
    dup_rows = duplicates.filter(pc.equal(duplicates.column("shard"), shard_index)).column("row")
    usable = pc.is_null(scan.column("error"))
    todo = scan.filter(pc.and_(usable, pc.invert(pc.is_in(scan.column("row"), value_set=dup_rows.combine_chunks()))))
    failures: list[tuple[int, str]] = []
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    embedder = load_embedder(cfg, shard.modality, plan.device)
    long_texts = {"n_long_texts": 0}
    if todo.num_rows:
        batches = _embed_images(embedder, shard, todo, cfg, plan.device) if shard.modality == "image" else _embed_texts(embedder, todo, cfg, long_texts)
        for rows, vectors, batch_failures in batches:
            parts.append((rows, vectors))
            failures += batch_failures
    rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    vectors = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, embedder.dim), np.float32)
    order = np.argsort(rows, kind="stable")  # input order, whatever order workers finished in
    rows, vectors = rows[order], np.ascontiguousarray(vectors[order], dtype=np.float32)
    position = pc.index_in(pa.array(rows), value_set=todo.column("row").combine_chunks())
    done_items = todo.take(position)
    columns = {"id": done_items.column("id"), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), embedder.dim)}
    columns.update({m: done_items.column(f"meta_{m}") for m in meta})
    with parquet_writer(layout.embeddings(shard_index), embedding_schema(embedder.dim, meta)) as writer:
        writer.write_table(pa.table(columns, schema=embedding_schema(embedder.dim, meta)))
    write_parquet(layout.embeddings_failed(shard_index), _failed_table(scan, todo, failures))
    text = shard.modality == "text"  # longer than the model's limit: chunked, truncated or failed
    return EmbedResult(
        shard=shard_index,
        n_items=scan.num_rows,
        n_embedded=len(rows),
        n_failed=scan.num_rows - todo.num_rows - len(dup_rows) + len(failures),
        n_exact=len(dup_rows),
        dim=embedder.dim,
        seconds=round(time.perf_counter() - started, 3),
        n_long_texts=long_texts["n_long_texts"] if text else None,
        long_text=cfg.long_text if text else None,
    )


def _failed_table(scan: pa.Table, todo: pa.Table, failures: list[tuple[int, str]]) -> pa.Table:
    """Scan failures and embedding failures of a shard, in input order."""
    scan_failed = scan.filter(pc.invert(pc.is_null(scan.column("error"))))
    failed_rows = np.array([r for r, _ in failures], dtype=np.int64)
    at = pc.index_in(pa.array(failed_rows), value_set=todo.column("row").combine_chunks())
    embed_failed = todo.take(at)
    table = pa.table(
        {
            "row": pa.concat_arrays([scan_failed.column("row").combine_chunks(), pa.array(failed_rows)]),
            "id": pa.concat_arrays([scan_failed.column("id").combine_chunks(), embed_failed.column("id").combine_chunks()]),
            "source": pa.concat_arrays([scan_failed.column("source").combine_chunks(), embed_failed.column("source").combine_chunks()]),
            "error": pa.concat_arrays([scan_failed.column("error").combine_chunks(), pa.array([printable(e) for _, e in failures], pa.string())]),
        }
    )
    return table.sort_by("row").select(FAILED_SCHEMA.names).cast(FAILED_SCHEMA)


# ---------------------------------------------------------------- hand over to the dedup stages


def plan_embedded(plan: RunPlan) -> RunPlan:
    """The plan for the dedup stages: the run's own embeddings shards, k and buckets from
    the number of items embedded."""
    layout, cfg = plan.layout, plan.config
    markers = [read_json(layout.embeddings_done(s.index)) for s in plan.sources]
    n_embedded = sum(m["n_embedded"] for m in markers)
    dim = markers[0]["dim"]
    shards = [
        Shard(index=s.index, kind="parquet", url=layout.embeddings(s.index), n_rows=m["n_embedded"], dim=dim, id_column="id", embedding_column="embedding")
        for s, m in zip(plan.sources, markers)
    ]
    if plan.earlier:  # a collection's generation: the base's k and bucket plan
        clusters, buckets = plan.clusters, plan.buckets
    else:
        clusters = cfg.clusters_for(n_embedded)
        buckets = min(clusters, cfg.buckets if cfg.buckets is not None else default_buckets(n_embedded, dim, clusters))
    return plan.model_copy(update={"shards": shards, "n_input": sum(m["n_items"] for m in markers), "dim": dim, "clusters": clusters, "buckets": buckets})
