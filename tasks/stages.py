"""Prefect tasks: each wraps one semdedup_core function with retries, logging and artifacts.

Tasks pass the run plan (small) and return small dicts; every array lives in the run's
storage. Caching is off because resume is the core's job: each core function skips work
whose completion marker already exists.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import fsspec
import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from semdedup_core.dedup import partitions, scoring as dedup, tuning
from semdedup_core.embedding import stage as embedding
from semdedup_core.results import dataset as raw_writers, summary as results
from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.plan import RunPlan, plan_run, start_run, write_run_json
from semdedup_core.inputs.precomputed import InputError

_slots: threading.Semaphore | None = None
_slots_lock = threading.Lock()


def configure_compute(workers: int) -> None:
    """Split the machine's cores between ``workers`` concurrent compute tasks."""
    global _slots
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    with _slots_lock:
        _slots = threading.Semaphore(workers)


def _compute(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a CPU/GPU-heavy core function inside one of the ``workers`` slots."""
    assert _slots is not None, "configure_compute() must run first"
    with _slots:
        return fn(*args)


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Storage hiccups are retried; bad input or configuration never is (it would fail again)."""
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
def storage_credentials(config: RunConfig) -> Iterator[None]:
    """S3 options from the named Prefect Secret block as fsspec's defaults for the run (never
    logged), restored afterwards so a later run in this process does not inherit them."""
    if config.storage_block is None:
        yield
        return
    options = _block_options(config.storage_block)
    previous = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {**(previous or {}), **options}
    try:
        yield
    finally:
        if previous is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = previous


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


@task(name="plan-run", **_common)
def plan_run_task(config: RunConfig) -> RunPlan:
    """Validate inputs and configuration before any work (nothing is written)."""
    plan = plan_run(config)
    get_run_logger().info(
        "%d items in %d shards, dim %d, k=%d, %d buckets, device %s", plan.n_input, len(plan.shards), plan.dim, plan.clusters, plan.buckets, plan.device
    )
    return plan


@task(name="start-run", **_retrying)
def start_run_task(plan: RunPlan) -> None:
    """Under the lease: clear for a fresh start or drop a killed run's temp files; write run.json."""
    start_run(plan)


@task(name="scan-shard", task_run_name="scan-shard-{shard_index}", **_retrying)
def scan_shard_task(plan: RunPlan, shard_index: int) -> dict:
    result = embedding.scan_shard(plan, shard_index)
    if result["n_failed"]:
        get_run_logger().warning("shard %d: %d of %d items unusable (see result/failed.parquet)", shard_index, result["n_failed"], result["n_items"])
    return result


@task(name="resolve-exact-duplicates", **_retrying)
def resolve_exact_task(plan: RunPlan) -> dict:
    result = embedding.resolve_exact(plan)
    get_run_logger().info("%d items, %d exact copies removed before embedding, %d unusable", result["n_items"], result["n_exact"], result["n_failed"])
    return result


@task(name="embed-shard", task_run_name="embed-shard-{shard_index}", **_retrying)
def embed_shard_task(plan: RunPlan, shard_index: int) -> dict:
    result = _compute(embedding.embed_shard, plan, shard_index)
    get_run_logger().info("shard %d: %d items embedded in %.1f s", shard_index, result["n_embedded"], result["seconds"])
    return result


@task(name="plan-embedded", **_retrying)
def plan_embedded_task(plan: RunPlan, timings: dict[str, float]) -> RunPlan:
    """Sizes of the dedup stages from the embeddings; recorded in run.json. When nothing
    could be embedded, every item is accounted as failed and the run stops (NoUsableItems)."""
    results.refuse_if_nothing_usable(plan, timings)
    embedded = embedding.plan_embedded(plan)
    write_run_json(embedded)
    return embedded


@task(name="write-shard", task_run_name="write-shard-{shard_index}", **_retrying)
def write_shard_task(plan: RunPlan, shard_index: int) -> dict:
    return raw_writers.write_shard(plan, shard_index)


@task(name="fit-centroids", **_retrying)
def fit_centroids_task(plan: RunPlan) -> dict:
    stats = _compute(partitions.fit_centroids, plan)
    get_run_logger().info("k-means on %d points: objective %.1f, imbalance %.3f", stats["sample_size"], stats["objective"][-1], stats["imbalance_factor"][-1])
    return stats


@task(name="assign-shard", task_run_name="assign-shard-{shard_index}", **_retrying)
def assign_shard_task(plan: RunPlan, shard_index: int) -> dict:
    manifest = _compute(partitions.assign_shard, plan, shard_index)
    if manifest["n_failed"]:
        get_run_logger().warning("shard %d: %d items failed (see result/failed.parquet)", shard_index, manifest["n_failed"])
    return {k: manifest[k] for k in ("shard", "n_rows", "n_assigned", "n_failed")}


@task(name="collect-partitions", **_retrying)
def collect_partitions_task(plan: RunPlan) -> dict:
    return partitions.collect_partitions(plan)


@task(name="tune-eps", **_retrying)
def tune_eps_task(plan: RunPlan, partition_index: dict) -> dict:
    result = _compute(tuning.tune_eps, plan, partition_index)
    get_run_logger().info(
        "eps=%.6f predicted kept fraction %.4f (target %.4f) on %d clusters",
        result["eps"],
        result["predicted_kept_fraction"],
        result["target_keep"],
        result["sample_clusters"],
    )
    return result


@task(name="dedup-bucket", task_run_name="dedup-bucket-{bucket}", **_retrying)
def score_bucket_task(plan: RunPlan, bucket: int, entries: list, eps: float | None) -> dict:
    return _compute(dedup.score_bucket, plan, bucket, entries, eps)


@task(name="exact-eps", **_retrying)
def exact_eps_task(plan: RunPlan, partition_index: dict, sampled: dict) -> dict:
    result = tuning.exact_eps(plan, partition_index, sampled)
    get_run_logger().info(
        "eps=%.6g keeps %d of %d judged items (target %.4f; the sample predicted eps=%.6g)",
        result["eps"],
        result["n_kept"],
        result["n_judged"],
        result["target_keep"],
        result["sampled_eps"],
    )
    return result


@task(name="apply-threshold", task_run_name="apply-threshold-{bucket}", **_retrying)
def apply_threshold_task(plan: RunPlan, bucket: int, eps: float) -> dict:
    return dedup.apply_threshold(plan, bucket, eps)


@task(name="finalize", **_retrying)
def finalize_task(plan: RunPlan, eps: float, tuning_result: dict | None, timings: dict[str, float]) -> dict:
    summary = results.finalize(plan, eps, tuning_result, timings)
    create_markdown_artifact(
        key="semdedup-summary",
        markdown=(
            f"### semdedup: {summary['n_kept']:,} kept, {summary['n_removed']:,} removed, {summary['n_failed']:,} failed\n\n"
            f"of {summary['n_input']:,} items at eps={summary['eps']:.6g} (kept fraction {summary['kept_fraction']:.4f}).\n\n"
            f"Output: `{plan.config.output}` (report: `{plan.layout.report}`)"
        ),
        description="semdedup run summary",
    )
    if tuning_result:
        create_table_artifact(key="semdedup-tuning", table=[tuning_result], description="eps tuned to the target kept fraction")
    return summary
