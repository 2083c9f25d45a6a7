"""The paper's eta (SemDeDup, appendix A.2): what searching inside one cluster costs in recall.

SemDeDup compares an item only with the items of its own cluster, so a duplicate pair split
across two clusters is never seen. On a seeded sample of the clustered items, each sampled
item is compared with every item of its ``nearest_clusters`` nearest clusters (by the
item's similarity to their centroids; its own cluster always among them). Of the duplicate
pairs found that way (cosine similarity > 1 - eps, compared as the kernel compares),
eta is the share whose partner lies in the item's own cluster. See docs/architecture.md
§"Recall of the cluster-local search".

Memory is bounded by one bucket: the sampled items' vectors are read row by row, then the
buckets holding the clusters to search are read one at a time, keeping only those clusters.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core.dedup.clustering import sample_rows
from semdedup_core.dedup.partitions import load_bucket
from semdedup_core.run.plan import RunPlan
from semdedup_core.run.stage_results import PartitionIndex, RecallEstimate, ShardPartition
from semdedup_core.storage import read_json, read_npy, read_parquet, read_range

# The paper samples about a thousand items; twice that keeps eta's standard error near 1 %
# for a typical share of duplicates while the search stays a small fraction of the dedup stage.
SAMPLE_ITEMS = 2000
NEAREST_CLUSTERS = 5
# Similarity blocks (queries x members) are kept under this many entries (float64: 32 MiB).
_BLOCK_ENTRIES = 4 * 2**20
_F32 = np.dtype("<f4")
_READ_THREADS = 8


def estimate_recall(plan: RunPlan, eps: float, sample_items: int = SAMPLE_ITEMS, nearest_clusters: int = NEAREST_CLUSTERS) -> RecallEstimate:
    """eta on a sample of ``sample_items`` clustered items (seeded by the run's seed)."""
    layout = plan.layout
    nearest_clusters = max(1, min(nearest_clusters, plan.clusters))
    none_found = RecallEstimate(
        eps=eps, seed=plan.config.seed, sample_items=0, nearest_clusters=nearest_clusters, pairs_in_cluster=0, pairs_in_nearest=0, eta=None
    )
    if plan.config.rethreshold_of is not None:  # computes nothing again (docs/architecture.md §"Rethreshold")
        return none_found.model_copy(update={"skipped": f"a rethreshold computes nothing again; {plan.config.rethreshold_of} holds the estimate at its own eps"})
    if plan.earlier:
        # A generation's clusters also hold the earlier generations' items, in other run folders.
        return none_found.model_copy(update={"skipped": "a collection generation: the estimate is made on the collection's base run"})
    index = PartitionIndex.model_validate(read_json(layout.partition_index))
    if index.n_assigned < 2:
        return none_found.model_copy(update={"skipped": f"{index.n_assigned} clustered item(s): no pair to find"})

    ids, own, vectors = _sampled_items(plan, sample_items)
    nearest = nearest_cluster_ids(vectors, read_npy(layout.centroids), own, nearest_clusters)
    threshold = np.float32(1.0 - eps)
    in_cluster = np.zeros(len(ids), np.int64)
    in_nearest = np.zeros(len(ids), np.int64)
    bucket_of = read_npy(layout.bucket_of_cluster)
    searched_by: dict[int, list[int]] = {}  # cluster -> sampled items that search it
    for item, clusters in enumerate(nearest.tolist()):
        for cluster in clusters:
            searched_by.setdefault(cluster, []).append(item)
    for bucket in np.unique(bucket_of[nearest]):
        wanted = np.unique(nearest[bucket_of[nearest] == bucket])
        data = load_bucket(plan, index.buckets[int(bucket)], _input_order, only_clusters=wanted)
        sampled_at = pc.index_in(data.ids, value_set=ids).fill_null(-1).to_numpy()  # row -> sampled item, or -1
        stops = np.r_[data.starts[1:], len(data.cluster)]
        for cluster, lo, hi in zip(data.clusters, data.starts, stops):
            queries = np.array(searched_by[int(cluster)], np.int64)
            found = _count_above(vectors[queries], data.vectors[lo:hi], threshold, sampled_at[lo:hi], queries)
            in_nearest[queries] += found
            mine = own[queries] == cluster
            in_cluster[queries[mine]] += found[mine]
    pairs_in_cluster, pairs_in_nearest = int(in_cluster.sum()), int(in_nearest.sum())
    return none_found.model_copy(
        update={
            "sample_items": len(ids),
            "pairs_in_cluster": pairs_in_cluster,
            "pairs_in_nearest": pairs_in_nearest,
            "eta": pairs_in_cluster / pairs_in_nearest if pairs_in_nearest else None,
        }
    )


def describe(estimate: RecallEstimate) -> str:
    """The estimate's log line."""
    if estimate.skipped:
        return f"eta not estimated: {estimate.skipped}"
    eta = "n/a (no duplicate pair found)" if estimate.eta is None else f"{estimate.eta:.4f}"
    return (
        f"eta {eta}: {estimate.pairs_in_cluster} of {estimate.pairs_in_nearest} duplicate pairs of {estimate.sample_items} sampled items "
        f"lie in their own cluster ({estimate.nearest_clusters} nearest clusters searched, eps={estimate.eps:.6g})"
    )


def nearest_cluster_ids(vectors: np.ndarray, centroids: np.ndarray, own: np.ndarray, count: int) -> np.ndarray:
    """(items, count) cluster ids: each item's own cluster first, then the centroids most
    similar to it (canonical float64 scores, ties to the lower index)."""
    out = np.empty((len(vectors), count), np.int64)
    centroids64 = centroids.astype(np.float64)
    k = len(centroids)
    step = max(1, _BLOCK_ENTRIES // max(1, k))
    for lo in range(0, len(vectors), step):
        scores = vectors[lo : lo + step].astype(np.float64) @ centroids64.T
        scores[np.arange(len(scores)), own[lo : lo + step]] = np.inf  # own cluster first, whatever rounding did
        # The count-th best score per row, then every centroid at least that good (more than
        # count only on exact ties), ordered by score and index.
        kth = np.partition(scores, k - count, axis=1)[:, k - count]
        for row, (row_scores, floor) in enumerate(zip(scores, kth)):
            candidates = np.flatnonzero(row_scores >= floor)
            out[lo + row] = candidates[np.lexsort((candidates, -row_scores[candidates]))][:count]
    return out


def _input_order(cluster: int, centroid_sim: np.ndarray, metadata: dict) -> np.ndarray:
    return np.arange(len(centroid_sim))


def _count_above(queries: np.ndarray, members: np.ndarray, threshold: np.float32, member_sampled: np.ndarray, query_index: np.ndarray) -> np.ndarray:
    """Per query: members with similarity > threshold, the query itself not counted.

    Similarities are the kernel's canonical scores: products of float32 exact in float64,
    summed in float64, rounded once to float32, then compared in float32.
    """
    counts = np.zeros(len(queries), np.int64)
    # A member that is itself a sampled query: the (query, member) pair to leave out.
    position_in_queries = np.full(len(member_sampled), -1, np.int64)
    lookup = {int(q): i for i, q in enumerate(query_index)}
    for m in np.flatnonzero(member_sampled >= 0):
        position_in_queries[m] = lookup.get(int(member_sampled[m]), -1)
    q64 = queries.astype(np.float64)
    step = max(1, _BLOCK_ENTRIES // max(1, len(queries)))
    for lo in range(0, len(members), step):
        sims = (q64 @ members[lo : lo + step].astype(np.float64).T).astype(np.float32)
        above = sims > threshold
        self_cols = np.flatnonzero(position_in_queries[lo : lo + step] >= 0)
        above[position_in_queries[lo + self_cols], self_cols] = False
        counts += above.sum(axis=1)
    return counts


def _sampled_items(plan: RunPlan, sample_items: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """A seeded uniform sample of the clustered items: ids, own clusters, vectors."""
    manifests = [ShardPartition.model_validate(read_json(plan.layout.partition_manifest(s.index))) for s in plan.shards]
    per_shard = sample_rows([m.n_assigned for m in manifests], sample_items, plan.config.seed)
    ids, clusters, vectors = [], [], []
    for manifest, rows in zip(manifests, per_shard):
        if not len(rows):
            continue
        groups = np.array(sorted(g for entries in manifest.row_groups.values() for g in entries), np.int64).reshape(-1, 3)
        group_of = np.searchsorted(groups[:, 1], rows, side="right") - 1
        needed = np.unique(group_of)
        table = read_parquet(plan.layout.partition(manifest.shard), columns=["id", "cluster"], row_groups=groups[needed, 0].tolist())
        offset = np.r_[0, np.cumsum(groups[needed, 2])][np.searchsorted(needed, group_of)] + rows - groups[group_of, 1]
        ids.append(table.column("id").combine_chunks().take(pa.array(offset)))
        clusters.append(table.column("cluster").to_numpy()[offset])
        row_bytes = plan.dim * _F32.itemsize
        url = plan.layout.partition_vectors(manifest.shard)
        with ThreadPoolExecutor(_READ_THREADS) as pool:  # one ranged GET per row: overlap their latency
            # Each thread runs in a copy of this context: storage options set by the caller apply.
            reads = [pool.submit(copy_context().run, read_range, url, int(r) * row_bytes, (int(r) + 1) * row_bytes) for r in rows]
            vectors.extend(np.frombuffer(f.result(), _F32) for f in reads)
    return pa.concat_arrays(ids), np.concatenate(clusters).astype(np.int64), np.stack(vectors)
