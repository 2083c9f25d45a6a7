"""Reference sets: remove the run's items that duplicate an item of another dataset (test-set
decontamination, "only dedup B against A"); docs/architecture.md §"Reference sets".

Each reference set gets a plan of its own, rooted at ``reference/r-NNNNN`` in the run folder:
raw data is scanned and embedded there with the run's model by the run's own steps; an
earlier run or collection of ours lends its stored embeddings instead; precomputed
embeddings are read where they are. After the run's fit, every reference item is assigned
to the run's centroids (a reference never moves them) and partitioned by the run's bucket
plan. Then, per bucket, each run item gets its most similar reference item of its cluster
(``reference/bucket-N.parquet``, eps-independent), and finalize removes with reason
``reference`` every item whose similarity exceeds 1 - eps.

Rule (what the tests check against brute force): an item is removed as ``reference`` iff
max over the reference items of its cluster of sim > float32(1 - eps), sim being the dot
product summed in float64 and rounded once to float32. Otherwise the usual in-run rule
decides. In-run judging does not look at the reference: items removed by the reference
still count as earlier items for the items after them, as removed items always do in
SemDeDup, so the in-run decisions are those of the same run without a reference.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core.config import ConfigError
from semdedup_core.dedup.kernel import removed_mask
from semdedup_core.dedup.partitions import load_bucket
from semdedup_core.dedup.scoring import order_function
from semdedup_core.inputs.precomputed import InputError, Shard
from semdedup_core.run.layout import RunLayout
from semdedup_core.run.plan import PlanRef, RunPlan, input_fingerprints, load_plan, overlaps_output, plan_inputs, read_run_record
from semdedup_core.run.stage_results import PartitionIndex, StageResult
from semdedup_core.storage import exists, join, read_json, read_parquet, write_parquet

REFERENCE_SCORES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("ref_max_sim", pa.float32()),  # null: no reference item in the item's cluster
        ("ref_dup_of", pa.string()),  # the most similar reference item (earliest on ties)
        ("reference", pa.int32()),  # which reference set it is in (index in config.reference)
    ]
)
REASON = "reference"


class ReferenceScores(StageResult):
    bucket: int
    n_scored: int
    n_reference_items: int  # reference items in the bucket's clusters


# ---------------------------------------------------------------- plan


def with_references(plan: RunPlan) -> RunPlan:
    """The run's plan with a plan per reference URL, every check done before anything is
    written: the URL exists and is readable, does not overlap the output, and its embeddings
    are comparable with the run's (same model for raw data and earlier runs, same dimension
    otherwise). The references' objects join the run's fingerprints, so a resume over a
    reference rewritten since is refused as one over a rewritten input is."""
    references = _plan_references(plan)
    for url, sub in zip(plan.config.reference, references):
        shared = sorted(set(plan.fingerprints) & set(sub.fingerprints))
        if shared:  # every item would be removed as a duplicate of itself
            raise ConfigError(f"--reference {url} holds {shared[0]}, an input of this run; a reference set must be other data than the input")
    seen = {f"reference {key}": value for sub in references for key, value in sub.fingerprints.items()}
    return plan.model_copy(update={"references": references, "fingerprints": plan.fingerprints | seen})


def _plan_references(plan: RunPlan) -> list[RunPlan]:
    cfg = plan.config
    plans = []
    for index, url in enumerate(cfg.reference):
        if overlaps_output(url, cfg.output):
            raise ConfigError(f"--reference {url} overlaps --output {cfg.output} (it is, holds, or lies inside the output); choose a reference outside the output")
        sub_cfg = cfg.model_copy(
            update={
                "input": [url],
                "output": plan.layout.reference_run(index),
                "reference": [],
                "clusters": None,  # the run's k and buckets apply (see placed); never refused for the reference's size
                "buckets": None,
                "keep": "hard",  # the order of reference items only breaks ties between them
                "metadata_columns": [],
                "write_dataset": False,
                "write_removed": False,
            }
        )
        runs = _earlier_runs(url)
        try:
            sub = _plan_from_runs(sub_cfg, url, runs, plan) if runs else _plan_data(sub_cfg, plan)
        except (ConfigError, InputError) as exc:
            message = str(exc) if str(exc).startswith("--reference") else f"--reference {url}: {exc}"
            raise type(exc)(message) from None
        plans.append(sub)
    return plans


def _earlier_runs(url: str) -> list[dict]:
    """The run.json records of the earlier run or collection of ours at ``url`` (a
    collection: the generations since its latest base), else []."""
    from semdedup_core.run.collection import collection_json, read_collection

    if exists(collection_json(url)):
        collection = read_collection(url)
        runs = [join(url, g.run) for g in collection.generations[collection.base :]] if collection and collection.generations else []
    elif exists(join(url, "run.json")):
        runs = [url]
    else:
        return []
    records = []
    for run in runs:
        record = read_run_record(RunLayout(run).run_json)
        if record is None or not exists(RunLayout(run).summary):
            raise ConfigError(f"--reference {url}: {run} is not a finished semdedup run; finish it or give its input instead")
        if not record.get("refused"):
            records.append(record | {"url": run})
    if not records:
        raise ConfigError(f"--reference {url}: no run there judged any item")
    return records


def _same_model(ours: dict, theirs: dict | None) -> bool:
    keys = ("modality", "model", "pretrained")
    return theirs is not None and all(ours.get(k) == theirs.get(k) for k in keys)


def _describe_model(embedder: dict | None) -> str:
    if embedder is None:
        return "precomputed embeddings"
    return " ".join(str(embedder[k]) for k in ("model", "pretrained") if embedder.get(k))


def _plan_from_runs(sub_cfg, url: str, records: list[dict], plan: RunPlan) -> RunPlan:
    """An earlier run or collection as a reference: its stored embeddings, never recomputed."""
    for record in records:
        if plan.embeds and not _same_model(plan.embedder, record.get("embedder")):
            raise ConfigError(
                f"--reference {url}: {record['url']} holds embeddings of {_describe_model(record.get('embedder'))}, "
                f"but this run embeds with {_describe_model(plan.embedder)}; give the reference's raw data, or a run made with this model"
            )
        if not plan.embeds and record.get("dim") != plan.dim:
            raise ConfigError(f"--reference {url}: {record['url']} holds {record.get('dim')}-d embeddings but the input has {plan.dim}-d")
    shards = [Shard.model_validate(s) for record in records for s in record["shards"]]
    shards = [s.model_copy(update={"index": i}) for i, s in enumerate(shards)]
    dim = plan.dim or records[0]["dim"]
    sub = RunPlan(
        config=sub_cfg, input_format="embeddings", shards=shards, n_input=sum(s.n_rows for s in shards), dim=dim, clusters=0, buckets=0, device=plan.device
    )
    return sub.model_copy(update={"fingerprints": input_fingerprints([], shards)})


def _plan_data(sub_cfg, plan: RunPlan) -> RunPlan:
    """Raw data (embedded by the run's steps with the run's model) or precomputed embeddings,
    read with the run's format options."""
    from semdedup_core.inputs.datasets import RAW_FORMATS, detect_format

    raw_data = detect_format(sub_cfg) in RAW_FORMATS
    if raw_data and not plan.embeds:  # the run has no model to embed raw reference data with
        raise ConfigError("holds raw data, but the run's input is precomputed embeddings: give the reference's embeddings, made with the input's model")
    sub = plan_inputs(sub_cfg if raw_data else sub_cfg.model_copy(update={"model": None, "pretrained": None}))
    if sub.embeds:
        if not _same_model(plan.embedder, sub.embedder):
            raise ConfigError(f"holds {sub.embedder['modality']} data but the run embeds {plan.embedder['modality']}")
        return sub
    if plan.embeds:
        from semdedup_core.embedding.models import load_embedder

        dim = load_embedder(plan.config, plan.embedder["modality"], plan.device).dim
        if sub.dim != dim:
            raise ConfigError(f"holds {sub.dim}-d embeddings but the run's model {_describe_model(plan.embedder)} makes {dim}-d ones")
    elif sub.dim != plan.dim:
        raise ConfigError(f"holds {sub.dim}-d embeddings but the input has {plan.dim}-d")
    return sub


