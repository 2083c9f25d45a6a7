"""The run's report: one self-contained HTML page (inline CSS, SVG plots, data-URI thumbnails).

Built only from aggregates and small samples the stages write (summary.json, similarity.json,
fit.json, cluster_sizes.npy, tuning/curve.parquet, clustering/recall.json, result/pairs.parquet)
plus the content of the sampled pairs' items, so its memory does not grow with the run.
The pair sample is gathered by :class:`PairSampler` while finalize streams the buckets.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_core.results.items import Content, read_contents
from semdedup_core.run.layout import RunLayout
from semdedup_core.run.stage_results import FitResult, RecallEstimate, RunSummary, SimilarityHistogram, StageResult
from semdedup_core.storage import exists, filesystem, read_json, read_npy, read_parquet, write_bytes

# Removed pairs sampled per similarity band, the bands splitting (threshold, 1]; and the
# pairs nearest the threshold on each side.
PAIR_BANDS, PAIRS_PER_BAND, BORDERLINE_PAIRS = 5, 3, 4
PAIRS_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "sample" (removed, per band) | "above" | "below" the threshold
        ("band", pa.int32()),
        ("id", pa.string()),
        ("dup_of", pa.string()),  # the most similar earlier item of its cluster
        ("max_sim", pa.float32()),
        ("cluster", pa.int32()),
        ("kept", pa.bool_()),
        ("shard", pa.int32()),  # input shard of id, and of dup_of (null: not in this run)
        ("dup_shard", pa.int32()),
    ]
)
SOURCES_SHOWN = 30
REASONS_SHOWN = 20
# Reasons counted apart at most; the rest are counted as one "other reasons" row.
_MAX_REASONS = 10000
SNIPPET_WORDS = 120
THUMBNAIL_PX = 160


class ReportResult(StageResult):
    """report/report.json: what the report shows (its completion marker)."""

    path: str
    n_pairs: int
    sections: list[str]


# ---------------------------------------------------------------- sampling while finalize streams


class PairSampler:
    """Seeded, bounded samples of (item, its most similar earlier item) fed one bucket at a
    time: uniform per similarity band among removed items (bottom-k of a random key), and the
    removed items just above and the kept items just below the threshold."""

    def __init__(self, eps: float, seed: int):
        self.threshold = 1.0 - eps
        self.rng = np.random.default_rng([seed, 0x5E3D])
        self.sample = self.above = self.below = None

    def add(self, scores: pa.Table, shard: pa.ChunkedArray) -> None:
        ids = scores.column("id").combine_chunks()
        dup_at = pc.index_in(scores.column("dup_of"), value_set=ids)
        rows = pa.table(
            {
                "id": ids,
                "dup_of": scores.column("dup_of"),
                "max_sim": scores.column("max_sim"),
                "cluster": scores.column("cluster"),
                "kept": scores.column("kept"),
                "shard": shard,
                "dup_shard": shard.take(dup_at),
                "key": self.rng.random(scores.num_rows),
            }
        ).filter(pc.is_valid(scores.column("max_sim")))
        removed = rows.filter(pc.invert(rows.column("kept")))
        span = max(1.0 - self.threshold, 1e-9)
        band = np.clip(((removed.column("max_sim").to_numpy() - self.threshold) / span * PAIR_BANDS).astype(np.int32), 0, PAIR_BANDS - 1)
        removed = removed.append_column("band", pa.array(band, pa.int32()))
        self.sample = _per_band(_joined(self.sample, removed), PAIRS_PER_BAND)
        self.above = _smallest(_joined(self.above, removed), [("max_sim", "ascending"), ("key", "ascending")], BORDERLINE_PAIRS)
        kept = rows.filter(rows.column("kept"))
        kept = kept.append_column("band", pa.nulls(kept.num_rows, pa.int32()))
        self.below = _smallest(_joined(self.below, kept), [("max_sim", "descending"), ("key", "ascending")], BORDERLINE_PAIRS)

    def table(self) -> pa.Table:
        parts = []
        for kind, part in (("sample", self.sample), ("above", self.above), ("below", self.below)):
            if part is not None and part.num_rows:
                parts.append(part.append_column("kind", pa.array([kind] * part.num_rows, pa.string())).select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA))
        return pa.concat_tables(parts) if parts else PAIRS_SCHEMA.empty_table()


def _joined(held: pa.Table | None, new: pa.Table) -> pa.Table:
    # One chunk per column: filters keep (empty) chunks, so concatenating bucket after bucket
    # without combining multiplies the chunk count at every bucket.
    return new.combine_chunks() if held is None else pa.concat_tables([held, new.cast(held.schema)]).combine_chunks()


def _smallest(table: pa.Table, keys: list[tuple[str, str]], k: int) -> pa.Table:
    if table.num_rows <= k:
        return table
    return table.take(pc.select_k_unstable(table, k, sort_keys=keys))


def _per_band(table: pa.Table, k: int) -> pa.Table:
    parts = [_smallest(table.filter(pc.equal(table.column("band"), b)), [("key", "ascending")], k) for b in range(PAIR_BANDS)]
    return pa.concat_tables(parts).combine_chunks()


# ---------------------------------------------------------------- numbers for people


def count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def percent(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.1%}" if abs(x) >= 0.1 or x == 0 else f"{x:.2%}"


def similarity(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def eps_text(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


# ---------------------------------------------------------------- the page


def write_report(plan) -> ReportResult:
    """The report step of the DAG (after finalize)."""
    return render_report(plan.layout)


def render_report(layout: RunLayout) -> ReportResult:
    """(Re)render report/index.html from the run's stored artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    summary = RunSummary.model_validate(read_json(layout.summary))
    histogram = SimilarityHistogram.model_validate(read_json(layout.similarity)) if exists(layout.similarity) else None
    pairs = read_parquet(layout.pairs) if exists(layout.pairs) else None
    sampled, borderline = _pair_sections(layout, summary, pairs)
    sections = {
        "overview": ("Result", _overview(summary)),
        "eps-curve": ("Kept fraction over eps", _eps_section(layout, summary, histogram)),
        "similarity": ("Similarity to the nearest earlier item", _similarity_section(summary, histogram)),
        "pairs": ("Duplicate pairs across the similarity range", sampled),
        "borderline": ("Borderline pairs", borderline),
        "sources": ("Per source", _sources_section(summary)),
        "failures": ("Failures by reason", _failures_section(layout, summary)),
        "long-texts": ("Long texts", _long_texts_section(summary)),
        "clusters": ("Cluster sizes", _clusters_section(layout)),
        "kmeans": ("k-means", _kmeans_section(layout)),
        "recall": ("Recall of the cluster-local search (η)", _recall_section(layout)),
    }
    body = "".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>' for key, (title, content) in sections.items())
    page = _PAGE.format(style=_STYLE, output=html.escape(summary.output), body=body)
    write_bytes(layout.report, page.encode())
    return ReportResult(path=layout.report, n_pairs=pairs.num_rows if pairs is not None else 0, sections=list(sections))


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#666}.flag{color:#b00;font-weight:600}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.6em 0}
.pair h3{grid-column:1/3;margin:0;font-size:1em}.item{overflow-wrap:anywhere;font-size:.92em}
.item b{display:block;margin-bottom:.2em}mark{background:#ffe28a}.kept b{color:#176317}.removed b{color:#a11}
.item img{min-width:96px;image-rendering:pixelated}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots svg{max-width:100%;height:auto}
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>semdedup report</title><style>{style}</style></head>
<body><h1>semdedup report</h1><p class="muted">{output}</p>{body}</body></html>
"""


def _svg(fig) -> str:
    """A matplotlib figure as inline SVG (no XML prolog), closed after."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float = 6.0, height: float = 3.4):
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"
    plt.rcParams["svg.hashsalt"] = "semdedup"
    return plt.subplots(figsize=(width, height))


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _overview(s: RunSummary) -> str:
    rows = [
        ["input items", count(s.n_input)],
        ["judged (input minus failed)", count(s.n_judged)],
        ["kept", f"{count(s.n_kept)} ({percent(s.kept_fraction)} of judged)"],
        ["removed", f"{count(s.n_removed)} (of which {count(s.n_exact)} exact copies)"],
        ["failed", count(s.n_failed)],
        ["eps (threshold 1 − eps)", f"{eps_text(s.eps)} ({similarity(1 - s.eps) if s.eps is not None else 'n/a'})"],
        ["target kept fraction", percent(s.target_keep) if s.target_keep is not None else "none (eps given)"],
        ["tuning", s.tuning or "none"],
        ["clusters / buckets", f"{count(s.clusters)} / {count(s.buckets)}"],
        ["keep order", s.keep],
        ["device", s.device],
    ]
    warnings = "".join(f'<p class="flag">warning: {html.escape(w)}</p>' for w in s.warnings)
    note = "" if s.refused is None and s.note is None else f"<p>{html.escape(s.refused or s.note)}</p>"
    return warnings + note + _table(["", ""], rows, numeric_from=2)


# The eps rows of the table beside the curve (the run's own eps is added).
_EPS_TABLE = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75)


