"""Score a bucket of clusters: keep order, kernel, threshold, one scores parquet per bucket."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .kernel import cluster_max_sim, removed_mask
from .ordering import cluster_order
from .partitions import BucketData, load_bucket
from .run import RunPlan
from .storage import exists, read_json, write_json, write_parquet

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


def iter_cluster_scores(plan: RunPlan, data: BucketData) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(cluster, first row, max_sim, dup_of as bucket rows) for every cluster of a loaded bucket."""
    stops = np.r_[data.starts[1:], len(data.cluster)]
    for cluster, lo, hi in zip(data.clusters, data.starts, stops):
        scores = cluster_max_sim(data.vectors[lo:hi], tile_size=plan.config.tile_size, device=plan.device)
        dup_rows = np.where(scores.dup_of >= 0, scores.dup_of + lo, -1)
        yield int(cluster), int(lo), scores.max_sim, dup_rows


def score_bucket(plan: RunPlan, bucket: int, entries: list, eps: float) -> dict:
    """Write scores/bucket-N.parquet (rows in cluster, keep order) and its done marker (last)."""
    layout = plan.layout
    done_url = layout.scores_done(bucket)
    if exists(done_url):
        return read_json(done_url)
    data = load_bucket(plan, entries, order_function(plan))
    n = len(data.cluster)
    max_sim = np.full(n, np.nan, dtype=np.float32)
    dup_rows = np.full(n, -1, dtype=np.int64)
    for _, lo, sims, dups in iter_cluster_scores(plan, data):
        max_sim[lo : lo + len(sims)] = sims
        dup_rows[lo : lo + len(dups)] = dups
    removed = removed_mask(max_sim, eps)
    has_dup = dup_rows >= 0
    dup_ids = data.ids.take(pa.array(np.where(has_dup, dup_rows, 0)))
    dup_of = pc.if_else(pa.array(has_dup), dup_ids, pa.scalar(None, pa.string()))
    table = pa.table(
        {
            "id": data.ids,
            "cluster": data.cluster.astype(np.int32),
            "centroid_sim": data.centroid_sim.astype(np.float32),
            "max_sim": pa.array(max_sim, mask=~has_dup),
            "dup_of": dup_of,
            "kept": ~removed,
        },
        schema=SCORES_SCHEMA,
    )
    write_parquet(layout.scores(bucket), table)
    result = {"bucket": bucket, "n_scored": n, "n_removed": int(removed.sum()), "clusters": len(data.clusters)}
    write_json(done_url, result)
    return result