def placed(sub: RunPlan, plan: RunPlan, run: PlanRef) -> RunPlan:
    """The reference's plan for the assignment, once the run is fitted: its embeddings as
    shards, the run's k and bucket plan, and the run as its 'earlier' plan, whose centroids
    its fit step copies (as a collection generation's does its base's)."""
    if sub.embeds:
        markers = [read_json(sub.layout.embeddings_done(s.index)) for s in sub.sources]
        shards = [
            Shard(index=s.index, kind="parquet", url=sub.layout.embeddings(s.index), n_rows=m["n_embedded"], dim=plan.dim, id_column="id", embedding_column="embedding")
            for s, m in zip(sub.sources, markers)
        ]
        sub = sub.model_copy(update={"shards": shards, "n_input": sum(m["n_items"] for m in markers)})
    return sub.model_copy(update={"dim": plan.dim, "clusters": plan.clusters, "buckets": plan.buckets, "earlier": [run], "device": plan.device})


# ---------------------------------------------------------------- score


def score_against_references(plan: RunPlan, bucket: int, entries: list, references: list[PlanRef]) -> ReferenceScores:
    """reference/bucket-N.parquet: for every item of the bucket (in the scores' row order),
    its most similar reference item of its cluster over all reference sets."""
    data = load_bucket(plan, entries, order_function(plan))
    n = len(data.cluster)
    best = np.full(n, -np.inf, np.float32)
    best_ref = np.full(n, -1, np.int32)
    best_row = np.full(n, -1, np.int64)
    id_parts: list[pa.Array] = []
    offset = n_keys = 0
    stops = np.r_[data.starts[1:], n]
    for r, ref in enumerate(references):
        sub = load_plan(ref)
        index = PartitionIndex.model_validate(read_json(sub.layout.partition_index))
        keys = load_bucket(sub, index.buckets[bucket], order_function(sub), only_clusters=data.clusters)
        n_keys += len(keys.cluster)
        id_parts.append(keys.ids)
        key_stops = np.r_[keys.starts[1:], len(keys.cluster)]
        key_span = {int(c): (lo, hi) for c, lo, hi in zip(keys.clusters, keys.starts, key_stops)}
        for cluster, lo, hi in zip(data.clusters, data.starts, stops):
            if int(cluster) not in key_span:
                continue
            k0, k1 = key_span[int(cluster)]
            sims, rows = max_similarity(data.vectors[lo:hi], keys.vectors[k0:k1], plan.config.tile_size)
            better = sims > best[lo:hi]  # strict: on ties the earlier reference set wins
            best[lo:hi][better] = sims[better]
            best_ref[lo:hi][better] = r
            best_row[lo:hi][better] = offset + k0 + rows[better]
        offset += len(keys.cluster)
    found = best_ref >= 0
    key_ids = pa.concat_arrays(id_parts) if id_parts else pa.array([], pa.string())
    dup_of = key_ids.take(pa.array(np.where(found, best_row, 0))) if len(key_ids) else pa.nulls(n, pa.string())
    table = pa.table(
        {
            "id": data.ids,
            "ref_max_sim": pa.array(best, mask=~found),
            "ref_dup_of": pc.if_else(pa.array(found), dup_of, pa.scalar(None, pa.string())),
            "reference": pa.array(best_ref, mask=~found),
        },
        schema=REFERENCE_SCORES_SCHEMA,
    )
    write_parquet(plan.layout.reference_scores(bucket), table)
    return ReferenceScores(bucket=bucket, n_scored=n, n_reference_items=n_keys)