def _eps_section(layout: RunLayout, s: RunSummary, hist: SimilarityHistogram | None) -> str:
    if hist is None or s.eps is None:
        return "<p>No item was judged: no curve.</p>"
    curve = read_parquet(layout.tuning_curve) if exists(layout.tuning_curve) else None
    # The range where eps is chosen in practice (config: 0 < eps < 1), wide enough to show the
    # chosen and the sampled eps with room on the right.
    top = float(min(1.0, max(0.2, s.eps * 4, (s.sampled_eps or 0) * 2)))
    grid = np.linspace(0.0, top, 401)
    kept = hist.kept_fraction_at(grid)
    achieved = float(hist.kept_fraction_at(s.eps))
    fig, ax = _figure()
    ax.plot(grid, kept, label="whole run (stored max_sim)")
    if curve is not None and curve.num_rows:
        ax.plot(curve.column("eps").to_numpy(), curve.column("predicted_kept_fraction").to_numpy(), "--", label="tuning sample")
    ax.axvline(s.eps, color="k", lw=0.8, ls=":", label=f"chosen eps {eps_text(s.eps)}")
    ax.plot([s.eps], [achieved], "o", color="k", label=f"achieved {percent(achieved)}")
    if s.target_keep is not None:
        ax.axhline(s.target_keep, color="tab:red", lw=0.8, ls="--", label=f"target {percent(s.target_keep)}")
    if s.sampled_eps is not None and s.predicted_kept_fraction is not None:
        ax.plot([s.sampled_eps], [s.predicted_kept_fraction], "s", color="tab:orange", label=f"sampled prediction {percent(s.predicted_kept_fraction)}")
    ax.set_xlabel("eps (removed when similarity > 1 − eps)")
    ax.set_ylabel("kept fraction of judged items")
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    at = [e for e in _EPS_TABLE if e <= top]
    rows = [[eps_text(e), percent(float(hist.kept_fraction_at(e)))] for e in sorted({*at, s.eps})]
    text = (
        f"<p>Kept fraction at the chosen eps {eps_text(s.eps)}: <b>{percent(achieved)}</b>"
        + (f"; target {percent(s.target_keep)}" if s.target_keep is not None else "")
        + (f"; the tuning sample predicted {percent(s.predicted_kept_fraction)} at eps {eps_text(s.sampled_eps)}" if s.predicted_kept_fraction is not None else "")
        + ". The whole-run curve comes from every judged item's stored similarity, which does not depend on eps.</p>"
    )
    return text + f'<div class="plots">{_svg(fig)}{_table(["eps", "kept"], rows)}</div>'


