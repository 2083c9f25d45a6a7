"""The whole run in one process, without Prefect: for library use, notebooks and benchmarks.

Same stages, same artifacts and same resume behaviour as the Prefect flow, one after another.
"""

from __future__ import annotations

import time

from . import dedup, partitions, results, tuning
from .config import RunConfig
from .run import plan_run, write_run_json


def run_pipeline(cfg: RunConfig) -> dict:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    plan = plan_run(cfg)
    write_run_json(plan, {"planned": True})
    lap("plan")
    partitions.fit_centroids(plan)
    lap("fit")
    for shard in plan.shards:
        partitions.assign_shard(plan, shard.index)
    lap("assign")
    index = partitions.collect_partitions(plan)
    lap("collect")
    tuned = None
    eps = cfg.effective_eps
    if cfg.target_keep is not None:
        tuned = tuning.tune_eps(plan, index)
        eps = tuned["eps"]
        lap("tune")
    for bucket, entries in enumerate(index["buckets"]):
        dedup.score_bucket(plan, bucket, entries, eps)
    lap("dedup")
    summary = results.finalize(plan, eps, tuned, timings)
    write_run_json(plan, {"finalized": True})
    return summary
