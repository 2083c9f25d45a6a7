"""The semdedup flow: the DAG of DESIGN §4.

    plan ─▶ scan[shard] ─▶ exact duplicates ─▶ embed[shard]          (raw images or text only)
         ─▶ fit centroids (sample) ─▶ assign+partition[shard] ─▶ collect
         ─▶ tune eps (if target_keep: the sampled prediction) ─▶ dedup[bucket]
         ─▶ threshold (target_keep, tuning='exact': eps met on all items ─▶ apply[bucket]) ─▶ finalize
         ─▶ write[shard]                                              (if asked: the dataset back)
"""

from __future__ import annotations

from prefect import flow, unmapped

from semdedup_core.config import RunConfig
from semdedup_core.run.lease import Lease
from semdedup_core.results.summary import record_written
from semdedup_core.run.plan import RunPlan, StageClock, record_stage, refusals_recorded
from tasks.stages import (
    apply_threshold_task,
    assign_shard_task,
    collect_partitions_task,
    configure_compute,
    embed_shard_task,
    exact_eps_task,
    finalize_task,
    fit_centroids_task,
    plan_embedded_task,
    plan_run_task,
    resolve_exact_task,
    scan_shard_task,
    score_bucket_task,
    start_run_task,
    storage_credentials,
    tune_eps_task,
    write_shard_task,
)


@flow(name="semdedup", log_prints=False, validate_parameters=True)
def semdedup_flow(config: RunConfig) -> dict:
    """Semantic deduplication of a dataset; every artifact is written under ``config.output``."""
    configure_compute(config.workers)
    clock = StageClock()
    with storage_credentials(config):
        with clock.stage("plan"):
            plan = plan_run_task(config)  # every misconfiguration fails here, before any work
        with Lease(plan.layout.lease):  # a second run on the same output is refused here
            start_run_task(plan)
            record_stage(plan, "plan", clock.seconds["plan"])
            with refusals_recorded(plan):
                if plan.embeds:
                    plan = _embed(plan, clock)
                return _stages(config, plan, clock)


def _embed(plan: RunPlan, clock: StageClock) -> RunPlan:
    shards = [s.index for s in plan.sources]
    with clock.stage("scan", plan):
        scan_shard_task.map(unmapped(plan), shards).result()
    with clock.stage("exact", plan):
        resolve_exact_task(plan)
    with clock.stage("embed", plan):
        embed_shard_task.map(unmapped(plan), shards).result()
    return plan_embedded_task(plan, dict(clock.seconds))


def _stages(config: RunConfig, plan: RunPlan, clock: StageClock) -> dict:
    with clock.stage("fit", plan):
        fit_centroids_task(plan)
    with clock.stage("assign", plan):
        assign_shard_task.map(unmapped(plan), [s.index for s in plan.shards]).result()
    with clock.stage("collect", plan):
        index = collect_partitions_task(plan)

    tuning = None
    eps = config.effective_eps
    if config.target_keep is not None:
        with clock.stage("tune", plan):
            tuning = tune_eps_task(plan, index)
        eps = tuning["eps"] if config.tuning == "sample" else None

    with clock.stage("dedup", plan):
        score_bucket_task.map(unmapped(plan), list(range(plan.buckets)), index["buckets"], unmapped(eps)).result()
    if eps is None:  # tuning='exact': the eps meeting the target on every scored item
        with clock.stage("threshold", plan):
            tuning = exact_eps_task(plan, index, tuning)
            eps = tuning["eps"]
            apply_threshold_task.map(unmapped(plan), list(range(plan.buckets)), unmapped(eps)).result()
    with clock.stage("finalize", plan):
        summary = finalize_task(plan, eps, tuning, dict(clock.seconds))
    if config.write_dataset or config.write_removed:
        with clock.stage("write", plan):
            written = write_shard_task.map(unmapped(plan), list(range(len(plan.sources or plan.shards)))).result()
        summary = record_written(plan, written, clock.seconds["write"])
    return summary
