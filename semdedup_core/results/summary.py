"""Finalize a run: kept / removed / failed, summary.json, and the samples the report shows."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core.dedup import reference
from semdedup_core.dedup.partitions import FAILED_SCHEMA
from semdedup_core.results.report import PairSampler
from semdedup_core.run.plan import RunPlan, package_versions
from semdedup_core.run.stage_results import PartitionIndex, RunSummary, SimilarityHistogram, SourceCounts, TuningResult, Written, WrittenShard
from semdedup_core.inputs.precomputed import InputError
from semdedup_core.storage import parquet_writer, read_json, read_parquet, remove, write_json, write_parquet
from semdedup_core.dedup.tuning import target_miss_warning

logger = logging.getLogger(__name__)

KEPT_SCHEMA = pa.schema([("id", pa.string())])
# reason: "semantic" (max_sim > 1 - eps inside a cluster), "exact" (identical content,
# resolved before embedding: no max_sim, no cluster) or "reference" (dup_of is an item of a
# reference set; docs/architecture.md §"Reference sets"). kept_id: the kept item the removed
# item's group resolves to (dup_of followed until a kept item; null when the reference
# removed the group's item); source: where it lives.
REMOVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dup_of", pa.string()),
        ("max_sim", pa.float32()),
        ("cluster", pa.int32()),
        ("reason", pa.string()),
        ("kept_id", pa.string()),
        ("source", pa.string()),
    ]
)
# Removed rows between the two passes of finalize, grouped by input shard.
_SPILL_SCHEMA = pa.schema(
    [
        ("id", pa.string()), ("dup_of", pa.string()), ("max_sim", pa.float32()), ("cluster", pa.int32()), ("kept_id", pa.string()),
        ("reason", pa.string()), ("shard", pa.int32()), ("row", pa.int64()),
    ]
)
_SPILL_FLUSH_ROWS = 131072
# result/similarity.json: bins of 1e-4 over the whole cosine range.
_HISTOGRAM_LOWER, _HISTOGRAM_WIDTH, _HISTOGRAM_BINS = -1.0, 1e-4, 20000


def finalize(plan: RunPlan, eps: float, tuning: TuningResult | None, timings: dict[str, float]) -> RunSummary:
    """Every input item ends in exactly one of kept / removed / failed (the DAG stores the
    summary as summary.json, last).

    Two streaming passes, memory bounded by a bucket and a shard, never by the run:
    1. per bucket of clusters: kept ids out; each removed item's kept_id found by following
       dup_of inside the bucket (a cluster never points outside itself); removed rows
       spilled grouped by input shard.
    2. per input shard: its removed rows (semantic and exact copies) get their source and
       are written in input order.
    """
    layout = plan.layout
    names = [s.name for s in (plan.sources if plan.embeds else plan.shards)]
    n_shards = len(names)
    failed_parts = [read_parquet(layout.embeddings_failed(s.index)) for s in plan.sources]
    failed_parts += [read_parquet(layout.partition_failed(s.index)) for s in plan.shards]
    failed_per_shard = np.zeros(n_shards, np.int64)
    for shard, part in zip([*plan.sources, *plan.shards], failed_parts):
        failed_per_shard[shard.index] += part.num_rows
    failed = pa.concat_tables([t.cast(FAILED_SCHEMA) for t in failed_parts])
    exact = _exact_copies(plan, failed)
    failed = pa.concat_tables([failed, exact.failed.select(FAILED_SCHEMA.names)])
    failed_per_shard += np.bincount(exact.failed.column("shard").to_numpy(), minlength=n_shards)
    write_parquet(layout.failed, failed)

    partition_index = PartitionIndex.model_validate(read_json(layout.partition_index))
    exact_targets = pc.unique(exact.removed.column("dup_of").combine_chunks())
    target_kept: list[pa.Table] = []  # (id, kept_id, reason, dup_of, max_sim) of the items exact copies point to
    kept_per_shard = np.zeros(n_shards, np.int64)
    spill_groups: dict[int, list[int]] = {}  # shard -> row groups of the spill file
    n_kept = n_removed = n_reference = 0
    pairs = PairSampler(eps, plan.config.seed)  # the report's pairs, gathered while streaming
    histogram = np.zeros(_HISTOGRAM_BINS, np.int64)
    n_first = 0
    with parquet_writer(layout.kept, KEPT_SCHEMA) as kept_w, parquet_writer(layout.removed_spill, _SPILL_SCHEMA) as spill_w:
        spill = _Spill(spill_w, spill_groups)
        for bucket in range(plan.buckets):
            scores = read_parquet(layout.scores(bucket))
            where = _bucket_rows(plan, partition_index.buckets[bucket])
            at = pc.index_in(scores.column("id"), value_set=where.column("id").combine_chunks())
            shard, row = where.column("shard").take(at), where.column("row").take(at)
            # Both from the in-run judging, before any reference removal (which is eps-dependent).
            n_first += _add_to_histogram(histogram, scores.column("max_sim"))
            pairs.add(scores, shard)
            kept_id = _kept_ids(scores, read_parquet(layout.scores_earlier(bucket)) if plan.earlier else None)
            reason = pa.repeat("semantic", scores.num_rows)
            if plan.references:  # docs/architecture.md §"Reference sets"
                scores, kept_id, reason = reference.decontaminate(plan, bucket, scores, kept_id, eps)
            kept_mask = scores.column("kept")
            kept_w.write_table(scores.filter(kept_mask).select(["id"]).cast(KEPT_SCHEMA))
            kept_per_shard += np.bincount(shard.filter(kept_mask).to_numpy(), minlength=n_shards)
            targets_here = {"id": scores.column("id"), "kept_id": kept_id, "reason": reason, "dup_of": scores.column("dup_of"), "max_sim": scores.column("max_sim")}
            target_kept.append(pa.table(targets_here).filter(pc.is_in(scores.column("id"), value_set=exact_targets)))
            gone = pc.invert(kept_mask)
            removed = pa.table(
                {
                    "id": scores.column("id"),
                    "dup_of": scores.column("dup_of"),
                    "max_sim": scores.column("max_sim"),
                    "cluster": scores.column("cluster"),
                    "kept_id": kept_id,
                    "reason": reason,
                    "shard": shard,
                    "row": row,
                }
            ).filter(gone)
            spill.add(removed.cast(_SPILL_SCHEMA))
            n_kept += scores.num_rows - removed.num_rows
            n_removed += removed.num_rows
            n_reference += pc.sum(pc.equal(removed.column("reason"), reference.REASON)).as_py() or 0
        spill.flush()

    targets = pa.concat_tables(target_kept) if target_kept else pa.table({"id": pa.array([], pa.string()), "kept_id": pa.array([], pa.string())})
    target_at = pc.index_in(exact.removed.column("dup_of"), value_set=targets.column("id").combine_chunks())
    if target_at.null_count:
        raise RuntimeError("an exact copy's original was neither judged nor failed")
    exact_removed = exact.removed.append_column("kept_id", targets.column("kept_id").take(target_at))
    if plan.references:
        exact_removed = reference.exact_copies_of_removed(exact_removed, targets)
        n_reference += pc.sum(pc.equal(exact_removed.column("reason"), reference.REASON)).as_py() or 0
    exact_removed = exact_removed.sort_by("shard")
    exact_bounds = np.searchsorted(exact_removed.column("shard").to_numpy(), np.arange(n_shards + 1))
    removed_per_shard = np.zeros(n_shards, np.int64)
    with parquet_writer(layout.removed, REMOVED_SCHEMA) as removed_w:
        for shard_index in range(n_shards):
            copies = exact_removed.slice(exact_bounds[shard_index], exact_bounds[shard_index + 1] - exact_bounds[shard_index])
            part = _shard_removed(plan, shard_index, spill_groups.get(shard_index, []), copies)
            removed_w.write_table(part)
            removed_per_shard[shard_index] = part.num_rows
    remove(layout.removed_spill)

    n_embedded = n_kept + n_removed
    n_exact = exact.removed.num_rows
    similarity = SimilarityHistogram(lower=_HISTOGRAM_LOWER, width=_HISTOGRAM_WIDTH, counts=histogram.tolist(), n_first=n_first, n_exact=n_exact)
    write_json(layout.similarity, similarity.model_dump(mode="json"))
    n_removed += n_exact
    n_failed = failed.num_rows
    if n_kept + n_removed + n_failed != plan.n_input:
        raise RuntimeError(f"accounting error: kept {n_kept} + removed {n_removed} + failed {n_failed} != input {plan.n_input}")
    input_per_shard = _input_per_shard(plan, n_shards)
    per_source = [
        SourceCounts(source=name, input=int(i), kept=int(k), removed=int(r), failed=int(f))
        for name, i, k, r, f in zip(names, input_per_shard, kept_per_shard, removed_per_shard, failed_per_shard)
    ]
    long_texts = _long_texts(plan)
    summary = run_summary(
        plan,
        timings,
        n_input=plan.n_input,
        n_embedded=n_embedded,
        n_judged=plan.n_input - n_failed,
        n_kept=n_kept,
        n_removed=n_removed,
        n_exact=n_exact,
        n_failed=n_failed,
        n_reference=n_reference if plan.references else None,
        n_long_texts=long_texts,
        long_text=plan.config.long_text if long_texts is not None else None,
        eps=eps,
        # Of the judged items (input minus failed; exact copies count as removed), as target_keep.
        kept_fraction=n_kept / (plan.n_input - n_failed) if plan.n_input > n_failed else None,
        tuning=tuning.mode if tuning else None,
        sampled_eps=tuning.sampled_eps if tuning else None,
        predicted_kept_fraction=tuning.predicted_kept_fraction if tuning else None,
        clusters=plan.clusters,
        buckets=plan.buckets,
        per_source=per_source,
    )
    # Warnings travel in the summary: the CLI shows them, whoever else reads summary.json too.
    summary.warnings = [w for w in (target_miss_warning(summary),) if w]
    for warning in summary.warnings:
        logger.warning(warning)
    write_parquet(layout.pairs, pairs.table())
    return summary


def _add_to_histogram(histogram: np.ndarray, max_sim: pa.ChunkedArray) -> int:
    """Count a bucket's max_sim into ``histogram``; returns how many had none (first in cluster)."""
    values = max_sim.to_numpy(zero_copy_only=False).astype(np.float64)
    defined = values[np.isfinite(values)]
    bins = np.clip(np.floor((defined - _HISTOGRAM_LOWER) / _HISTOGRAM_WIDTH).astype(np.int64), 0, len(histogram) - 1)
    histogram += np.bincount(bins, minlength=len(histogram))
    return len(values) - len(defined)


