"""The run's DAG, described once (docs/architecture.md §"The DAG").

    plan ─▶ scan[shard] ─▶ exact duplicates ─▶ embed[shard]          (raw images or text only)
         ─▶ fit centroids (sample) ─▶ assign[shard] ─▶ collect
         ─▶ tune eps (target_keep: the sampled prediction) ─▶ dedup[bucket]
         ─▶ threshold (target_keep, tuning='exact': eps met on every item ─▶ apply[bucket])
         ─▶ recall (the paper's eta on a seeded sample, at the final eps)
         ─▶ reference[bucket]   (--reference: each set embedded, assigned after fit, then per bucket)
         ─▶ finalize ─▶ report ─▶ write[shard]                        (if asked: the dataset back)

:func:`run_dag` walks it; an :class:`Executor` decides where each unit runs. The executor
here runs units in this process (library use, notebooks, benchmarks); the Prefect flow
(flows/dedup_flow.py) supplies one that runs every unit as a Prefect task on the flow's
task runner (threads, Dask, Ray). Either way a unit executes through :func:`run_step`, the
one place that skips a finished unit and writes its completion marker last.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from contextvars import copy_context
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from semdedup_core.config import RunConfig
from semdedup_core.dedup import partitions, recall, reference, scoring, tuning
from semdedup_core.embedding import stage as embedding
from semdedup_core.results import dataset as dataset_writer
from semdedup_core.results import report
from semdedup_core.results import summary as results
from semdedup_core.run.collection import NothingNew, commit_generation, nothing_new_summary
from semdedup_core.run.layout import RunLayout
from semdedup_core.run.lease import Lease
from semdedup_core.run.plan import PlanRef, RunPlan, StageClock, plan_run, refusals_recorded, start_run, store_plan, write_run_json
from semdedup_core.run import rethreshold
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
    StageResult,
    TuningResult,
    WrittenShard,
)
from semdedup_core.storage import exists, read_json, write_json

R = TypeVar("R", bound=StageResult)
logger = logging.getLogger("semdedup")


@dataclass(frozen=True)
class Step(Generic[R]):
    """One kind of unit of the DAG: a core function, where its marker lives, what it returns.

    ``compute(plan, unit, **inputs)`` (mapped) or ``compute(plan, **inputs)`` writes the
    unit's artifacts and returns its result; :func:`run_step` stores that result at
    ``marker`` once everything else is written. ``reusable(stored, plan, **inputs)`` says
    whether a stored result still answers these inputs (default: always).
    """

    name: str
    compute: Callable[..., R]
    result: type[R]
    marker: Callable[..., str]
    describe: Callable[[R], str]  # the unit's log line
    heavy: bool = False  # CPU/GPU-bound: sets the task's torch/faiss threads
    mapped: bool = False
    reusable: Callable[..., bool] | None = None


SCAN = Step(
    "scan-shard",
    embedding.scan_shard,
    ScanResult,
    RunLayout.scan_done,
    lambda r: f"shard {r.shard}: {r.n_items} items read, {r.n_failed} unusable (see result/failed.parquet)",
    mapped=True,
)
EXACT = Step(
    "resolve-exact-duplicates",
    embedding.resolve_exact,
    ExactResult,
    lambda layout: layout.exact_done,
    lambda r: f"{r.n_items} items, {r.n_exact} exact copies removed before embedding, {r.n_failed} unusable",
)
EMBED = Step(
    "embed-shard",
    embedding.embed_shard,
    EmbedResult,
    RunLayout.embeddings_done,
    lambda r: f"shard {r.shard}: {r.n_embedded} items embedded in {r.seconds:.1f} s, {r.n_failed} failed",
    heavy=True,
    mapped=True,
)
FIT = Step(
    "fit-centroids",
    partitions.fit_centroids,
    FitResult,
    lambda layout: layout.clustering_stats,
    lambda r: f"k-means ({r.method}, k={r.clusters}) on {r.sample_size} points: objective {r.objective[-1]:.1f}, imbalance {r.imbalance_factor[-1]:.3f}",
    heavy=True,
)
ASSIGN = Step(
    "assign-shard",
    partitions.assign_shard,
    ShardPartition,
    RunLayout.partition_manifest,
    lambda r: f"shard {r.shard}: {r.n_assigned} items assigned, {r.n_failed} failed (see result/failed.parquet)",
    heavy=True,
    mapped=True,
)
COLLECT = Step(
    "collect-partitions",
    partitions.collect_partitions,
    PartitionIndex,
    lambda layout: layout.partition_index,
    lambda r: f"{r.n_assigned} items in {r.nonempty_clusters} non-empty clusters, {len(r.buckets)} buckets",
)
TUNE = Step(
    "tune-eps",
    tuning.tune_eps,
    TuningResult,
    lambda layout: layout.tuning_prediction,
    lambda r: f"sampled eps={r.eps:.6g} predicts kept fraction {r.predicted_kept_fraction:.4f} (target {r.target_keep:.4f}) on {r.sample_clusters} clusters",
    heavy=True,
)
DEDUP = Step(
    "dedup-bucket",
    scoring.score_bucket,
    BucketScores,
    RunLayout.scores_done,
    lambda r: f"bucket {r.bucket}: {r.n_scored} items in {r.clusters} clusters scored" + (f", {r.n_removed} removed" if r.n_removed is not None else ""),
    heavy=True,
    mapped=True,
)
THRESHOLD = Step(
    "exact-eps",
    tuning.exact_eps,
    TuningResult,
    lambda layout: layout.tuning_result,
    lambda r: f"eps={r.eps:.6g} keeps {r.n_kept} of {r.n_judged} judged items (target {r.target_keep:.4f}; the sample predicted eps={r.sampled_eps:.6g})",
)
APPLY = Step(
    "apply-threshold",
    scoring.apply_threshold,
    BucketScores,
    RunLayout.scores_done,
    lambda r: f"bucket {r.bucket}: {r.n_removed} of {r.n_scored} removed at eps={r.eps:.6g}",
    mapped=True,
    reusable=lambda stored, plan, eps: stored.eps == eps,
)
RECALL = Step(
    "estimate-recall",
    recall.estimate_recall,
    RecallEstimate,
    lambda layout: layout.recall_estimate,
    recall.describe,
    heavy=True,
    reusable=lambda stored, plan, eps: stored.eps == eps,
)
REFERENCE = Step(
    "reference-bucket",
    reference.score_against_references,
    reference.ReferenceScores,
    RunLayout.reference_done,
    lambda r: f"bucket {r.bucket}: {r.n_scored} items compared with {r.n_reference_items} reference items of their clusters",
    heavy=True,
    mapped=True,
)
FINALIZE = Step(
    "finalize",
    results.finalize,
    RunSummary,
    lambda layout: layout.summary,
    lambda r: f"{r.n_kept} kept, {r.n_removed} removed ({r.n_exact} exact copies), {r.n_failed} failed of {r.n_input} at eps={r.eps:.6g}",
)
REPORT = Step(
    "render-report",
    report.write_report,
    report.ReportResult,
    lambda layout: layout.report_done,
    lambda r: f"report with {r.n_pairs} sampled pairs: {r.path}",
)
WRITE = Step(
    "write-shard",
    dataset_writer.write_shard,
    WrittenShard,
    RunLayout.written,
    lambda r: f"shard {r.shard}: " + ", ".join(f"{n} {k}" for k, n in r.counts.items()),
    mapped=True,
    reusable=lambda stored, plan: plan.config.write_dataset <= stored.kept and plan.config.write_removed <= stored.removed,
)
# A rethreshold (run/rethreshold.py) replaces tune and dedup with these: nothing is scored again.
PREDICT = Step(
    "predict-eps-from-scores",
    rethreshold.predict_from_scores,
    TuningResult,
    lambda layout: layout.tuning_prediction,
    lambda r: f"sampled eps={r.eps:.6g} predicts kept fraction {r.predicted_kept_fraction:.4f} (target {r.target_keep:.4f}) from the stored scores of {r.sample_clusters} clusters",
)
RESCORE = Step(
    "rethreshold-bucket",
    rethreshold.rescore_bucket,
    BucketScores,
    RunLayout.scores_done,
    lambda r: f"bucket {r.bucket}: {r.n_scored} stored scores" + (f", {r.n_removed} removed at eps={r.eps:.6g}" if r.eps is not None else ""),
    mapped=True,
)
STEPS = (SCAN, EXACT, EMBED, FIT, ASSIGN, COLLECT, TUNE, DEDUP, THRESHOLD, APPLY, RECALL, REFERENCE, FINALIZE, REPORT, WRITE, PREDICT, RESCORE)


def threads_per_task(cfg: RunConfig) -> int:
    """torch/faiss threads for one heavy unit: ``threads_per_task`` when set; else the
    process's OMP_NUM_THREADS (Dask's nanny sets it to the worker's share); else this
    machine's cores split between the ``workers`` units running at once."""
    if cfg.threads_per_task is not None:
        return cfg.threads_per_task
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, (os.cpu_count() or 1) // cfg.workers)


