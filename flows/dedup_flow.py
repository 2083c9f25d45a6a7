"""The semdedup flow: the DAG of DESIGN §4 for precomputed embeddings.

    plan ─▶ fit centroids (sample) ─▶ assign+partition[shard] ─▶ collect
         ─▶ tune eps (if target_keep) ─▶ dedup[bucket] ─▶ finalize
"""

from __future__ import annotations

from prefect import flow, unmapped

from semdedup_core.config import RunConfig
from tasks.stages import (
    assign_shard_task,
    collect_partitions_task,
    configure_compute,
    finalize_task,
    fit_centroids_task,
    plan_run_task,
    score_bucket_task,
    timed,
    tune_eps_task,
)


@flow(name="semdedup", log_prints=False, validate_parameters=True)
def semdedup_flow(config: RunConfig) -> dict:
    """Semantic deduplication of a dataset; every artifact is written under ``config.output``."""
    configure_compute(config.workers)
    timings: dict[str, float] = {}
    plan = timed(timings, "plan", lambda: plan_run_task(config))

    timed(timings, "fit", lambda: fit_centroids_task(plan))
    timed(
        timings,
        "assign",
        lambda: assign_shard_task.map(unmapped(plan), [s.index for s in plan.shards]).result(),
    )
    index = timed(timings, "collect", lambda: collect_partitions_task(plan))

    tuning = None
    eps = config.effective_eps
    if config.target_keep is not None:
        tuning = timed(timings, "tune", lambda: tune_eps_task(plan, index))
        eps = tuning["eps"]

    timed(
        timings,
        "dedup",
        lambda: score_bucket_task.map(unmapped(plan), list(range(plan.buckets)), index["buckets"], unmapped(eps)).result(),
    )
    return finalize_task(plan, eps, tuning, timings)
