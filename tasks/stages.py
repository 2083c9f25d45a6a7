"""Prefect tasks: one per step of the DAG (semdedup_core.run.dag), each a thin call of run_step.

A task carries everything it needs in its arguments: a reference to the run plan stored in
the run (the plan holds the config: thread counts, device; the reference names the storage
block), so it runs the same in the flow's process, on a thread, a Dask worker or a Ray
worker, and its arguments stay small however many files the input has. Credentials are loaded from the Prefect Secret block
inside the task, never passed as a parameter or returned. Caching is off because resume is
the DAG's job: run_step skips a unit whose completion marker exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.inputs.precomputed import InputError
from semdedup_core.run.collection import NothingNew
from semdedup_core.dedup.reference import ReferenceScores
from semdedup_core.results.report import ReportResult
from semdedup_core.run.dag import APPLY, ASSIGN, COLLECT, DEDUP, EMBED, EXACT, FINALIZE, FIT, PREDICT, RECALL, REFERENCE, REPORT, RESCORE, SCAN, THRESHOLD, TUNE, WRITE, Step, run_step
from semdedup_core.run.plan import PlanRef, RunPlan, load_plan, plan_run
from semdedup_core.run.stage_results import (
    BucketScores,
    EmbedResult,
    ExactResult,
    FitResult,
    PartitionIndex,
    RecallEstimate,
    RunSummary,
    ScanResult,
    ShardPartition,
    TuningResult,
    WrittenShard,
)
from semdedup_core.storage import s3_options


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Storage hiccups and lost workers are retried; bad input or configuration never is
    (it would fail again)."""
    try:
        state.result()
    except (InputError, ConfigError, ValueError):
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


_common = dict(cache_policy=NO_CACHE, persist_result=False)
_retrying = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_unless_bad_input, **_common)


@contextmanager
def storage_credentials(block: str | None) -> Iterator[None]:
    """The S3 options of the named Prefect Secret block for everything run in this context
    (never logged, never a parameter): the flow's own steps and each task, wherever it runs."""
    if block is None:
        yield
        return
    with s3_options(_block_options(block)):
        yield


def _block_options(name: str) -> dict:
    """The s3fs options a Prefect Secret block holds; a missing block or one that does not
    hold a JSON object is a misconfiguration."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as exc:  # Prefect's "Unable to find block document named ..."
        raise ConfigError(f"--storage-block {name!r}: {exc}") from None
    try:
        options = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise ConfigError(f"--storage-block {name!r} must hold s3fs options as a JSON object")
    return options


def _unit(step: Step, plan: PlanRef, unit: int | None = None, **inputs: Any):
    with storage_credentials(plan.storage_block):
        result = run_step(step, load_plan(plan), unit, **inputs)
    get_run_logger().info(step.describe(result))
    return result


@task(name="plan-run", **_common)
def plan_run_task(config: RunConfig) -> RunPlan | str:
    """Validate inputs and configuration before any work (nothing is written). A collection
    with nothing new gives the reason instead of a plan (not a failure)."""
    with storage_credentials(config.storage_block):
        try:
            plan = plan_run(config)
        except NothingNew as exc:
            get_run_logger().info("%s", exc)
            return str(exc)
    get_run_logger().info(
        "%d items in %d shards, dim %d, k=%d, %d buckets, device %s", plan.n_input, len(plan.shards or plan.sources), plan.dim, plan.clusters, plan.buckets, plan.device
    )
    return plan


@task(name=SCAN.name, task_run_name="scan-shard-{shard}", **_retrying)
def scan_shard_task(plan: PlanRef, shard: int) -> ScanResult:
    return _unit(SCAN, plan, shard)


@task(name=EXACT.name, **_retrying)
def resolve_exact_task(plan: PlanRef) -> ExactResult:
    return _unit(EXACT, plan)


@task(name=EMBED.name, task_run_name="embed-shard-{shard}", **_retrying)
def embed_shard_task(plan: PlanRef, shard: int) -> EmbedResult:
    return _unit(EMBED, plan, shard)


@task(name=FIT.name, **_retrying)
def fit_centroids_task(plan: PlanRef) -> FitResult:
    return _unit(FIT, plan)


@task(name=ASSIGN.name, task_run_name="assign-shard-{shard}", **_retrying)
def assign_shard_task(plan: PlanRef, shard: int) -> ShardPartition:
    return _unit(ASSIGN, plan, shard)


@task(name=COLLECT.name, **_retrying)
def collect_partitions_task(plan: PlanRef) -> PartitionIndex:
    return _unit(COLLECT, plan)


@task(name=TUNE.name, **_retrying)
def tune_eps_task(plan: PlanRef, partition_index: PartitionIndex) -> TuningResult:
    return _unit(TUNE, plan, partition_index=partition_index)


@task(name=DEDUP.name, task_run_name="dedup-bucket-{bucket}", **_retrying)
def dedup_bucket_task(plan: PlanRef, bucket: int, entries: list, eps: float | None) -> BucketScores:
    return _unit(DEDUP, plan, bucket, entries=entries, eps=eps)


@task(name=THRESHOLD.name, **_retrying)
def exact_eps_task(plan: PlanRef, partition_index: PartitionIndex, sampled: TuningResult) -> TuningResult:
    return _unit(THRESHOLD, plan, partition_index=partition_index, sampled=sampled)


@task(name=APPLY.name, task_run_name="apply-threshold-{bucket}", **_retrying)
def apply_threshold_task(plan: PlanRef, bucket: int, eps: float) -> BucketScores:
    return _unit(APPLY, plan, bucket, eps=eps)


@task(name=RECALL.name, **_retrying)
def estimate_recall_task(plan: PlanRef, eps: float) -> RecallEstimate:
    return _unit(RECALL, plan, eps=eps)


@task(name=FINALIZE.name, **_retrying)
def finalize_task(plan: PlanRef, eps: float, tuning: TuningResult | None, timings: dict[str, float]) -> RunSummary:
    return _unit(FINALIZE, plan, eps=eps, tuning=tuning, timings=timings)


@task(name=REPORT.name, **_retrying)
def render_report_task(plan: PlanRef) -> ReportResult:
    return _unit(REPORT, plan)


@task(name=WRITE.name, task_run_name="write-shard-{shard}", **_retrying)
def write_shard_task(plan: PlanRef, shard: int) -> WrittenShard:
    return _unit(WRITE, plan, shard)


@task(name=REFERENCE.name, task_run_name="reference-bucket-{bucket}", **_retrying)
def reference_bucket_task(plan: PlanRef, bucket: int, entries: list, references: list[PlanRef]) -> ReferenceScores:
    return _unit(REFERENCE, plan, bucket, entries=entries, references=references)


@task(name=PREDICT.name, **_retrying)
def predict_eps_task(plan: PlanRef) -> TuningResult:
    return _unit(PREDICT, plan)


@task(name=RESCORE.name, task_run_name="rethreshold-bucket-{bucket}", **_retrying)
def rethreshold_bucket_task(plan: PlanRef, bucket: int, eps: float | None) -> BucketScores:
    return _unit(RESCORE, plan, bucket, eps=eps)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        scan_shard_task,
        resolve_exact_task,
        embed_shard_task,
        fit_centroids_task,
        assign_shard_task,
        collect_partitions_task,
        tune_eps_task,
        dedup_bucket_task,
        exact_eps_task,
        apply_threshold_task,
        estimate_recall_task,
        reference_bucket_task,
        finalize_task,
        render_report_task,
        write_shard_task,
        predict_eps_task,
        rethreshold_bucket_task,
    )
}
