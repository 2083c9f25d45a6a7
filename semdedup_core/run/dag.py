"""The whole run in one process, without Prefect: for library use, notebooks and benchmarks.

Same stages, same artifacts and same resume behaviour as the Prefect flow, one after another.
"""

from __future__ import annotations

from semdedup_core.dedup import partitions, scoring as dedup, tuning
from semdedup_core.embedding import stage as embedding
from semdedup_core.results import dataset as raw_writers, summary as results
from semdedup_core.config import RunConfig
from semdedup_core.run.lease import Lease
from semdedup_core.run.plan import RunPlan, StageClock, plan_run, record_stage, refusals_recorded, start_run, write_run_json


def run_pipeline(cfg: RunConfig) -> dict:
    clock = StageClock()
    with clock.stage("plan"):
        plan = plan_run(cfg)
    with Lease(plan.layout.lease):
        start_run(plan)
        record_stage(plan, "plan", clock.seconds["plan"])
        with refusals_recorded(plan):
            if plan.embeds:
                plan = _embed_stages(plan, clock)
            return _run_stages(cfg, plan, clock)


def _embed_stages(plan: RunPlan, clock: StageClock) -> RunPlan:
    with clock.stage("scan", plan):
        for shard in plan.sources:
            embedding.scan_shard(plan, shard.index)
    with clock.stage("exact", plan):
        embedding.resolve_exact(plan)
    with clock.stage("embed", plan):
        for shard in plan.sources:
            embedding.embed_shard(plan, shard.index)
    results.refuse_if_nothing_usable(plan, dict(clock.seconds))
    plan = embedding.plan_embedded(plan)
    write_run_json(plan)
    return plan


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
        eps = tuned["eps"] if cfg.tuning == "sample" else None
    with clock.stage("dedup", plan):
        for bucket, entries in enumerate(index["buckets"]):
            dedup.score_bucket(plan, bucket, entries, eps)
    if eps is None:  # tuning='exact': the eps meeting the target on every scored item
        with clock.stage("threshold", plan):
            tuned = tuning.exact_eps(plan, index, tuned)
            eps = tuned["eps"]
            for bucket in range(plan.buckets):
                dedup.apply_threshold(plan, bucket, eps)
    with clock.stage("finalize", plan):
        summary = results.finalize(plan, eps, tuned, dict(clock.seconds))
    if cfg.write_dataset or cfg.write_removed:
        with clock.stage("write", plan):
            written = [raw_writers.write_shard(plan, i) for i in range(len(plan.sources or plan.shards))]
        summary = results.record_written(plan, written, clock.seconds["write"])
    return summary
