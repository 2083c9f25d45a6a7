"""Rethreshold a finished run: its decisions at another eps or target, nothing recomputed
(docs/architecture.md §"Rethreshold").

``max_sim`` does not depend on eps (an item is removed iff ``max_sim > float32(1 - eps)``),
so a finished run's ``scores/`` answer every threshold. A rethreshold is an ordinary run of
the DAG at a new output whose config names its source (``rethreshold_of``): its layout
reads the source's eps-independent stage artifacts (scan, exact, embeddings, clustering fit,
partitions) read-only, and it writes its own scores (the source's with a new ``kept``),
tuning, result, report and dataset. It holds its own run.json and lease, so it resumes,
is reused when finished and is refused over anything else like any run. The source is
never written. Collections are refused: a generation judged against the kept items of the
earlier ones would need every earlier generation rethresholded along its chain.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.inputs.datasets import RawShard
from semdedup_core.inputs.precomputed import Shard
from semdedup_core.run.layout import RunLayout
from semdedup_core.run.lease import check_free
from semdedup_core.run.plan import RunPlan, check_output, input_fingerprints, overlaps_output, read_run_record
from semdedup_core.run.stage_results import BucketScores, PartitionIndex, RunSummary, TuningResult
from semdedup_core.storage import StorageError, exists, read_json, read_npy, read_parquet, write_parquet

# What a rethreshold changes of its source's configuration; every other result field is the source's.
THRESHOLD_FIELDS = frozenset({"output", "eps", "target_keep", "tuning", "rethreshold_of"})


def _finished_run(source: str) -> dict:
    """The run record of the finished run of ours at ``source`` (else a ConfigError)."""
    record = read_run_record(RunLayout(source).run_json)
    if record is None:
        raise ConfigError(f"{source} holds no semdedup run (no run.json of ours); give the output folder of a finished run")
    if record["config"].get("collection"):
        raise ConfigError(
            f"{source} is a collection's generation: its items were judged against the kept items of earlier generations, "
            "which change with eps along the whole chain; rerun the collection with the new eps instead"
        )
    if record.get("refused"):
        raise ConfigError(f"{source} holds a run that was refused ({record['refused'].get('reason', '?')}); it has no scores to rethreshold")
    if not exists(RunLayout(source).summary):
        raise ConfigError(f"{source} holds a run that has not finished (no result/summary.json); finish it first (semdedup run resumes it)")
    check_free(RunLayout(source).lease)  # a run working there may be rewriting its scores
    return record


def rethreshold_config(
    source: str, to: str, eps: float | None = None, target_keep: float | None = None, write_dataset: bool = False, write_removed: bool = False
) -> RunConfig:
    """The config of a rethreshold of the finished run at ``source`` into ``to``: the source's
    result fields with the new eps or target (validated; nothing is written)."""
    if (eps is None) == (target_keep is None):
        raise ConfigError("give exactly one of --eps or --target-keep")
    record = _finished_run(source)
    origin = record["config"].get("rethreshold_of")
    if origin is not None:  # a rethreshold of a rethreshold: the stage artifacts are the origin's
        _finished_run(origin)
    fields = dict(record["config"])
    fields.update(
        output=to,
        eps=eps,
        target_keep=target_keep,
        # A new target keeps the source's tuning mode; an eps has nothing to tune.
        tuning=fields.get("tuning", "exact") if target_keep is not None and record["config"].get("target_keep") is not None else "exact",
        rethreshold_of=origin or source,
        write_dataset=write_dataset or None,
        write_removed=write_removed or None,
    )
    return RunConfig.load(None, **fields)


def plan_rethreshold(cfg: RunConfig) -> RunPlan:
    """Every check before work (nothing written): the source is a finished run with this
    configuration, the output overlaps neither it nor the inputs and holds nothing else, the
    inputs are unchanged when the dataset is to be written back."""
    source = cfg.rethreshold_of
    record = _finished_run(source)
    ours = {k: v for k, v in cfg.result_fields().items() if k not in THRESHOLD_FIELDS}
    theirs = {k: v for k, v in record["config"].items() if k not in THRESHOLD_FIELDS}
    if ours != theirs:
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ConfigError(f"{source} now holds a run with another configuration ({', '.join(differing)}) than {cfg.output} was derived from; choose another --to")
    if record["config"].get("reference"):
        raise ConfigError(f"{source} was decontaminated against reference sets (--reference); rethresholding such a run is not supported yet: run it again with the new threshold")
    if overlaps_output(source, cfg.output):  # the source exists: compared as a folder, not a pattern
        raise ConfigError(f"--to {cfg.output} overlaps the source run {source} (it is, holds or lies inside it); choose a folder outside it")
    check_output(cfg)
    previous = read_run_record(RunLayout(cfg.output).run_json)
    if previous is not None and previous.get("config") != cfg.result_fields():
        old, new = previous.get("config", {}), cfg.result_fields()
        differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f"--to {cfg.output} holds another run ({', '.join(differing)} differ); choose another --to")
    check_free(RunLayout(cfg.output).lease)
    sources = [RawShard.model_validate(s) for s in record["sources"]]
    shards = [Shard.model_validate(s) for s in record["shards"]]
    recorded = record.get("fingerprints") or {}
    if cfg.write_dataset or cfg.write_removed:
        if record["input_format"] == "clip-retrieval":
            raise ConfigError("writing the dataset back is not supported for clip-retrieval inputs (they hold no items, only embeddings)")
        try:
            now = input_fingerprints(sources, shards)
        except (FileNotFoundError, StorageError) as exc:
            raise ConfigError(f"cannot write the dataset back: an input of {source} cannot be read now ({exc})") from None
        changed = sorted(k for k, v in recorded.items() if now.get(k) != v)
        if changed:
            raise ConfigError(f"cannot write the dataset back: input {changed[0]} changed since the run at {source} read it")
    return RunPlan(
        config=cfg,
        input_format=record["input_format"],
        shards=shards,
        sources=sources,
        embedder=record.get("embedder"),
        fingerprints=recorded,
        n_input=record["n_input"],
        dim=record["dim"],
        clusters=record["clusters"],
        buckets=record["buckets"],
        device=(record.get("execution") or {}).get("device", "cpu"),
    )


def finished_rethreshold(cfg: RunConfig) -> RunSummary | None:
    """The stored summary when ``cfg.output`` holds this rethreshold, finished, with
    everything asked for written; None when there is work to do."""
    layout = RunLayout(cfg.output)
    previous = read_run_record(layout.run_json)
    if previous is None or previous.get("config") != cfg.result_fields() or not exists(layout.summary):
        return None
    summary = RunSummary.model_validate(read_json(layout.summary))
    written = summary.written
    if (cfg.write_dataset and not (written and written.dataset)) or (cfg.write_removed and not (written and written.removed)):
        return None
    check_free(layout.lease)
    return summary


# ---------------------------------------------------------------- the DAG's units


def rescore_bucket(plan: RunPlan, bucket: int, eps: float | None) -> BucketScores:
    """scores/bucket-N.parquet: the source's scores with ``kept`` at ``eps`` (left null when
    eps is known only after every bucket, as the dedup stage does)."""
    from semdedup_core.dedup.kernel import removed_mask
    from semdedup_core.dedup.scoring import SCORES_SCHEMA

    scores = read_parquet(RunLayout(plan.config.rethreshold_of).scores(bucket)).cast(SCORES_SCHEMA)
    max_sim = scores.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32)  # null (first of its cluster) -> NaN: kept
    removed = removed_mask(max_sim, eps) if eps is not None else None
    kept = pa.array(~removed) if removed is not None else pa.nulls(len(max_sim), pa.bool_())
    write_parquet(plan.layout.scores(bucket), scores.set_column(scores.schema.get_field_index("kept"), SCORES_SCHEMA.field("kept"), kept))
    clusters = pc.count_distinct(scores.column("cluster")).as_py()
    return BucketScores(bucket=bucket, n_scored=scores.num_rows, clusters=clusters, eps=eps, n_removed=int(removed.sum()) if removed is not None else None)


def predict_from_scores(plan: RunPlan) -> TuningResult:
    """The tuning sample's prediction (the same seeded clusters as the tune stage) from the
    source's stored max_sim, which equal what scoring the sample again would give."""
    from semdedup_core.dedup.tuning import sample_clusters, sampled_prediction

    layout, cfg = plan.layout, plan.config
    chosen = sample_clusters(read_npy(layout.cluster_sizes), cfg.tuning_cluster_fraction, cfg.seed, cfg.tuning_min_items)
    bucket_of = read_npy(layout.bucket_of_cluster)
    source = RunLayout(cfg.rethreshold_of)
    wanted = pa.array(chosen.astype(np.int32))
    sims = []
    for bucket in np.unique(bucket_of[chosen]):
        scores = read_parquet(source.scores(int(bucket)), columns=["cluster", "max_sim"])
        scores = scores.filter(pc.is_in(scores.column("cluster"), value_set=wanted))
        sims.append(scores.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32))
    max_sim = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    return sampled_prediction(plan, PartitionIndex.model_validate(read_json(layout.partition_index)), len(chosen), max_sim)
