"""Fit centroids, assign every item, and group items by bucket of clusters for the dedup tasks.

Each input shard gets a partition in two files written in the same row order, grouped
by bucket (input order inside a bucket):
- ``shard-N.parquet``: the small columns (id, row, cluster, centroid_sim, metadata), one
  row group per (flush, bucket);
- ``shard-N.f32``: the vectors as raw little-endian float32, row-major.
A dedup task reads its row groups and the matching byte ranges of the vectors, straight
into place: no list-column decoding (which costs pyarrow ~4x the vectors' size) and
nothing read that the task does not use (range reads on object storage).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semdedup_core.dedup.clustering import CentroidIndex, fit_spherical_kmeans, gpu_available, sample_rows
from semdedup_core.config import ConfigError
from semdedup_core.run.plan import RunPlan, load_plan
from semdedup_core.run.stage_results import FitResult, PartitionIndex, ShardPartition
from semdedup_core.inputs.precomputed import iter_batches, read_rows
from semdedup_core.storage import atomic_open, parquet_writer, read_json, read_npy, read_parquet, read_range, read_range_into, write_npy, write_parquet
from semdedup_core.inputs.vectors import prepare_vectors

READ_BATCH_ROWS = 16384
# Partition rows are buffered up to this many before being written as row groups, so
# row groups stay large while memory stays bounded for any shard size.
FLUSH_ROWS = 131072
# Vector ranges are read at most this many bytes at a time.
READ_CHUNK_BYTES = 32 * 2**20
_F32 = np.dtype("<f4")

FAILED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string())])


def _meta_names(plan: RunPlan) -> list[str]:
    return [spec.partition(":")[0] for spec in plan.config.metadata_columns]


def partition_schema(metadata: list[str]) -> pa.Schema:
    fields = [
        ("id", pa.string()),
        ("row", pa.int64()),
        ("cluster", pa.int32()),
        ("centroid_sim", pa.float32()),
    ]
    fields += [(f"meta_{m}", pa.float64()) for m in metadata]
    return pa.schema(fields)


# ---------------------------------------------------------------- fit


def plan_buckets(estimated_sizes: np.ndarray, n_buckets: int) -> np.ndarray:
    """Cluster -> bucket, largest clusters first onto the lightest bucket (balanced work)."""
    bucket_of = np.zeros(len(estimated_sizes), dtype=np.int32)
    # Work per cluster grows with size^2 in the kernel but memory with size; balance rows.
    heap = [(0.0, b) for b in range(n_buckets)]
    for cluster in np.argsort(-estimated_sizes, kind="stable"):
        load, b = heapq.heappop(heap)
        bucket_of[cluster] = b
        heapq.heappush(heap, (load + float(estimated_sizes[cluster]) + 1e-9, b))
    return bucket_of


def fit_centroids(plan: RunPlan) -> FitResult:
    """Seeded sample -> spherical k-means -> centroids.npy and the bucket plan. A collection's
    generation reuses its base's centroids and bucket plan instead."""
    layout, cfg = plan.layout, plan.config
    if plan.earlier:
        base = load_plan(plan.earlier[0])
        write_npy(layout.centroids, read_npy(base.layout.centroids))
        write_npy(layout.bucket_of_cluster, read_npy(base.layout.bucket_of_cluster))
        return FitResult.model_validate(read_json(base.layout.clustering_stats))
    wanted = cfg.kmeans_points_per_centroid * plan.clusters
    per_shard = sample_rows([s.n_rows for s in plan.shards], wanted, cfg.seed)
    parts = []
    for shard, rows in zip(plan.shards, per_shard):
        if len(rows):
            vectors, valid = read_rows(shard, rows)
            parts.append(vectors[valid])
    sample = np.concatenate(parts) if parts else np.zeros((0, plan.dim), np.float32)
    if len(sample) < plan.clusters:
        raise ConfigError(f"clusters={plan.clusters} but only {len(sample)} items of the k-means sample are valid; lower --clusters")
    use_gpu = plan.device.startswith("cuda") and gpu_available()
    fit = fit_spherical_kmeans(sample, plan.clusters, cfg.kmeans_iterations, cfg.seed, use_gpu=use_gpu, method=cfg.kmeans_method)
    estimated = np.bincount(fit.labels, minlength=plan.clusters).astype(np.float64) * (plan.n_input / len(sample))
    bucket_of = plan_buckets(estimated, plan.buckets)
    write_npy(layout.centroids, fit.centroids)
    write_npy(layout.bucket_of_cluster, bucket_of)
    return FitResult(
        clusters=plan.clusters,
        buckets=plan.buckets,
        sample_size=fit.sample_size,
        iterations=cfg.kmeans_iterations,
        gpu=use_gpu,
        **fit.stats(),
    )