@contextmanager
def compute_threads(cfg: RunConfig) -> Iterator[None]:
    """Thread counts set in the thread that computes: OpenMP's count is per calling thread,
    so setting it once in the flow's main thread leaves task threads using every core."""
    import faiss
    import torch

    threads = threads_per_task(cfg)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    yield


def run_step(step: Step[R], plan: RunPlan, unit: int | None = None, **inputs: Any) -> R:
    """Execute one unit: return its stored result when it finished before (and still
    answers ``inputs``); otherwise compute it and store the result last, as its marker."""
    url = step.marker(plan.layout, unit) if step.mapped else step.marker(plan.layout)
    if exists(url):
        stored = step.result.model_validate(read_json(url))
        if step.reusable is None or step.reusable(stored, plan, **inputs):
            return _unit_done(step, plan, stored)
    with compute_threads(plan.config) if step.heavy else nullcontext():
        result = step.compute(plan, unit, **inputs) if step.mapped else step.compute(plan, **inputs)
    write_json(url, result.model_dump(mode="json"))
    return _unit_done(step, plan, result)


# ---------------------------------------------------------------- progress of mapped stages


@dataclass(frozen=True)
class Progress:
    """Where a mapped stage stands: units finished of all, the items those units held, and
    the seconds since the stage started. Sent once as the stage starts, then per unit."""

    step: str
    units_done: int
    units: int
    items_done: int
    seconds: float