class _Spill:
    """Removed rows buffered, then written as one row group per input shard."""

    def __init__(self, writer, groups: dict[int, list[int]]):
        self.writer, self.groups = writer, groups
        self.buffer: list[pa.Table] = []
        self.n_buffered = self.n_groups = 0

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.n_buffered += table.num_rows
        if self.n_buffered >= _SPILL_FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.n_buffered:
            return
        table = pa.concat_tables(self.buffer).sort_by("shard")
        shards = table.column("shard").to_numpy()
        starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], len(shards)]):
            self.writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
            self.groups.setdefault(int(shards[lo]), []).append(self.n_groups)
            self.n_groups += 1
        self.buffer, self.n_buffered = [], 0


def _bucket_rows(plan: RunPlan, entries: list) -> pa.Table:
    """id, shard, row (in the shard the dedup stages read) of a bucket's items, from its partitions."""
    parts = []
    for shard_index, groups in entries:
        t = read_parquet(plan.layout.partition(shard_index), columns=["id", "row"], row_groups=[g for g, _, _ in groups])
        parts.append(t.append_column("shard", pa.array(np.full(t.num_rows, shard_index, np.int32))))
    if not parts:
        return pa.table({"id": pa.array([], pa.string()), "row": pa.array([], pa.int64()), "shard": pa.array([], pa.int32())})
    return pa.concat_tables(parts)