# ---------------------------------------------------------------- assign


@dataclass
class _Buffer:
    ids: list[pa.Array]
    rows: list[np.ndarray]
    clusters: list[np.ndarray]
    sims: list[np.ndarray]
    vectors: list[np.ndarray]
    metadata: dict[str, list[np.ndarray]]

    @classmethod
    def empty(cls, meta: list[str]) -> _Buffer:
        return cls([], [], [], [], [], {m: [] for m in meta})

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)


def assign_shard(plan: RunPlan, shard_index: int) -> ShardPartition:
    """Assign a shard's items to centroids and write its partition and failures."""
    layout = plan.layout
    shard = plan.shards[shard_index]
    meta = _meta_names(plan)
    centroids = read_npy(layout.centroids)
    bucket_of = read_npy(layout.bucket_of_cluster)
    index = CentroidIndex(centroids, device=plan.device)
    schema = partition_schema(meta)
    # bucket -> [[row group, first row, rows], ...]
    row_groups: dict[int, list[list[int]]] = {}
    counts = np.zeros(plan.clusters, dtype=np.int64)
    failed: list[tuple[str, str, str]] = []
    n_rows_written = 0
    n_groups = 0

    with parquet_writer(layout.partition(shard_index), schema) as writer, atomic_open(layout.partition_vectors(shard_index)) as vector_file:
        buffer = _Buffer.empty(meta)

        def flush() -> None:
            nonlocal buffer, n_rows_written, n_groups
            if not len(buffer):
                return
            clusters = np.concatenate(buffer.clusters)
            buckets = bucket_of[clusters]
            order = np.argsort(buckets, kind="stable")  # keeps input order inside a bucket
            columns = {
                "id": pa.concat_arrays(buffer.ids).take(pa.array(order)),
                "row": np.concatenate(buffer.rows)[order],
                "cluster": clusters[order],
                "centroid_sim": np.concatenate(buffer.sims)[order],
            }
            for m in meta:
                columns[f"meta_{m}"] = np.concatenate(buffer.metadata[m])[order]
            table = pa.table(columns, schema=schema)
            vector_file.write(memoryview(np.concatenate(buffer.vectors)[order].astype(_F32, copy=False)))
            sorted_buckets = buckets[order]
            starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
            stops = np.r_[starts[1:], len(order)]
            for lo, hi in zip(starts, stops):
                row_groups.setdefault(int(sorted_buckets[lo]), []).append([n_groups, n_rows_written + int(lo), int(hi - lo)])
                writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
                n_groups += 1
            n_rows_written += len(order)
            buffer = _Buffer.empty(meta)

        for batch in iter_batches(shard, READ_BATCH_ROWS, meta):
            # Unreadable rows arrive as zeros, so they are invalid here too; keep their own reason.
            prepared = prepare_vectors(batch.vectors)
            valid, vectors = prepared.valid, prepared.vectors
            errors = {**prepared.errors, **batch.bad_rows}
            for r in sorted(errors):
                failed.append((batch.ids[r].as_py(), f"{shard.name} row {batch.start + r}", errors[r]))
            clusters, sims = index.assign(vectors)
            counts += np.bincount(clusters, minlength=plan.clusters)
            buffer.ids.append(batch.ids.filter(pa.array(valid)))
            buffer.rows.append(batch.start + np.flatnonzero(valid))
            buffer.clusters.append(clusters)
            buffer.sims.append(sims)
            buffer.vectors.append(vectors)
            for m in meta:
                buffer.metadata[m].append(batch.metadata[m][valid])
            if len(buffer) >= FLUSH_ROWS:
                flush()
        flush()

    write_parquet(
        layout.partition_failed(shard_index),
        pa.table({k: [f[i] for f in failed] for i, k in enumerate(FAILED_SCHEMA.names)}, schema=FAILED_SCHEMA),
    )
    return ShardPartition(
        shard=shard_index,
        n_rows=shard.n_rows,
        n_assigned=n_rows_written,
        n_failed=len(failed),
        row_groups={str(b): rgs for b, rgs in sorted(row_groups.items())},
        cluster_counts={str(c): int(n) for c, n in enumerate(counts) if n},
    )


