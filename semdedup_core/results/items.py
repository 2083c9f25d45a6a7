"""Items of a finished run by id: where the run holds them, what it decided, what they contain.

Every lookup streams the run's files in record batches filtered by id, so memory stays
bounded by a batch (and, for ``explain``, by one cluster), whatever the size of the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_core.inputs.datasets import RawShard, read_payloads
from semdedup_core.run.layout import RunLayout
from semdedup_core.run.stage_results import RunSummary
from semdedup_core.storage import exists, filesystem, read_json

_BATCH_ROWS = 65536


class NotAFinishedRun(ValueError):
    """The output holds no finished semdedup run (no result/summary.json)."""


class UnknownItem(ValueError):
    """No item of the run has this id."""


def finished_summary(layout: RunLayout) -> RunSummary:
    if not exists(layout.summary):
        raise NotAFinishedRun(f"{layout.root} holds no finished semdedup run (no result/summary.json)")
    return RunSummary.model_validate(read_json(layout.summary))


def stream_rows(url: str, columns: list[str], ids: Iterable[str], key: str = "id") -> Iterator[pa.Table]:
    """The rows of a parquet file whose ``key`` is one of ``ids``, a batch at a time."""
    wanted = pa.array(sorted(set(ids)), pa.string())
    if not len(wanted) or not exists(url):
        return
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        # The key column of one row group at a time; the other columns only where it matches.
        for group in range(pf.num_row_groups):
            hit = pc.is_in(pf.read_row_group(group, columns=[key], use_threads=False).column(0), value_set=wanted)
            if pc.any(hit).as_py():
                rows = pf.read_row_group(group, columns=list(dict.fromkeys([key, *columns])), use_threads=False)
                yield rows.filter(hit)


def _first_row(url: str, columns: list[str], item_id: str) -> dict | None:
    for part in stream_rows(url, columns, [item_id]):
        return part.slice(0, 1).to_pylist()[0]
    return None


@dataclass
class Content:
    """What an item holds, as far as the run can show it."""

    id: str
    text: str | None = None
    image: bytes | None = None
    path: str | None = None  # where the item lives in the input
    note: str | None = None  # why there is nothing to show


def run_sources(layout: RunLayout) -> list[RawShard]:
    """The raw input shards (run.json); empty for a run on precomputed embeddings."""
    return [RawShard.model_validate(s) for s in read_json(layout.run_json).get("sources", [])]


def read_contents(layout: RunLayout, wanted: dict[str, int | None]) -> dict[str, Content]:
    """Content of the items ``wanted`` (id -> the input shard holding it, None: search every
    shard), read from the scan files and, for images, only those items' bytes."""
    sources = run_sources(layout)
    if not sources:
        note = "precomputed embeddings: the run holds only ids, no content"
        return {i: Content(i, note=note) for i in wanted}
    found: dict[str, Content] = {}
    by_shard: dict[int | None, list[str]] = {}
    for item_id, shard in wanted.items():
        by_shard.setdefault(shard, []).append(item_id)
    unknown = by_shard.pop(None, [])
    for source in sources:
        ids = by_shard.get(source.index, []) + [i for i in unknown if i not in found]
        for part in stream_rows(layout.scan(source.index), ["row", "source", "text", "offset", "size"], ids):
            found.update(_contents(source, part))
    return {i: found.get(i, Content(i, note="not found in this run's input scan (an earlier generation's item?)")) for i in wanted}


def _contents(source: RawShard, part: pa.Table) -> dict[str, Content]:
    rows = part.to_pylist()
    if source.modality == "text":
        return {r["id"]: Content(r["id"], text=r["text"], path=r["source"]) for r in rows}
    payloads = read_payloads(
        source,
        np.array([r["row"] for r in rows], np.int64),
        np.array([r["offset"] if r["offset"] is not None else -1 for r in rows], np.int64),
        np.array([r["size"] if r["size"] is not None else -1 for r in rows], np.int64),
        [r["source"] for r in rows],
    )
    by_row = {row: (data, error) for row, data, error in payloads}
    out = {}
    for r in rows:
        data, error = by_row.get(r["row"], (None, "not read"))
        out[r["id"]] = Content(r["id"], image=data, path=r["source"], note=error)
    return out


@dataclass
class ScoreRow:
    bucket: int
    cluster: int
    centroid_sim: float
    max_sim: float | None
    dup_of: str | None
    kept: bool