def _similarity_section(s: RunSummary, hist: SimilarityHistogram | None) -> str:
    if hist is None or s.eps is None or not sum(hist.counts):
        return "<p>No item had an earlier item in its cluster.</p>"
    counts = np.asarray(hist.counts, np.int64)
    nonzero = np.flatnonzero(counts)
    lo, hi = nonzero[0], nonzero[-1] + 1
    per = max(1, (hi - lo) // 120)  # about 120 bars over the occupied range
    hi = lo + -(-(hi - lo) // per) * per
    padded = np.zeros(hi - lo, np.int64)
    padded[: min(hi, len(counts)) - lo] = counts[lo : min(hi, len(counts))]
    bars = padded.reshape(-1, per).sum(axis=1)
    edges = hist.lower + hist.width * (lo + per * np.arange(len(bars) + 1))
    fig, ax = _figure()
    ax.bar(edges[:-1], bars, width=np.diff(edges), align="edge", color="tab:blue")
    ax.axvline(1 - s.eps, color="tab:red", lw=1, label=f"threshold {similarity(1 - s.eps)}")
    ax.set_xlabel("similarity to the most similar earlier item of the cluster (max_sim)")
    ax.set_ylabel("items")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return (
        f"<p>{count(int(counts.sum()))} items had an earlier item in their cluster; {count(s.n_removed - s.n_exact)} lie above the threshold and were removed. "
        f"{count(hist.n_first)} were first in their cluster (kept at every eps), {count(hist.n_exact)} were exact copies (removed at every eps).</p>"
        + f'<div class="plots">{_svg(fig)}</div>'
    )


def _pair_sections(layout: RunLayout, s: RunSummary, pairs: pa.Table | None) -> tuple[str, str]:
    if pairs is None:
        missing = "<p>This run stored no pair sample (result/pairs.parquet).</p>"
        return missing, missing
    if not pairs.num_rows:
        empty = "<p>No pair to show (no item had an earlier item in its cluster).</p>"
        return empty, empty
    rows = pairs.to_pylist()
    # A dup_of with no shard is an earlier generation's item, held by another run.
    wanted = {item: shard for r in rows for item, shard in ((r["id"], r["shard"]), (r["dup_of"], r["dup_shard"])) if shard is not None}
    contents = read_contents(layout, wanted)
    for r in rows:
        contents.setdefault(r["dup_of"], Content(r["dup_of"], note="an item of an earlier generation of the collection"))
    threshold = 1 - s.eps
    sample = [r for r in rows if r["kind"] == "sample"]
    sample.sort(key=lambda r: -r["max_sim"])
    above = sorted((r for r in rows if r["kind"] == "above"), key=lambda r: r["max_sim"])
    below = sorted((r for r in rows if r["kind"] == "below"), key=lambda r: -r["max_sim"])
    intro = (
        f"<p>A seeded sample of removed items (right) beside the earlier item they duplicate (left), up to {PAIRS_PER_BAND} per band of "
        f"similarity between the threshold {similarity(threshold)} and 1. Differing words are highlighted.</p>"
    )
    borderline = (
        f"<p>The removed items nearest the threshold {similarity(threshold)} (just above it) and the kept items whose nearest earlier "
        "item comes closest to it (just below): where eps decides.</p><h3>Just above: removed</h3>"
        + "".join(_pair(r, contents, s.eps) for r in above)
        + "<h3>Just below: kept</h3>"
        + ("".join(_pair(r, contents, s.eps) for r in below) or "<p>No kept item had an earlier item in its cluster.</p>")
    )
    return intro + "".join(_pair(r, contents, s.eps) for r in sample), borderline


def _pair(r: dict, contents: dict[str, Content], eps: float) -> str:
    left, right = contents[r["dup_of"]], contents[r["id"]]
    decision = "kept" if r["kept"] else "removed"
    head = (
        f"<h3>similarity {similarity(r['max_sim'])} (cluster {count(r['cluster'])}; {decision}; the decision flips at eps "
        f"{eps_text(1 - r['max_sim'])})</h3>"
    )
    if left.text is not None and right.text is not None:
        a, b = _highlighted(left.text, right.text)
    else:
        a, b = _shown(left), _shown(right)
    return (
        f'<div class="pair">{head}<div class="item"><b>earlier item {html.escape(left.id)}</b>{a}</div>'
        f'<div class="item {decision}"><b>{decision}: {html.escape(right.id)}</b>{b}</div></div>'
    )


def _shown(c: Content) -> str:
    path = f'<div class="muted">{html.escape(c.path)}</div>' if c.path else ""
    if c.text is not None:
        return path + html.escape(_clip_words(c.text.split()))
    if c.image is not None:
        thumb = _thumbnail(c.image)
        return path + (f'<img alt="{html.escape(c.id)}" src="{thumb}">' if thumb else '<p class="muted">the bytes do not decode as an image</p>')
    return path + f'<p class="muted">{html.escape(c.note or "no content")}</p>'


def _clip_words(words: list[str]) -> str:
    return " ".join(words[:SNIPPET_WORDS]) + (" …" if len(words) > SNIPPET_WORDS else "")


def _highlighted(a: str, b: str) -> tuple[str, str]:
    """Both texts' first words, the words that differ between them marked."""
    wa, wb = a.split()[:SNIPPET_WORDS], b.split()[:SNIPPET_WORDS]
    out_a, out_b = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, wa, wb, autojunk=False).get_opcodes():
        pa_, pb_ = html.escape(" ".join(wa[i1:i2])), html.escape(" ".join(wb[j1:j2]))
        if op == "equal":
            out_a.append(pa_)
            out_b.append(pb_)
        else:
            if pa_:
                out_a.append(f"<mark>{pa_}</mark>")
            if pb_:
                out_b.append(f"<mark>{pb_}</mark>")
    more_a = " …" if len(a.split()) > SNIPPET_WORDS else ""
    more_b = " …" if len(b.split()) > SNIPPET_WORDS else ""
    return " ".join(out_a) + more_a, " ".join(out_b) + more_b


def _thumbnail(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - any undecodable input is shown as such
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _sources_section(s: RunSummary) -> str:
    if not s.per_source:
        return "<p>No source.</p>"
    judged = sum(r.input - r.failed for r in s.per_source)
    overall = sum(r.removed for r in s.per_source) / max(judged, 1)

    def share(r) -> float:
        return r.removed / max(r.input - r.failed, 1)

    def unusual(r) -> bool:
        # More than three binomial standard deviations and five points above the run's share.
        n = r.input - r.failed
        return n > 0 and share(r) > overall + max(0.05, 3 * np.sqrt(overall * (1 - overall) / n))

    ranked = sorted(s.per_source, key=lambda r: (-share(r), r.source))
    flagged = sum(unusual(r) for r in s.per_source)
    rows = [
        [html.escape(r.source), count(r.input), count(r.kept), count(r.removed), count(r.failed), percent(share(r)) + (' <span class="flag">unusual</span>' if unusual(r) else "")]
        for r in ranked[:SOURCES_SHOWN]
    ]
    return (
        f"<p>{count(len(s.per_source))} sources; share removed of the judged items: {percent(overall)} over the run. "
        f"{count(flagged)} sources lost an unusual share (flagged). The {count(min(len(ranked), SOURCES_SHOWN))} with the largest share removed:</p>"
        + _table(["source", "input", "kept", "removed", "failed", "share removed"], rows)
    )


def _reason(error: str) -> str:
    """A failure reason without its item-specific parts, so equal causes count together."""
    error = re.sub(r"^exact copy of .*?, which failed: ", "exact copy of a failed item: ", error)
    error = re.sub(r"\(.*\)", "(…)", error)
    return re.sub(r"\d+", "N", error)


def _failures_section(layout: RunLayout, s: RunSummary) -> str:
    if not s.n_failed:
        return "<p>No item failed.</p>"
    reasons: Counter[str] = Counter()
    fs, path = filesystem(layout.failed)
    with fs.open(path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536, columns=["error"]):
            counted = pc.value_counts(batch.column("error")).to_pylist()
            for entry in counted:
                key = _reason(entry["values"] or "no reason")
                if key in reasons or len(reasons) < _MAX_REASONS:
                    reasons[key] += entry["counts"]
                else:
                    reasons["other reasons"] += entry["counts"]
    rows = [[html.escape(reason), count(n)] for reason, n in reasons.most_common(REASONS_SHOWN)]
    rest = sum(reasons.values()) - sum(n for _, n in reasons.most_common(REASONS_SHOWN))
    if rest:
        rows.append([f"{count(len(reasons) - REASONS_SHOWN)} other reasons", count(rest)])
    return f"<p>{count(s.n_failed)} items failed (every one in result/failed.parquet with its reason).</p>" + _table(["reason", "items"], rows)


def _long_texts_section(s: RunSummary) -> str:
    if s.n_long_texts is None:
        return "<p>No text was embedded.</p>"
    how = {"chunk": "chunked (the mean of the windows' embeddings)", "truncate": "truncated to the model's limit", "fail": "failed"}.get(s.long_text or "", s.long_text or "")
    return f"<p>{count(s.n_long_texts)} texts were longer than the model's limit and were {html.escape(how)}.</p>"


def _clusters_section(layout: RunLayout) -> str:
    if not exists(layout.cluster_sizes):
        return "<p>No clustering.</p>"
    sizes = read_npy(layout.cluster_sizes).astype(np.int64)
    if not len(sizes):
        return "<p>No clustering.</p>"
    nonempty = sizes[sizes > 0]
    fig, ax = _figure()
    if len(nonempty):
        ax.hist(nonempty, bins=np.unique(np.geomspace(1, max(int(nonempty.max()), 1) + 1, 40).astype(int)), color="tab:green")
        ax.set_xscale("log")
    ax.set_xlabel("items in a cluster")
    ax.set_ylabel("clusters")
    ax.grid(alpha=0.3)
    stats = [
        ["clusters", count(len(sizes))],
        ["empty", count(int((sizes == 0).sum()))],
        ["smallest non-empty", count(int(nonempty.min())) if len(nonempty) else "n/a"],
        ["median", count(int(np.median(nonempty))) if len(nonempty) else "n/a"],
        ["largest", count(int(sizes.max()))],
        ["largest share of items", percent(float(sizes.max() / max(sizes.sum(), 1)))],
    ]
    return f'<div class="plots">{_svg(fig)}{_table(["", ""], stats)}</div>'


def _kmeans_section(layout: RunLayout) -> str:
    if not exists(layout.clustering_stats):
        return "<p>No k-means fit.</p>"
    fit = FitResult.model_validate(read_json(layout.clustering_stats))
    fig, ax = _figure()
    if fit.objective:
        ax.plot(np.arange(1, len(fit.objective) + 1), fit.objective, marker="o", ms=3, label="objective (summed similarity to the centroid)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective")
    ax.grid(alpha=0.3)
    if fit.imbalance_factor:
        twin = ax.twinx()
        twin.plot(np.arange(1, len(fit.imbalance_factor) + 1), fit.imbalance_factor, color="tab:red", ls="--", label="imbalance factor")
        twin.set_ylabel("imbalance factor")
    ax.legend(fontsize=8, loc="lower right")
    last = f"{fit.imbalance_factor[-1]:.3f}" if fit.imbalance_factor else "n/a"
    return (
        f"<p>{html.escape(fit.method)} k-means, k = {count(fit.clusters)}, on a sample of {count(fit.sample_size)} points, {count(fit.iterations)} iterations; "
        f"final imbalance factor {last} (1 is perfectly balanced).</p>"
        + f'<div class="plots">{_svg(fig)}</div>'
    )


def _recall_section(layout: RunLayout) -> str:
    if not exists(layout.recall_estimate):
        return "<p>η not estimated for this run.</p>"
    r = RecallEstimate.model_validate(read_json(layout.recall_estimate))
    if r.skipped:
        return f"<p>η not estimated: {html.escape(r.skipped)}.</p>"
    if r.eta is None:
        return f"<p>η not estimated: the search over {count(r.sample_items)} sampled items found no duplicate pair at eps {eps_text(r.eps)}.</p>"
    return (
        f"<p>η = <b>{percent(r.eta)}</b>: of the {count(r.pairs_in_nearest)} duplicate pairs (similarity above {similarity(1 - r.eps)}) that a search over the "
        f"{count(r.nearest_clusters)} nearest clusters of {count(r.sample_items)} sampled items finds, {count(r.pairs_in_cluster)} lie inside one cluster, "
        "which is all the cluster-local search can see (the paper's appendix A.2).</p>"
    )