def collect_partitions(plan: RunPlan) -> PartitionIndex:
    """Merge the shard manifests into one index (bucket -> shard row groups) and cluster sizes."""
    layout = plan.layout
    buckets: list[list[list]] = [[] for _ in range(plan.buckets)]
    sizes = np.zeros(plan.clusters, dtype=np.int64)
    n_failed = n_assigned = 0
    for shard in plan.shards:
        manifest = read_json(layout.partition_manifest(shard.index))
        for b, groups in manifest["row_groups"].items():
            buckets[int(b)].append([shard.index, groups])
        for c, n in manifest["cluster_counts"].items():
            sizes[int(c)] += n
        n_failed += manifest["n_failed"]
        n_assigned += manifest["n_assigned"]
    write_npy(layout.cluster_sizes, sizes)
    return PartitionIndex(buckets=buckets, n_assigned=n_assigned, n_failed=n_failed, nonempty_clusters=int((sizes > 0).sum()))


# ---------------------------------------------------------------- read a bucket


@dataclass
class BucketData:
    """A bucket's items grouped by cluster, each cluster's rows in keep order."""

    ids: pa.Array
    cluster: np.ndarray  # int32, non-decreasing
    centroid_sim: np.ndarray
    vectors: np.ndarray  # float32 (n, d)
    starts: np.ndarray  # per cluster in ``clusters``: first row
    clusters: np.ndarray  # cluster ids present, ascending


@dataclass
class BucketKeys:
    """A bucket's rows (optionally only some clusters) used only as keys: ids and clusters in
    keep order as in BucketData, but the vectors left as stored, every row of the bucket's row
    groups read in one contiguous copy; ``rows`` maps keep order to rows of ``vectors``. The
    caller gathers each cluster's keys where it needs them: one copy instead of a reorder and
    a gather."""

    ids: pa.Array
    cluster: np.ndarray
    starts: np.ndarray
    clusters: np.ndarray
    vectors: np.ndarray
    rows: np.ndarray


@dataclass
class _KeepOrder:
    parts: list  # (shard, row groups, kept-row mask or None, small columns)
    table: pa.Table | None  # small columns of the selected rows, as stored
    perm: np.ndarray  # keep position -> selected row
    cluster: np.ndarray  # per selected row
    centroid_sim: np.ndarray
    starts: np.ndarray  # per cluster, first keep position
    clusters: np.ndarray


def _keep_order(plan: RunPlan, bucket_entries: list, order_fn, only_clusters: np.ndarray | None) -> _KeepOrder:
    """Read a bucket's small columns (optionally only some clusters) and compute each row's
    keep-order position."""
    meta = _meta_names(plan)
    small_cols = ["id", "cluster", "centroid_sim", *[f"meta_{m}" for m in meta]]
    parts = []
    for shard_index, groups in bucket_entries:
        t = read_parquet(plan.layout.partition(shard_index), columns=small_cols, row_groups=[g for g, _, _ in groups])
        keep = None
        if only_clusters is not None:
            keep = np.isin(t.column("cluster").to_numpy(), only_clusters)
            t = t.filter(pa.array(keep))
        parts.append((shard_index, groups, keep, t))
    table = pa.concat_tables([p[3] for p in parts]) if parts else None
    if table is None or table.num_rows == 0:
        empty = np.zeros(0, np.int32)
        return _KeepOrder(parts, None, empty.astype(np.int64), empty, np.zeros(0, np.float32), empty, empty)
    cluster = table.column("cluster").to_numpy()
    sims = table.column("centroid_sim").to_numpy()
    metadata = {m: table.column(f"meta_{m}").to_numpy() for m in meta}
    by_cluster = np.argsort(cluster, kind="stable")  # input order inside each cluster
    sorted_clusters = cluster[by_cluster]
    starts = np.flatnonzero(np.r_[True, sorted_clusters[1:] != sorted_clusters[:-1]])
    stops = np.r_[starts[1:], len(by_cluster)]
    perm = np.empty_like(by_cluster)  # perm[destination] = source row
    for lo, hi in zip(starts, stops):
        members = by_cluster[lo:hi]
        local = order_fn(int(sorted_clusters[lo]), sims[members], {m: v[members] for m, v in metadata.items()})
        perm[lo:hi] = members[local]
    return _KeepOrder(parts, table, perm, cluster, sims, starts, sorted_clusters[starts])


