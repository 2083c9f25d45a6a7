"""Score a bucket of clusters: keep order, kernel, threshold, one scores parquet per bucket."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from semdedup_core.dedup.kernel import ClusterScores, cluster_max_sim, removed_mask
from semdedup_core.dedup.ordering import cluster_order
from semdedup_core.dedup.partitions import BucketData, load_bucket, load_bucket_keys
from semdedup_core.run.plan import PlanRef, RunPlan, load_plan
from semdedup_core.run.stage_results import BucketScores, PartitionIndex
from semdedup_core.storage import exists, read_json, read_parquet, write_parquet

SCORES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("cluster", pa.int32()),
        ("centroid_sim", pa.float32()),
        ("max_sim", pa.float32()),
        ("dup_of", pa.string()),
        ("kept", pa.bool_()),
    ]
)

OrderFn = Callable[[int, np.ndarray, dict[str, np.ndarray]], np.ndarray]


def order_function(plan: RunPlan) -> OrderFn:
    cfg = plan.config

    def order(cluster: int, centroid_sim: np.ndarray, metadata: dict[str, np.ndarray]) -> np.ndarray:
        return cluster_order(
            cfg.keep, centroid_sim, seed=cfg.seed, cluster=cluster, metadata=metadata, metadata_columns=cfg.metadata_columns
        )

    return order


def iter_cluster_scores(plan: RunPlan, data: BucketData, scored: pa.Table | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(cluster, first row, max_sim, dup_of as bucket rows) for every cluster of a loaded bucket.

    Clusters found in ``scored`` (the tuning sample's scores, same keep order) are taken
    from it instead of being scored again.
    """
    stops = np.r_[data.starts[1:], len(data.cluster)]
    done = _scored_clusters(scored)
    spans = list(zip(data.clusters, data.starts, stops))
    to_score = [(lo, hi) for cluster, lo, hi in spans if int(cluster) not in done]

    def score(lo: int, hi: int) -> ClusterScores:
        return cluster_max_sim(data.vectors[lo:hi], tile_size=plan.config.tile_size, device=plan.device)

    calls = [functools.partial(score, lo, hi) for lo, hi in to_score]
    computed = dict(zip(to_score, map_clusters(calls, [hi - lo for lo, hi in to_score], plan.device)))
    for cluster, lo, hi in spans:
        if int(cluster) in done:
            rows = done[int(cluster)]
            if not rows.column("id").combine_chunks().equals(data.ids.slice(lo, hi - lo)):
                raise RuntimeError(f"cluster {cluster}: the tuning sample's scores do not match the partition; rerun with --fresh")
            max_sim = rows.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32)
            dup_index = rows.column("dup_index").to_numpy()
        else:
            scores = computed[(lo, hi)]
            max_sim, dup_index = scores.max_sim, scores.dup_of
        yield int(cluster), int(lo), max_sim, np.where(dup_index >= 0, dup_index + lo, -1)


def map_clusters(calls: list[Callable[[], ClusterScores]], sizes: list[int], device: str) -> list[ClusterScores]:
    """Run a bucket's per-cluster kernel calls (``sizes``: rows of each), results in call order.

    On the CPU, the calls run on the unit's torch threads as a pool, each single-threaded,
    largest first. Most clusters are small: a many-threaded torch operation on a small
    tensor costs more in OpenMP barriers than it computes, and when another process holds
    a core each barrier waits for a time slice (measured: 4x slower on 2 cores with one
    busy neighbour, against 1.4x this way). A cluster holding more than one thread's share
    of the bucket's work (rows squared) would leave the other threads idle on the pool: it
    runs first, alone, on all of them. Results do not depend on the threads (the kernel's
    values are canonical)."""
    threads = torch.get_num_threads()  # this unit's share, set by the DAG's compute_threads
    if threads <= 1 or len(calls) <= 1 or torch.device(device).type != "cpu":
        return [call() for call in calls]
    work = [float(n) ** 2 for n in sizes]
    dominant = [i for i in range(len(calls)) if work[i] * threads > sum(work)]
    results = {i: calls[i]() for i in dominant}
    pooled = sorted((i for i in range(len(calls)) if i not in results), key=lambda i: -sizes[i])
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {i: pool.submit(calls[i]) for i in pooled}
            results.update((i, f.result()) for i, f in futures.items())
    finally:
        torch.set_num_threads(threads)  # OpenMP's count may be shared with the pool's threads
    return [results[i] for i in range(len(calls))]