ProgressListener = Callable[[Progress], None]
_listeners: list[ProgressListener] = []
# (output, step name) -> [units done, units, items done, start] while the step is mapped
_stages: dict[tuple[str, str], list] = {}
_progress_lock = threading.Lock()


@contextmanager
def progress_listener(listener: ProgressListener) -> Iterator[None]:
    """Call ``listener`` (from any thread) as mapped units finish in this process, whichever
    executor runs them here; units run in other processes (Dask, Ray workers) are not seen."""
    with _progress_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _progress_lock:
            _listeners.remove(listener)


def _items_of(result: StageResult) -> int:
    """How many items a unit's result covers (its input rows, or the items it scored)."""
    for field in ("n_items", "n_rows", "n_scored"):
        value = getattr(result, field, None)
        if isinstance(value, int):
            return value
    counts = getattr(result, "counts", None)
    return sum(counts.values()) if isinstance(counts, dict) else 0


def _notify(key: tuple[str, str]) -> None:
    done, units, items, start = _stages[key]
    event = Progress(key[1], done, units, items, time.monotonic() - start)
    for listener in list(_listeners):
        listener(event)


def _unit_done(step: Step[R], plan: RunPlan, result: R) -> R:
    key = (plan.config.output, step.name)
    with _progress_lock:
        if key in _stages:
            stage = _stages[key]
            stage[0] += 1
            stage[2] += _items_of(result)
            _notify(key)
    return result