def max_similarity(queries: np.ndarray, keys: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the largest dot product with a key row (float64 sums rounded once
    to float32, as the kernel's canonical values) and the earliest key row reaching it."""
    best = np.full(len(queries), -np.inf, np.float32)
    rows = np.full(len(queries), -1, np.int64)
    for k0 in range(0, len(keys), tile):
        block = keys[k0 : k0 + tile].astype(np.float64)
        for q0 in range(0, len(queries), tile):
            sims = (queries[q0 : q0 + tile].astype(np.float64) @ block.T).astype(np.float32)
            at = sims.argmax(axis=1)  # first maximum: the earliest key
            values = sims[np.arange(len(at)), at]
            better = values > best[q0 : q0 + tile]  # strict: earlier key tiles win ties
            best[q0 : q0 + tile][better] = values[better]
            rows[q0 : q0 + tile][better] = k0 + at[better]
    return best, rows


# ---------------------------------------------------------------- finalize


def decontaminate(plan: RunPlan, bucket: int, scores: pa.Table, kept_id: pa.Array, eps: float) -> tuple[pa.Table, pa.Array, pa.Array]:
    """A bucket's scores with the reference's decisions: an item whose ref_max_sim exceeds
    1 - eps is removed with reason 'reference' (dup_of: the reference item, max_sim: its
    similarity, no kept_id); an item removed in-run whose group resolves to such an item has
    no kept item either (kept_id null). Returns (scores, kept_id, reason)."""
    found = read_parquet(plan.layout.reference_scores(bucket))
    if not found.column("id").combine_chunks().equals(scores.column("id").combine_chunks()):
        raise RuntimeError(f"{plan.layout.reference_scores(bucket)} does not match the bucket's scores; rerun with --fresh")
    ref_sim = found.column("ref_max_sim").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN: not removed
    by_reference = removed_mask(ref_sim, eps)
    mask = pa.array(by_reference)
    ids = scores.column("id").combine_chunks()
    gone_groups = pc.is_in(kept_id, value_set=ids.filter(mask))
    kept_id = pc.if_else(pc.or_(mask, gone_groups), pa.scalar(None, pa.string()), kept_id)
    scores = scores.set_column(scores.schema.get_field_index("kept"), "kept", pc.and_(scores.column("kept"), pc.invert(mask)))
    scores = scores.set_column(scores.schema.get_field_index("dup_of"), "dup_of", pc.if_else(mask, found.column("ref_dup_of"), scores.column("dup_of")))
    scores = scores.set_column(
        scores.schema.get_field_index("max_sim"), "max_sim", pc.if_else(mask, found.column("ref_max_sim"), scores.column("max_sim"))
    )
    reason = pc.if_else(mask, pa.scalar(REASON), pa.scalar("semantic"))
    return scores, kept_id, reason


def exact_copies_of_removed(exact_removed: pa.Table, targets: pa.Table) -> pa.Table:
    """Exact copies (removed before embedding) of an item the reference removed are removed
    for the same reference item: reason 'reference', its dup_of and max_sim. ``targets``:
    (id, reason, dup_of, max_sim) of the items exact copies point to."""
    at = pc.index_in(exact_removed.column("dup_of"), value_set=targets.column("id").combine_chunks())
    hit = pc.fill_null(pc.equal(targets.column("reason").take(at), REASON), False)
    for name in ("dup_of", "max_sim", "reason"):
        index = exact_removed.schema.get_field_index(name)
        value = targets.column(name).take(at).cast(exact_removed.schema.field(name).type)
        exact_removed = exact_removed.set_column(index, name, pc.if_else(hit, value, exact_removed.column(name)))
    return exact_removed
