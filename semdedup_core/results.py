"""Finalize a run: kept / removed / failed, summary.json and the HTML report."""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .partitions import FAILED_SCHEMA
from .run import RunPlan, package_versions
from .sources import InputError
from .storage import parquet_writer, read_json, read_parquet, write_bytes, write_json, write_parquet
from .tuning import warn_if_target_missed

KEPT_SCHEMA = pa.schema([("id", pa.string())])
REPORT_TOP_PAIRS = 20
# reason: "semantic" (max_sim > 1 - eps inside a cluster) or "exact" (identical content,
# resolved before embedding: no max_sim, no cluster).
REMOVED_SCHEMA = pa.schema(
    [("id", pa.string()), ("dup_of", pa.string()), ("max_sim", pa.float32()), ("cluster", pa.int32()), ("reason", pa.string())]
)


def finalize(plan: RunPlan, eps: float, tuning: dict | None, timings: dict[str, float]) -> dict:
    """Every input item ends in exactly one of kept / removed / failed; summary.json is written last."""
    layout = plan.layout
    failed_parts = [read_parquet(layout.embeddings_failed(s.index)) for s in plan.sources]
    failed_parts += [read_parquet(layout.partition_failed(s.index)) for s in plan.shards]
    failed = pa.concat_tables([t.cast(FAILED_SCHEMA) for t in failed_parts])
    exact = _exact_copies(plan, failed)
    failed = pa.concat_tables([failed, exact.failed])
    write_parquet(layout.failed, failed)
    n_kept = n_removed = 0
    top_removed: list[pa.Table] = []  # the most similar removed pairs, gathered while streaming
    with parquet_writer(layout.kept, KEPT_SCHEMA) as kept_w, parquet_writer(layout.removed, REMOVED_SCHEMA) as removed_w:
        for bucket in range(plan.buckets):
            scores = read_parquet(layout.scores(bucket))
            kept_mask = scores.column("kept")
            kept = scores.filter(kept_mask).select(["id"])
            removed = scores.filter(pc.invert(kept_mask)).select(["id", "dup_of", "max_sim", "cluster"])
            removed = removed.append_column("reason", pa.array(["semantic"] * removed.num_rows, pa.string()))
            kept_w.write_table(kept.cast(KEPT_SCHEMA))
            removed_w.write_table(removed.cast(REMOVED_SCHEMA))
            n_kept += kept.num_rows
            n_removed += removed.num_rows
            top_removed.append(removed.sort_by([("max_sim", "descending")]).slice(0, REPORT_TOP_PAIRS).cast(REMOVED_SCHEMA))
        removed_w.write_table(exact.removed)
    n_embedded = n_kept + n_removed
    n_exact = exact.removed.num_rows
    n_removed += n_exact
    n_failed = failed.num_rows
    if n_kept + n_removed + n_failed != plan.n_input:
        raise RuntimeError(f"accounting error: kept {n_kept} + removed {n_removed} + failed {n_failed} != input {plan.n_input}")
    summary = {
        "output": plan.config.output,
        "n_input": plan.n_input,
        "n_embedded": n_embedded,
        "n_judged": plan.n_input - n_failed,
        "n_kept": n_kept,
        "n_removed": n_removed,
        "n_exact": n_exact,
        "n_failed": n_failed,
        "eps": eps,
        "target_keep": plan.config.target_keep,
        # Of the judged items (input minus failed; exact copies count as removed), as target_keep.
        "kept_fraction": n_kept / (plan.n_input - n_failed) if plan.n_input > n_failed else None,
        "tuning": tuning["mode"] if tuning else None,
        "sampled_eps": tuning["sampled_eps"] if tuning else None,
        "predicted_kept_fraction": tuning["predicted_kept_fraction"] if tuning else None,
        "clusters": plan.clusters,
        "buckets": plan.buckets,
        "keep": plan.config.keep,
        "device": plan.device,
        "input_format": plan.input_format,
        "embedder": plan.embedder,
        "stage_seconds": timings,
        "versions": package_versions(),
    }
    warn_if_target_missed(summary)
    top = pa.concat_tables(top_removed).sort_by([("max_sim", "descending")]).slice(0, REPORT_TOP_PAIRS) if top_removed else None
    write_bytes(layout.report, render_report(plan, summary, top.to_pylist() if top is not None else []).encode())
    write_json(layout.summary, summary)
    return summary


@dataclass
class _ExactCopies:
    removed: pa.Table  # REMOVED_SCHEMA, reason "exact"
    failed: pa.Table  # FAILED_SCHEMA: copies of an item that failed (they would fail the same way)