EARLIER_SCHEMA = pa.schema([("id", pa.string()), ("kept_id", pa.string())])


@dataclass
class EarlierItems:
    """A generation's bucket: the earlier items of its clusters (every earlier run since the
    collection's base, in run order, each run's items in its own keep order), the ones the
    new items are judged against (kept only, or all with against='all')."""

    ids: pa.Array
    kept_id: pa.Array  # the kept item each resolves to (itself when kept)
    vectors: list[np.ndarray]  # per earlier run, its bucket's vectors as stored
    rows: dict[int, np.ndarray]  # cluster -> positions in ids/kept_id, in judging order
    vector_rows: dict[int, list[np.ndarray]]  # cluster -> per earlier run, the same items' rows of its vectors

    def gather(self, cluster: int, out: np.ndarray) -> None:
        """Copy the cluster's judged vectors, in judging order, to the start of ``out``."""
        filled = 0
        for vectors, rows in zip(self.vectors, self.vector_rows[cluster]):
            np.take(vectors, rows, axis=0, out=out[filled : filled + len(rows)])
            filled += len(rows)

    def referenced(self, rows: np.ndarray) -> pa.Table:
        """(id, kept_id) of the earlier items at ``rows``, once each: what finalize needs to
        resolve a new item removed as a copy of an earlier one."""
        rows = np.unique(rows)
        return pa.table({"id": self.ids.take(pa.array(rows)), "kept_id": self.kept_id.take(pa.array(rows))}, schema=EARLIER_SCHEMA)


def load_earlier(plan: RunPlan, bucket: int, clusters: np.ndarray) -> EarlierItems:
    """Every earlier run's items of ``clusters`` (the same bucket in every run: they share the
    base's bucket plan), with their decisions. Their vectors stay as read: each cluster's keys
    are gathered once, straight into the kernel's buffer."""
    ids: list[pa.Array] = []
    kept_ids: list[pa.Array] = []
    vectors: list[np.ndarray] = []
    positions: dict[int, list[np.ndarray]] = {int(c): [] for c in clusters}
    vector_rows: dict[int, list[np.ndarray]] = {int(c): [] for c in clusters}
    offset = 0
    for ref in plan.earlier:
        run = load_plan(ref)
        keys = load_bucket_keys(run, _partition_index(ref).buckets[bucket], order_function(run), only_clusters=clusters)
        scores = read_parquet(run.layout.scores(bucket), columns=["id", "cluster", "dup_of", "kept"])
        scores = scores.filter(pc.is_in(scores.column("cluster"), value_set=pa.array(clusters.astype(np.int32))))
        if not scores.column("id").combine_chunks().equals(keys.ids):
            raise RuntimeError(f"{run.layout.scores(bucket)} does not match its partitions; the collection's run {ref.output} is damaged")
        ids.append(keys.ids)
        kept_ids.append(_resolve_kept(scores, ids, kept_ids))
        judged = np.ones(len(keys.ids), bool)
        if plan.config.against == "kept":
            judged = pc.equal(ids[-1], kept_ids[-1]).to_numpy(zero_copy_only=False)
        present = {int(c): (lo, hi) for c, lo, hi in zip(keys.clusters, keys.starts, np.r_[keys.starts[1:], len(keys.ids)])}
        for c in positions:
            lo, hi = present.get(c, (0, 0))
            at = lo + np.flatnonzero(judged[lo:hi])  # this run's judged items of c, keep order
            positions[c].append(offset + at)
            vector_rows[c].append(keys.rows[at])
        vectors.append(keys.vectors)
        offset += len(keys.ids)
    all_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    all_kept = pa.concat_arrays(kept_ids) if kept_ids else pa.array([], pa.string())
    rows = {c: np.concatenate(p) if p else np.zeros(0, np.int64) for c, p in positions.items()}  # run order, then keep order
    return EarlierItems(all_ids, all_kept, vectors, rows, vector_rows)