class _Tracked:
    """An executor whose mapped stages report their progress to the listeners."""

    def __init__(self, executor: Executor):
        self.executor = executor

    def plan(self, cfg: RunConfig) -> RunPlan:
        return self.executor.plan(cfg)

    def run(self, step: Step[R], plan: RunPlan, **inputs: Any) -> R:
        return self.executor.run(step, plan, **inputs)

    def map(self, step: Step[R], plan: RunPlan, units: Sequence[int], per_unit: dict[str, Sequence] | None = None, **inputs: Any) -> list[R]:
        key = (plan.config.output, step.name)
        with _progress_lock:
            _stages[key] = [0, len(units), 0, time.monotonic()]
            _notify(key)
        try:
            return self.executor.map(step, plan, units, per_unit, **inputs)
        finally:
            with _progress_lock:
                _stages.pop(key, None)


class Executor(Protocol):
    """Where units run. ``plan`` validates the run before any work; ``run`` executes one
    unit; ``map`` one unit per element of ``units`` (``per_unit`` inputs are indexed like
    ``units``, the rest shared)."""

    def plan(self, cfg: RunConfig) -> RunPlan: ...

    def run(self, step: Step[R], plan: RunPlan, **inputs: Any) -> R: ...

    def map(self, step: Step[R], plan: RunPlan, units: Sequence[int], per_unit: dict[str, Sequence] | None = None, **inputs: Any) -> list[R]: ...


class InProcessExecutor:
    """Units in this process: mapped units on ``workers`` threads, as the Prefect flow's
    default task runner would, so the two differ only by Prefect's own cost."""

    def __init__(self, workers: int = 1):
        self.workers = workers

    def plan(self, cfg: RunConfig) -> RunPlan:
        return plan_run(cfg)

    def run(self, step: Step[R], plan: RunPlan, **inputs: Any) -> R:
        return _logged(step, run_step(step, plan, **inputs))

    def map(self, step: Step[R], plan: RunPlan, units: Sequence[int], per_unit: dict[str, Sequence] | None = None, **inputs: Any) -> list[R]:
        per_unit = per_unit or {}
        calls = [(unit, {**inputs, **{k: v[i] for k, v in per_unit.items()}}) for i, unit in enumerate(units)]
        if self.workers == 1 or len(calls) <= 1:
            return [_logged(step, run_step(step, plan, unit, **kw)) for unit, kw in calls]
        with ThreadPoolExecutor(self.workers) as pool:
            # Each thread runs in a copy of this context: storage options set by the caller apply.
            futures = [pool.submit(copy_context().run, run_step, step, plan, unit, **kw) for unit, kw in calls]
            return [_logged(step, f.result()) for f in futures]


def _logged(step: Step[R], result: R) -> R:
    logger.info("%s: %s", step.name, step.describe(result))
    return result


def run_dag(cfg: RunConfig, executor: Executor) -> RunSummary:
    """The whole run: plan, take the lease, start or resume, then every stage."""
    clock = StageClock()
    executor = _Tracked(executor)
    with clock.stage("plan"):
        try:
            plan = executor.plan(cfg)  # every misconfiguration fails here, before any work
        except NothingNew as exc:
            logger.info("%s", exc)
            return nothing_new_summary(cfg, str(exc), dict(clock.seconds))
    with Lease(plan.layout.lease):  # a second run on the same output is refused here
        start_run(plan)
        try:
            with refusals_recorded(plan):
                if plan.embeds and plan.config.rethreshold_of is None:
                    plan = _embed(plan, executor, clock)
                summary = _dedup(plan, executor, clock)
        except results.NoUsableItems:
            if plan.earlier:  # a generation whose new objects hold nothing usable: processed all the same
                commit_generation(plan, RunSummary.model_validate(read_json(plan.layout.summary)))
            raise
        if plan.config.collection:
            commit_generation(plan, summary)  # last: the generation joins the collection
        return summary