def _kept_ids(scores: pa.Table, earlier: pa.Table | None = None) -> pa.Array:
    """For every scored item, the kept item its group resolves to (itself when kept): dup_of
    followed until a kept item, by pointer jumping (log of the chain length in steps). In a
    collection's generation a dup_of may be an earlier item (``earlier``: id -> kept_id)."""
    ids = scores.column("id").combine_chunks()
    kept = scores.column("kept").to_numpy(zero_copy_only=False)
    n = len(ids)
    targets = ids if earlier is None else pa.concat_arrays([ids, earlier.column("id").combine_chunks()])
    resolved = ids if earlier is None else pa.concat_arrays([ids, earlier.column("kept_id").combine_chunks()])
    parent = np.arange(len(targets))
    gone = np.flatnonzero(~kept)
    at = pc.index_in(scores.column("dup_of").combine_chunks().take(pa.array(gone)), value_set=targets)
    if at.null_count:
        raise RuntimeError("a removed item's dup_of is neither in its bucket nor an earlier item of its clusters")
    parent[gone] = at.to_numpy(zero_copy_only=False)
    kept = np.concatenate([kept, np.ones(len(targets) - n, bool)])  # earlier items: terminal, resolved already
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    if not kept[parent].all():
        raise RuntimeError("a duplicate chain does not end at a kept item")
    return resolved.take(pa.array(parent[:n]))