@functools.lru_cache(maxsize=16)
def _partition_index(ref: PlanRef) -> PartitionIndex:
    """A committed earlier run's partition index, read once per process rather than once per
    bucket of every generation (committed runs never change)."""
    return PartitionIndex.model_validate(read_json(load_plan(ref).layout.partition_index))


def _resolve_kept(scores: pa.Table, earlier_ids: list[pa.Array], earlier_kept: list[pa.Array]) -> pa.Array:
    """kept_id of one earlier run's scored items: itself when kept, else its dup_of's, which
    is in this run or an earlier one (loaded before it)."""
    ids = scores.column("id").combine_chunks()
    removed = ~scores.column("kept").to_numpy(zero_copy_only=False)
    dup_of = scores.column("dup_of").combine_chunks()
    target = pc.fill_null(pc.index_in(dup_of, value_set=ids), -1).to_numpy(zero_copy_only=False)
    row = np.arange(len(ids))
    here = removed & (target >= 0)
    if np.any(target[here] >= row[here]):  # keep order puts a dup_of before its copies
        raise RuntimeError("an earlier run's dup_of follows its copy; the collection's run is damaged")
    # Each removed item points at its dup_of in this run; follow the pointers (doubling) to a
    # row that is kept or whose dup_of is in an earlier run.
    pointer = np.where(here, target, row)
    while not np.array_equal(follow := pointer[pointer], pointer):
        pointer = follow
    before = removed & (target < 0)
    root = ids
    if before.any():
        known_ids = pa.concat_arrays(earlier_ids[:-1]) if len(earlier_ids) > 1 else pa.array([], pa.string())
        known_kept = pa.concat_arrays(earlier_kept) if earlier_kept else pa.array([], pa.string())
        at = pc.index_in(dup_of.filter(pa.array(before)), value_set=known_ids)
        if at.null_count:
            raise RuntimeError("an earlier run's dup_of is in none of the runs before it; the collection's run is damaged")
        root = pc.replace_with_mask(ids, pa.array(before), known_kept.take(at))
    return root.take(pa.array(pointer))