def load_bucket(plan: RunPlan, bucket_entries: list, order_fn, only_clusters: np.ndarray | None = None) -> BucketData:
    """Read a bucket's rows (optionally only some clusters) and lay them out in keep order.

    Small columns are read first to compute each row's destination, then vector byte
    ranges are read chunk by chunk straight into place: peak memory is the bucket's
    vectors plus one chunk, never two copies.
    """
    order = _keep_order(plan, bucket_entries, order_fn, only_clusters)
    if order.table is None:
        empty = np.zeros(0, np.int32)
        return BucketData(pa.array([], pa.string()), empty, np.zeros(0, np.float32), np.zeros((0, plan.dim), np.float32), empty, empty)
    perm = order.perm
    dest = np.empty_like(perm)
    dest[perm] = np.arange(len(perm))
    vectors = np.empty((len(perm), plan.dim), dtype=np.float32)
    offset = 0  # next source row (after the cluster filter) across all parts
    for shard_index, groups, keep, _ in order.parts:
        pos = 0  # row within this shard's selected row groups (before the filter)
        for first, count in _chunked_ranges([(r, n) for _, r, n in groups], plan.dim):
            block = _read_vectors(plan, shard_index, first, count)
            if keep is not None:
                block = block[keep[pos : pos + count]]
            vectors[dest[offset : offset + len(block)]] = block
            offset += len(block)
            pos += count
    return BucketData(
        ids=order.table.column("id").combine_chunks().take(pa.array(perm)),
        cluster=order.cluster[perm],
        centroid_sim=order.centroid_sim[perm],
        vectors=vectors,
        starts=order.starts,
        clusters=order.clusters,
    )


def load_bucket_keys(plan: RunPlan, bucket_entries: list, order_fn, only_clusters: np.ndarray | None = None) -> BucketKeys:
    """Like load_bucket for rows that are only keys (see BucketKeys)."""
    order = _keep_order(plan, bucket_entries, order_fn, only_clusters)
    if order.table is None:  # nothing selected: no vector is read
        return BucketKeys(pa.array([], pa.string()), order.cluster, order.starts, order.clusters, np.zeros((0, plan.dim), np.float32), np.zeros(0, np.int64))
    n_stored = sum(n for _, groups, _, _ in order.parts for _, _, n in groups)
    vectors = np.empty((n_stored, plan.dim), dtype=np.float32)
    stored_row = []  # per selected row, its row in ``vectors``
    offset = 0
    for shard_index, groups, keep, _ in order.parts:
        part_rows = sum(n for _, _, n in groups)
        for first, count in _chunked_ranges([(r, n) for _, r, n in groups], plan.dim):
            read_range_into(plan.layout.partition_vectors(shard_index), first * plan.dim * _F32.itemsize, vectors[offset : offset + count])
            offset += count
        rows = np.arange(offset - part_rows, offset)
        stored_row.append(rows if keep is None else rows[keep])
    return BucketKeys(
        ids=order.table.column("id").combine_chunks().take(pa.array(order.perm)),
        cluster=order.cluster[order.perm],
        starts=order.starts,
        clusters=order.clusters,
        vectors=vectors,
        rows=np.concatenate(stored_row)[order.perm],
    )


def _chunked_ranges(ranges: list[tuple[int, int]], dim: int) -> list[tuple[int, int]]:
    """Split (first row, rows) ranges so no read exceeds READ_CHUNK_BYTES."""
    step = max(1, READ_CHUNK_BYTES // (dim * _F32.itemsize))
    return [(first + s, min(step, rows - s)) for first, rows in ranges for s in range(0, rows, step)]


def _read_vectors(plan: RunPlan, shard_index: int, first: int, count: int) -> np.ndarray:
    row_bytes = plan.dim * _F32.itemsize
    data = read_range(plan.layout.partition_vectors(shard_index), first * row_bytes, (first + count) * row_bytes)
    return np.frombuffer(data, dtype=_F32).reshape(count, plan.dim)