def _shard_removed(plan: RunPlan, shard_index: int, groups: list[int], copies: pa.Table) -> pa.Table:
    """A shard's removed items, semantic and exact, with their source, in input order."""
    if groups:
        semantic = read_parquet(plan.layout.removed_spill, row_groups=groups)
    else:
        semantic = _SPILL_SCHEMA.empty_table()
    if plan.embeds:
        # The dedup stages read the run's own embeddings shard: its rows are not the input's.
        scan = read_parquet(plan.layout.scan(shard_index), columns=["row", "id", "source"])
        at = pc.index_in(semantic.column("id"), value_set=scan.column("id").combine_chunks())
        rows, sources = scan.column("row").take(at), scan.column("source").take(at)
    else:
        rows = semantic.column("row")
        name = plan.shards[shard_index].name
        sources = pa.array([f"{name} row {r}" for r in rows.to_pylist()], pa.string())
    table = pa.table(
        {
            "id": semantic.column("id"),
            "dup_of": semantic.column("dup_of"),
            "max_sim": semantic.column("max_sim"),
            "cluster": semantic.column("cluster"),
            "reason": semantic.column("reason"),
            "kept_id": semantic.column("kept_id"),
            "source": sources,
            "row": rows,
        }
    )
    if copies.num_rows:
        table = pa.concat_tables([table, copies.select(table.column_names).cast(table.schema)])
    return table.sort_by("row").drop_columns(["row"]).cast(REMOVED_SCHEMA)


def _input_per_shard(plan: RunPlan, n_shards: int) -> np.ndarray:
    if plan.embeds:
        return np.array([read_json(plan.layout.embeddings_done(s.index))["n_items"] for s in plan.sources], np.int64)
    return np.array([s.n_rows for s in plan.shards], np.int64)


def _long_texts(plan: RunPlan) -> int | None:
    """Texts longer than the model's limit (chunked, truncated or failed), None for no text."""
    if not plan.embeds:
        return None
    counts = [read_json(plan.layout.embeddings_done(s.index)).get("n_long_texts") for s in plan.sources]
    counts = [c for c in counts if c is not None]
    return sum(counts) if counts else None


@dataclass
class _ExactCopies:
    removed: pa.Table  # id, dup_of, max_sim, cluster, reason ("exact"), source, shard, row
    failed: pa.Table  # FAILED_SCHEMA + shard: copies of an item that failed (they would fail the same way)


