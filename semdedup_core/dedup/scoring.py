"""Score a bucket of clusters: keep order, kernel, threshold, one scores parquet per bucket."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core.dedup.kernel import cluster_max_sim, removed_mask
from semdedup_core.dedup.ordering import cluster_order
from semdedup_core.dedup.partitions import BucketData, load_bucket
from semdedup_core.run.plan import RunPlan
from semdedup_core.run.stage_results import BucketScores
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
    for cluster, lo, hi in zip(data.clusters, data.starts, stops):
        if int(cluster) in done:
            rows = done[int(cluster)]
            if not rows.column("id").combine_chunks().equals(data.ids.slice(lo, hi - lo)):
                raise RuntimeError(f"cluster {cluster}: the tuning sample's scores do not match the partition; rerun with --fresh")
            max_sim = rows.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32)
            dup_index = rows.column("dup_index").to_numpy()
        else:
            scores = cluster_max_sim(data.vectors[lo:hi], tile_size=plan.config.tile_size, device=plan.device)
            max_sim, dup_index = scores.max_sim, scores.dup_of
        yield int(cluster), int(lo), max_sim, np.where(dup_index >= 0, dup_index + lo, -1)


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
    for _, lo, sims, dups in iter_cluster_scores(plan, data, _tuning_sample(plan, bucket)):
        max_sim[lo : lo + len(sims)] = sims
        dup_rows[lo : lo + len(dups)] = dups
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
