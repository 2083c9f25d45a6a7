"""The whole run in one process, without Prefect: for library use, notebooks and benchmarks.

Same stages, same artifacts and same resume behaviour as the Prefect flow, one after another.
"""

from __future__ import annotations

from . import dedup, partitions, results, tuning
from .config import RunConfig
from .lease import Lease
from .run import RunPlan, StageClock, plan_run, record_stage, start_run


def run_pipeline(cfg: RunConfig) -> dict:
    clock = StageClock()
    with clock.stage("plan"):
        plan = plan_run(cfg)
    with Lease(plan.layout.lease):
        start_run(plan)
        record_stage(plan, "plan", clock.seconds["plan"])
        return _run_stages(cfg, plan, clock)


def _run_stages(cfg: RunConfig, plan: RunPlan, clock: StageClock) -> dict:
    with clock.stage("fit", plan):
        partitions.fit_centroids(plan)
    with clock.stage("assign", plan):
        for shard in plan.shards:
            partitions.assign_shard(plan, shard.index)
    with clock.stage("collect", plan):
        index = partitions.collect_partitions(plan)
    tuned = None
    eps = cfg.effective_eps
    if cfg.target_keep is not None:
        with clock.stage("tune", plan):
            tuned = tuning.tune_eps(plan, index)
        eps = tuned["eps"]
    with clock.stage("dedup", plan):
        for bucket, entries in enumerate(index["buckets"]):
            dedup.score_bucket(plan, bucket, entries, eps)
    with clock.stage("finalize", plan):
        summary = results.finalize(plan, eps, tuned, dict(clock.seconds))
    return summary