def iter_against_earlier(plan: RunPlan, data: BucketData, earlier: EarlierItems) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Like iter_cluster_scores, for a generation: each cluster's earlier items come first and
    are only keys; dup rows point into the bucket (< n) or into ``earlier`` (n + row)."""
    n = len(data.cluster)
    stops = np.r_[data.starts[1:], n]
    spans = list(zip(data.clusters, data.starts, stops))

    def score(cluster: int, lo: int, hi: int) -> ClusterScores:
        keys = earlier.rows[cluster]
        y = np.empty((len(keys) + hi - lo, data.vectors.shape[1]), np.float32)  # built in the pool: one cluster's keys at a time per thread
        earlier.gather(cluster, y)
        y[len(keys) :] = data.vectors[lo:hi]
        return cluster_max_sim(y, tile_size=plan.config.tile_size, device=plan.device, first_query=len(keys))

    calls = [functools.partial(score, int(cluster), int(lo), int(hi)) for cluster, lo, hi in spans]
    sizes = [len(earlier.rows[int(cluster)]) + hi - lo for cluster, lo, hi in spans]
    for (cluster, lo, hi), scores in zip(spans, map_clusters(calls, sizes, plan.device)):
        keys = earlier.rows[int(cluster)]
        local = scores.dup_of[len(keys) :]
        to_new, to_earlier = local >= len(keys), (local >= 0) & (local < len(keys))
        dups = np.full(len(local), -1, np.int64)
        dups[to_new] = local[to_new] - len(keys) + lo
        dups[to_earlier] = n + keys[local[to_earlier]]
        yield int(cluster), int(lo), scores.max_sim[len(keys) :], dups


def _scored_clusters(scored: pa.Table | None) -> dict[int, pa.Table]:
    if scored is None or scored.num_rows == 0:
        return {}
    cluster = scored.column("cluster").to_numpy()
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    stops = np.r_[starts[1:], len(cluster)]
    return {int(cluster[lo]): scored.slice(lo, hi - lo).combine_chunks() for lo, hi in zip(starts, stops)}


def score_bucket(plan: RunPlan, bucket: int, entries: list, eps: float | None) -> BucketScores:
    """Write scores/bucket-N.parquet (rows in cluster, keep order).

    With ``eps`` None (tuning='exact': eps is known only once every bucket is scored) the
    ``kept`` column is left null until :func:`apply_threshold` fills it.
    """
    layout = plan.layout
    data = load_bucket(plan, entries, order_function(plan))
    n = len(data.cluster)
    max_sim = np.full(n, np.nan, dtype=np.float32)
    dup_rows = np.full(n, -1, dtype=np.int64)
    if plan.earlier:  # a collection's generation: earlier items first in every cluster
        earlier = load_earlier(plan, bucket, data.clusters)
        candidates = pa.concat_arrays([data.ids, earlier.ids])  # dup rows >= n are earlier items
        for _, lo, sims, dups in iter_against_earlier(plan, data, earlier):
            max_sim[lo : lo + len(sims)] = sims
            dup_rows[lo : lo + len(dups)] = dups
        write_parquet(layout.scores_earlier(bucket), earlier.referenced(dup_rows[dup_rows >= n] - n))
    else:
        candidates = data.ids
        for _, lo, sims, dups in iter_cluster_scores(plan, data, _tuning_sample(plan, bucket)):
            max_sim[lo : lo + len(sims)] = sims
            dup_rows[lo : lo + len(dups)] = dups
    has_dup = dup_rows >= 0
    dup_ids = candidates.take(pa.array(np.where(has_dup, dup_rows, 0)))
    dup_of = pc.if_else(pa.array(has_dup), dup_ids, pa.scalar(None, pa.string()))
    table = pa.table(
        {
            "id": data.ids,
            "cluster": data.cluster.astype(np.int32),
            "centroid_sim": data.centroid_sim.astype(np.float32),
            "max_sim": pa.array(max_sim, mask=~has_dup),
            "dup_of": dup_of,
            "kept": _kept_column(max_sim, eps),
        },
        schema=SCORES_SCHEMA,
    )
    write_parquet(layout.scores(bucket), table)
    n_removed = int(removed_mask(max_sim, eps).sum()) if eps is not None else None
    return BucketScores(bucket=bucket, n_scored=n, clusters=len(data.clusters), eps=eps, n_removed=n_removed)


def _tuning_sample(plan: RunPlan, bucket: int) -> pa.Table | None:
    """The tuning sample's scores of a bucket (clusters in keep order), if it was sampled."""
    url = plan.layout.tuning_sample(bucket)
    if plan.config.target_keep is None or not exists(url):
        return None
    return read_parquet(url)


def _kept_column(max_sim: np.ndarray, eps: float | None) -> pa.Array:
    if eps is None:
        return pa.nulls(len(max_sim), pa.bool_())
    return pa.array(~removed_mask(max_sim, eps))


def apply_threshold(plan: RunPlan, bucket: int, eps: float) -> BucketScores:
    """Fill a scored bucket's ``kept`` column for the final eps (idempotent)."""
    layout = plan.layout
    scored = BucketScores.model_validate(read_json(layout.scores_done(bucket)))
    scores = read_parquet(layout.scores(bucket))
    max_sim = scores.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN: kept
    kept = _kept_column(max_sim, eps)
    write_parquet(layout.scores(bucket), scores.set_column(scores.schema.get_field_index("kept"), SCORES_SCHEMA.field("kept"), kept))
    return scored.model_copy(update={"eps": eps, "n_removed": int((~kept.to_numpy(zero_copy_only=False)).sum())})