@dataclass
class Explanation:
    """Why an item of a finished run was kept, removed or failed."""

    id: str
    decision: str  # kept | removed | failed
    reason: str  # one sentence
    eps: float | None
    score: ScoreRow | None = None
    representative: str | None = None  # the cluster's item nearest its centroid
    chain: list[tuple[str, float | None]] = field(default_factory=list)  # dup_of hops: (id, its max_sim)
    kept_id: str | None = None  # where the chain ends
    flip_eps: float | None = None
    flip: str | None = None  # the decision at eps beyond flip_eps, in words
    contents: dict[str, Content] = field(default_factory=dict)


SCORE_COLUMNS = ["id", "cluster", "centroid_sim", "max_sim", "dup_of", "kept"]


def find_score(layout: RunLayout, summary: RunSummary, item_id: str) -> ScoreRow | None:
    """The item's row in scores/bucket-N.parquet, searching bucket by bucket."""
    for bucket in range(summary.buckets):
        row = _first_row(layout.scores(bucket), SCORE_COLUMNS, item_id)
        if row is not None:
            return ScoreRow(bucket, row["cluster"], row["centroid_sim"], row["max_sim"], row["dup_of"], row["kept"])
    return None


def _cluster_scores(layout: RunLayout, score: ScoreRow) -> pa.Table:
    """Every scored item of the item's cluster (bounded by the cluster, read in batches)."""
    url = layout.scores(score.bucket)
    fs, path = filesystem(url)
    parts = []
    with fs.open(path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=_BATCH_ROWS, columns=SCORE_COLUMNS):
            parts.append(pa.Table.from_batches([batch.filter(pc.equal(batch.column("cluster"), score.cluster))]))
    return pa.concat_tables(parts)


def explain(layout: RunLayout, item_id: str) -> Explanation:
    """Why ``item_id`` was kept, removed or failed, with the contents to compare."""
    summary = finished_summary(layout)
    eps = summary.eps
    failed = _first_row(layout.failed, ["error", "source"], item_id)
    if failed is not None:
        return Explanation(item_id, "failed", failed["error"], eps, contents=read_contents(layout, {item_id: None}))
    removed = _first_row(layout.removed, ["dup_of", "max_sim", "reason", "kept_id"], item_id)
    if removed is not None and removed["reason"] == "exact":
        ex = Explanation(
            item_id, "removed", "identical content to an earlier item, removed before embedding (at every eps)", eps,
            chain=[(removed["dup_of"], None)], kept_id=removed["kept_id"],
        )
        ex.contents = read_contents(layout, dict.fromkeys([item_id, removed["dup_of"], removed["kept_id"]]))
        return ex
    score = find_score(layout, summary, item_id)
    if score is None:
        raise UnknownItem(f"no item with id {item_id!r} in {layout.root}")
    cluster = _cluster_scores(layout, score)
    representative = cluster.column("id")[pc.index(cluster.column("centroid_sim"), pc.max(cluster.column("centroid_sim"))).as_py()].as_py()
    ex = Explanation(item_id, "kept" if score.kept else "removed", "", eps, score=score, representative=representative)
    threshold = 1.0 - eps if eps is not None else None
    if score.max_sim is None:
        ex.reason = "no earlier item in its cluster: kept at every eps"
    elif score.kept:
        ex.reason = f"its most similar earlier item {score.dup_of!r} has similarity {score.max_sim:.6f}, not above the threshold {threshold:.6f}"
        ex.flip_eps, ex.flip = 1.0 - score.max_sim, "removed"
    else:
        ex.reason = f"similarity {score.max_sim:.6f} to the earlier item {score.dup_of!r} is above the threshold {threshold:.6f}"
        ex.flip_eps, ex.flip = 1.0 - score.max_sim, "kept"
        ex.chain, ex.kept_id = _chain(cluster, score)
    shown = [item_id, score.dup_of, ex.kept_id, representative]
    ex.contents = read_contents(layout, dict.fromkeys(i for i in shown if i is not None))
    return ex


def _chain(cluster: pa.Table, score: ScoreRow) -> tuple[list[tuple[str, float | None]], str | None]:
    """dup_of followed from a removed item to the kept item its group resolves to (inside the
    cluster; None when it leaves the cluster for an earlier generation's item)."""
    rows = {r["id"]: r for r in cluster.to_pylist()}
    chain, current, seen = [], score.dup_of, set()
    while current is not None and current not in seen:
        seen.add(current)
        row = rows.get(current)
        chain.append((current, row["max_sim"] if row else None))
        if row is None:  # an earlier generation's item: kept there
            return chain, current
        if row["kept"]:
            return chain, current
        current = row["dup_of"]
    raise RuntimeError(f"the dup_of chain of {score.dup_of!r} does not end at a kept item")