def _exact_copies(plan: RunPlan, failed: pa.Table) -> _ExactCopies:
    """Exact copies resolved before embedding, split by whether the item they copy made it."""
    exact = read_parquet(plan.layout.exact_duplicates, columns=["id", "dup_of", "source", "shard", "row"]) if plan.embeds else None
    if exact is None:
        exact = pa.table({"id": pa.array([], pa.string()), "dup_of": pa.array([], pa.string()), "source": pa.array([], pa.string()), "shard": pa.array([], pa.int32()), "row": pa.array([], pa.int64())})
    failed_ids = failed.column("id").combine_chunks()
    of_failed = pc.is_in(exact.column("dup_of"), value_set=failed_ids)
    ok, bad = exact.filter(pc.invert(of_failed)), exact.filter(of_failed)
    errors = failed.column("error").take(pc.index_in(bad.column("dup_of"), value_set=failed_ids)).to_pylist()
    n = ok.num_rows
    removed = pa.table(
        {
            "id": ok.column("id"),
            "dup_of": ok.column("dup_of"),
            "max_sim": pa.nulls(n, pa.float32()),
            "cluster": pa.nulls(n, pa.int32()),
            "reason": pa.array(["exact"] * n, pa.string()),
            "source": ok.column("source"),
            "shard": ok.column("shard"),
            "row": ok.column("row"),
        }
    )
    failed_copies = pa.table(
        {
            "id": bad.column("id"),
            "source": bad.column("source"),
            "error": pa.array([f"exact copy of {o}, which failed: {e}" for o, e in zip(bad.column("dup_of").to_pylist(), errors)], pa.string()),
            "shard": bad.column("shard"),
        }
    )
    return _ExactCopies(removed, failed_copies)


class NoUsableItems(InputError):
    """Raw input in which no item could be embedded; every item is in result/failed.parquet."""


def run_summary(plan: RunPlan, timings: dict[str, float], **counts) -> RunSummary:
    """The run's counts and decisions (``counts``) beside what every summary records about the run."""
    return RunSummary(
        output=plan.config.output,
        target_keep=plan.config.target_keep,
        **counts,
        keep=plan.config.keep,
        device=plan.device,
        input_format=plan.input_format,
        embedder=plan.embedder,
        stage_seconds=timings,
        versions=package_versions(),
    )


def refuse_if_nothing_usable(plan: RunPlan, timings: dict[str, float]) -> None:
    """After the embedding stage: when no item was embedded, account every input item as
    failed (kept and removed empty, summary.json with the reason) and raise NoUsableItems."""
    layout = plan.layout
    markers = [read_json(layout.embeddings_done(s.index)) for s in plan.sources]
    if any(m["n_embedded"] for m in markers):
        return
    failed = pa.concat_tables([read_parquet(layout.embeddings_failed(s.index)).cast(FAILED_SCHEMA) for s in plan.sources])
    exact = _exact_copies(plan, failed)
    if exact.removed.num_rows:  # every exact copy's original failed, so the copies did too
        raise RuntimeError("exact copies of an item that was neither embedded nor failed")
    failed = pa.concat_tables([failed, exact.failed.select(FAILED_SCHEMA.names)])
    n_input = sum(m["n_items"] for m in markers)
    reasons = Counter(failed.column("error").to_pylist()).most_common()
    shown = ", ".join(f"{n} {reason}" for reason, n in reasons[:3])
    if len(reasons) > 3:
        shown += f", {sum(n for _, n in reasons[3:])} for {len(reasons) - 3} other reasons"
    message = f"no usable items: {failed.num_rows} of {n_input} failed ({shown}); see {layout.failed}" if n_input else "no usable items: the input holds no items"
    write_parquet(layout.failed, failed)
    write_parquet(layout.kept, KEPT_SCHEMA.empty_table())
    write_parquet(layout.removed, REMOVED_SCHEMA.empty_table())
    summary = run_summary(
        plan,
        timings,
        n_input=n_input,
        n_embedded=0,
        n_judged=0,
        n_kept=0,
        n_removed=0,
        n_exact=0,
        n_failed=failed.num_rows,
        eps=plan.config.effective_eps,
        clusters=0,
        buckets=0,
        refused=message,
    )
    write_json(layout.summary, summary.model_dump(mode="json"))
    raise NoUsableItems(message)


def record_written(plan: RunPlan, written: list[WrittenShard], seconds: float) -> RunSummary:
    """Add the dataset writers' counts and time to summary.json."""
    summary = RunSummary.model_validate(read_json(plan.layout.summary))
    summary.stage_seconds["write"] = seconds
    summary.written = Written(
        dataset=plan.layout.dataset("") if plan.config.write_dataset else None,
        removed=plan.layout.removed_dataset("") if plan.config.write_removed else None,
        counts={k: sum(w.counts[k] for w in written) for k in ("kept", "removed", "failed")},
    )
    write_json(plan.layout.summary, summary.model_dump(mode="json"))
    return summary