def _exact_copies(plan: RunPlan, failed: pa.Table) -> _ExactCopies:
    """Exact copies resolved before embedding, split by whether the item they copy made it."""
    if not plan.embeds:
        return _ExactCopies(REMOVED_SCHEMA.empty_table(), FAILED_SCHEMA.empty_table())
    exact = read_parquet(plan.layout.exact_duplicates, columns=["id", "dup_of", "source"])
    failed_ids = failed.column("id").combine_chunks()
    of_failed = pc.is_in(exact.column("dup_of"), value_set=failed_ids)
    ok, bad = exact.filter(pc.invert(of_failed)), exact.filter(of_failed)
    errors = failed.column("error").take(pc.index_in(bad.column("dup_of"), value_set=failed_ids)).to_pylist()
    n = ok.num_rows
    removed = pa.table(
        {"id": ok.column("id"), "dup_of": ok.column("dup_of"), "max_sim": pa.nulls(n, pa.float32()), "cluster": pa.nulls(n, pa.int32()), "reason": pa.array(["exact"] * n, pa.string())},
        schema=REMOVED_SCHEMA,
    )
    failed_copies = pa.table(
        {
            "id": bad.column("id"),
            "source": bad.column("source"),
            "error": pa.array([f"exact copy of {o}, which failed: {e}" for o, e in zip(bad.column("dup_of").to_pylist(), errors)], pa.string()),
        },
        schema=FAILED_SCHEMA,
    )
    return _ExactCopies(removed, failed_copies)


class NoUsableItems(InputError):
    """Raw input in which no item could be embedded; every item is in result/failed.parquet."""


def refuse_if_nothing_usable(plan: RunPlan, timings: dict[str, float]) -> None:
    """After the embedding stage: when no item was embedded, account every input item as
    failed (kept and removed empty, summary.json with the reason) and raise NoUsableItems."""
    layout = plan.layout
    markers = [read_json(layout.embeddings_done(s.index)) for s in plan.sources]
    if any(m["n_embedded"] for m in markers):
        return
    failed = pa.concat_tables([read_parquet(layout.embeddings_failed(s.index)).cast(FAILED_SCHEMA) for s in plan.sources])
    exact = _exact_copies(plan, failed)
    failed = pa.concat_tables([failed, exact.failed])
    n_input = sum(m["n_items"] for m in markers)
    reasons = Counter(failed.column("error").to_pylist()).most_common()
    shown = ", ".join(f"{n} {reason}" for reason, n in reasons[:3])
    if len(reasons) > 3:
        shown += f", {sum(n for _, n in reasons[3:])} for {len(reasons) - 3} other reasons"
    message = f"no usable items: {failed.num_rows} of {n_input} failed ({shown}); see {layout.failed}" if n_input else "no usable items: the input holds no items"
    write_parquet(layout.failed, failed)
    write_parquet(layout.kept, KEPT_SCHEMA.empty_table())
    write_parquet(layout.removed, exact.removed)
    summary = {
        "output": plan.config.output,
        "n_input": n_input,
        "n_embedded": 0,
        "n_kept": 0,
        "n_removed": exact.removed.num_rows,
        "n_exact": exact.removed.num_rows,
        "n_failed": failed.num_rows,
        "eps": plan.config.effective_eps,
        "target_keep": plan.config.target_keep,
        "kept_fraction": None,
        "predicted_kept_fraction": None,
        "clusters": 0,
        "buckets": 0,
        "keep": plan.config.keep,
        "device": plan.device,
        "input_format": plan.input_format,
        "embedder": plan.embedder,
        "stage_seconds": timings,
        "versions": package_versions(),
        "refused": message,
    }
    write_json(layout.summary, summary)
    raise NoUsableItems(message)


def record_written(plan: RunPlan, written: list[dict], seconds: float) -> dict:
    """Add the dataset writers' counts and time to summary.json."""
    summary = read_json(plan.layout.summary)
    summary["stage_seconds"]["write"] = seconds
    summary["written"] = {
        "dataset": plan.layout.dataset("") if plan.config.write_dataset else None,
        "removed": plan.layout.removed_dataset("") if plan.config.write_removed else None,
        "counts": {k: sum(w["counts"][k] for w in written) for k in ("kept", "removed", "failed")},
    }
    write_json(plan.layout.summary, summary)
    return summary


def render_report(plan: RunPlan, summary: dict, top: list[dict]) -> str:
    """A self-contained page: the numbers, the stages, the most similar removed pairs."""
    layout = plan.layout
    stats = read_json(layout.clustering_stats)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(summary[k]))}</td></tr>"
        for k in ("n_input", "n_kept", "n_removed", "n_exact", "n_failed", "eps", "target_keep", "kept_fraction", "predicted_kept_fraction", "clusters", "keep", "device")
    )
    stages = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.2f} s</td></tr>" for k, v in summary["stage_seconds"].items())
    pairs = "".join(
        f"<tr><td>{html.escape(str(r['id']))}</td><td>{html.escape(str(r['dup_of']))}</td><td>{r['max_sim']:.6f}</td><td>{r['cluster']}</td></tr>" for r in top
    )
    imbalance = stats["imbalance_factor"][-1] if stats["imbalance_factor"] else float("nan")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>semdedup report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>semdedup run</h1><p>{html.escape(plan.config.output)}</p>
<h2>Result</h2><table>{rows}</table>
<h2>Stages</h2><table>{stages}</table>
<h2>Clustering</h2><p>k={stats['clusters']}, sample {stats['sample_size']} points,
{stats['iterations']} iterations, final imbalance factor {imbalance:.3f}</p>
<h2>Most similar removed items</h2>
<table><tr><th>removed</th><th>duplicate of</th><th>max_sim</th><th>cluster</th></tr>{pairs}</table>
<p>Exact copies (identical content, removed before embedding) are listed in result/removed.parquet with reason "exact".</p>
</body></html>
"""