def _embed(plan: RunPlan, executor: Executor, clock: StageClock) -> RunPlan:
    shards = [s.index for s in plan.sources]
    with clock.stage("scan"):
        executor.map(SCAN, plan, shards)
    with clock.stage("exact"):
        executor.run(EXACT, plan)
    with clock.stage("embed"):
        executor.map(EMBED, plan, shards)
    results.refuse_if_nothing_usable(plan, dict(clock.seconds))
    plan = embedding.plan_embedded(plan)
    write_run_json(plan)  # the dedup stages' sizes, known only now
    return plan


def _dedup(plan: RunPlan, executor: Executor, clock: StageClock) -> RunSummary:
    cfg = plan.config
    stored = cfg.rethreshold_of is not None  # a rethreshold: the source's partitions and scores, read only
    if stored:
        index = PartitionIndex.model_validate(read_json(plan.layout.partition_index))
    else:
        with clock.stage("fit"):
            executor.run(FIT, plan)
        with clock.stage("assign"):
            executor.map(ASSIGN, plan, [s.index for s in plan.shards])
        with clock.stage("collect"):
            index = executor.run(COLLECT, plan)
    references: list[PlanRef] = []
    if plan.references:
        with clock.stage("reference-place"):
            references = _place_references(plan, executor)
    tuned: TuningResult | None = None
    eps = cfg.effective_eps
    if cfg.target_keep is not None:
        with clock.stage("tune"):
            tuned = executor.run(PREDICT, plan) if stored else executor.run(TUNE, plan, partition_index=index)
        eps = tuned.eps if cfg.tuning == "sample" else None
    with clock.stage("dedup"):
        buckets = list(range(plan.buckets))
        if stored:
            executor.map(RESCORE, plan, buckets, eps=eps)
        else:
            executor.map(DEDUP, plan, buckets, per_unit={"entries": index.buckets}, eps=eps)
    if eps is None:  # tuning='exact': the eps meeting the target on every scored item
        with clock.stage("threshold"):
            tuned = executor.run(THRESHOLD, plan, partition_index=index, sampled=tuned)
            eps = tuned.eps
            executor.map(APPLY, plan, buckets, eps=eps)
    with clock.stage("recall"):
        executor.run(RECALL, plan, eps=eps)
    if plan.references:  # never in a rethreshold (refused for runs with references)
        with clock.stage("reference"):
            executor.map(REFERENCE, plan, buckets, per_unit={"entries": index.buckets}, references=references)
    with clock.stage("finalize"):
        summary = executor.run(FINALIZE, plan, eps=eps, tuning=tuned, timings=dict(clock.seconds))
    with clock.stage("report"):
        executor.run(REPORT, plan)
    if cfg.write_dataset or cfg.write_removed:
        with clock.stage("write"):
            written = executor.map(WRITE, plan, list(range(len(plan.sources or plan.shards))))
        summary = results.record_written(plan, written, clock.seconds["write"])
    clock.record(plan)
    return summary


def _place_references(plan: RunPlan, executor: Executor) -> list[PlanRef]:
    """Each reference set through the run's own steps under reference/r-N: raw data scanned
    and embedded, then every item assigned to the run's centroids (which the reference never
    moves) and partitioned by the run's bucket plan."""
    run = store_plan(plan)
    placed = []
    for sub in plan.references:
        if sub.embeds:
            shards = [s.index for s in sub.sources]
            executor.map(SCAN, sub, shards)
            executor.run(EXACT, sub)
            executor.map(EMBED, sub, shards)
        sub = reference.placed(sub, plan, run)
        executor.run(FIT, sub)  # copies the run's centroids and bucket plan
        assigned = executor.map(ASSIGN, sub, [s.index for s in sub.shards])
        executor.run(COLLECT, sub)
        left_out = sub.n_input - sum(r.n_assigned for r in assigned)
        logger.info(
            "reference %s: %d items placed, %d left out (unusable, or exact copies of another of its items; see %s)",
            sub.config.input[0], sum(r.n_assigned for r in assigned), left_out, sub.config.output,
        )
        placed.append(store_plan(sub))
    return placed


def run_pipeline(cfg: RunConfig) -> RunSummary:
    """The whole run in this process, without Prefect."""
    return run_dag(cfg, InProcessExecutor(cfg.workers))
