"""Curated collections: a base run, then generations that judge only new input objects
(docs/architecture.md §"Collections").

A collection is a folder holding ``collection.json`` (what has been committed) and one run
folder per generation under ``generations/``. The first run is the base: a full run whose
centroids every later generation reuses. A later run lists the inputs, takes only the
objects no committed generation processed (by URL and fingerprint), and runs the usual DAG
over them into the next generation folder, with two differences: the fit reuses the base's
centroids and bucket plan, and each cluster's earlier items (kept ones, or all with
``against='all'``) come first in its order, so new items are judged against them and
against the new items before them, while earlier items are never judged again. The
generation becomes part of the collection only when ``collection.json`` is rewritten, last
and atomically: a run killed before that leaves the previous state intact, and its re-run
resumes the same generation folder.
"""

from __future__ import annotations

import datetime as _dt
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.plan import (
    PlanRef,
    RunPlan,
    check_existing_run,
    check_output,
    load_plan,
    plan_inputs,
    store_plan,
)
from semdedup_core.inputs.precomputed import InputError, read_ids
from semdedup_core.run.layout import RunLayout
from semdedup_core.run.stage_results import RunSummary
from semdedup_core.storage import exists, join, read_json, read_npy, read_parquet, write_json

COLLECTION_FORMAT_VERSION = 1
# A refit is recommended once the collection has grown this much since its base was fitted,
# or once new items sit this much further from their centroids than the base's items did.
REFIT_GROWTH = 2.0
REFIT_CENTROID_SIM_DROP = 0.05


class NothingNew(Exception):
    """Every input object was processed by an earlier generation: nothing to do."""


class Drift(BaseModel):
    """How far the collection has moved from its base's clustering."""

    items_since_base: int  # assigned items in the base and every generation since
    growth: float  # items_since_base / the base's assigned items
    base_mean_centroid_sim: float | None
    new_mean_centroid_sim: float | None  # this generation's items
    largest_cluster: int
    imbalance: float  # k * sum(size^2) / n^2 over the cumulative cluster sizes (1 = balanced)
    refit_recommended: bool
    reason: str | None = None


class Generation(BaseModel):
    index: int
    kind: str  # "base" or "generation"
    run: str  # the run folder, relative to the collection
    plan: str  # digest of the run's final plan (plans/<digest>.json in the run folder)
    inputs: dict[str, str]  # input object -> its fingerprint when processed
    n_input: int
    n_kept: int
    n_removed: int
    n_failed: int
    eps: float
    against: str | None
    committed: str
    drift: Drift


class Collection(BaseModel):
    format_version: int = COLLECTION_FORMAT_VERSION
    generations: list[Generation] = []

    @property
    def base(self) -> int:
        """Index of the latest base."""
        return max(g.index for g in self.generations if g.kind == "base")

    def processed(self) -> dict[str, str]:
        """Every input object a committed generation processed, with its fingerprint then."""
        out: dict[str, str] = {}
        for g in self.generations:
            out.update(g.inputs)
        return out


def collection_json(root: str) -> str:
    return join(root, "collection.json")


def generation_url(root: str, index: int) -> str:
    return join(root, "generations", f"g-{index:05d}")


def read_collection(root: str) -> Collection | None:
    url = collection_json(root)
    if not exists(url):
        return None
    try:
        return Collection.model_validate(read_json(url))
    except ValueError:
        raise ConfigError(f"{url} is not a semdedup collection record; use another output") from None


def plan_generation(cfg: RunConfig) -> RunPlan:
    """The plan of the collection's next generation (or of the one a killed run left
    unfinished): a base when the collection is new or ``refit`` asks for one, else a run
    over the input objects not processed yet. Raises NothingNew when there are none."""
    root = cfg.output
    check_output(cfg)
    collection = read_collection(root)
    index = len(collection.generations) if collection else 0
    base = collection is None or cfg.refit
    if base:
        gen_cfg = cfg.model_copy(update={"output": generation_url(root, index)})
        return check_existing_run(plan_inputs(gen_cfg))
    base_record = collection.generations[collection.base]
    base_plan = load_plan(PlanRef(output=join(root, base_record.run), digest=base_record.plan, storage_block=cfg.storage_block))
    _check_same_recipe(cfg, base_plan.config, root)
    gen_cfg = cfg.model_copy(
        update={
            "output": generation_url(root, index),
            "eps": base_record.eps,  # generations apply the base's threshold
            "format": base_plan.input_format,  # known: no processed object is opened to tell it again
            "target_keep": None,
            "tuning": "exact",
            "clusters": base_plan.clusters,
            "buckets": base_plan.buckets,
        }
    )
    processed = collection.processed()

    def new_objects(found: dict[str, str]) -> list[str]:
        """The listed objects no generation processed; refuses changed ones (unless skipped)."""
        changed = sorted(key for key, now in found.items() if key in processed and processed[key] != now)
        if changed and cfg.changed_inputs == "refuse":
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise ConfigError(
                f"input {changed[0]}{more} changed since generation of the collection {root} processed it; its items there stay as they were "
                "decided: use --changed-inputs skip to leave it out, or --refit to start a new base over the whole input"
            )
        new = [key for key in found if key not in processed]
        if not new:
            raise NothingNew(f"nothing new: all {len(found)} input objects were processed by generations 0..{index - 1} of {root}")
        return new

    plan = plan_inputs(gen_cfg, select=new_objects)  # processed objects are listed, never opened
    _check_ids_unseen(plan, collection, root)
    earlier = [
        PlanRef(output=join(root, g.run), digest=g.plan, storage_block=cfg.storage_block)
        for g in collection.generations[collection.base :]
        if g.n_failed < g.n_input  # a generation whose every item failed has nothing to judge against
    ]
    plan = plan.model_copy(update={"earlier": earlier, "clusters": base_plan.clusters, "buckets": base_plan.buckets, "dim": base_plan.dim})
    if plan.dim and plan.shards and plan.shards[0].dim and plan.shards[0].dim != base_plan.dim:
        raise ConfigError(f"the new inputs hold {plan.shards[0].dim}-d embeddings but the collection's base has {base_plan.dim}-d")
    return check_existing_run(plan)


# What makes generations comparable with their base: the same embeddings and the same order.
_RECIPE_FIELDS = ("keep", "metadata_columns", "seed")


def _check_same_recipe(cfg: RunConfig, base: RunConfig, root: str) -> None:
    def recipe(c: RunConfig) -> dict:
        fields = {k: v for k, v in c.embedding_fields().items() if k != "input"}
        return fields | {k: getattr(c, k) for k in _RECIPE_FIELDS}

    now, then = recipe(cfg), recipe(base)
    differing = sorted(k for k in now if now[k] != then[k])
    if differing:
        raise ConfigError(
            f"the collection {root} was based on another configuration ({', '.join(differing)}); "
            "use the base's settings, or --refit to start a new base with these"
        )


def _check_ids_unseen(plan: RunPlan, collection: Collection, root: str) -> None:
    """Ids stay unique across the collection: a new object may not reuse an id that a
    generation since the base holds (its kept, removed or failed items; only their id columns
    are read, not the processed inputs)."""
    if not plan.shards:  # raw inputs: their ids are known only once embedded
        return
    new_ids = pa.concat_arrays([read_ids(s) for s in plan.shards])
    for g in collection.generations[collection.base :]:
        layout = RunLayout(join(root, g.run))
        for url in (layout.kept, layout.removed, layout.failed):
            earlier = read_parquet(url, columns=["id"]).column("id")
            seen = pc.is_in(new_ids, value_set=earlier.combine_chunks().cast(pa.string()))
            if pc.any(seen).as_py():
                dup_id = new_ids.filter(seen)[0].as_py()
                shard = next(s for s in plan.shards if pc.any(pc.equal(read_ids(s), dup_id)).as_py())
                raise InputError(f"duplicate id {dup_id!r} in {shard.name} and in generation {g.index} of the collection {root}; ids must be unique across the collection")


def nothing_new_summary(cfg: RunConfig, message: str, timings: dict[str, float]) -> RunSummary:
    """What a run over nothing new reports: no items, the reason."""
    from semdedup_core.run.plan import package_versions

    return RunSummary(
        output=cfg.output, n_input=0, n_embedded=0, n_judged=0, n_kept=0, n_removed=0, n_exact=0, n_failed=0, eps=None,
        clusters=0, buckets=0, keep=cfg.keep, device="", input_format="", stage_seconds=timings, versions=package_versions(), note=message,
    )


def commit_generation(plan: RunPlan, summary: RunSummary) -> Collection:
    """Add the finished run to collection.json (one atomic rewrite: the commit point)."""
    run_url = plan.config.output
    root = posixpath.dirname(posixpath.dirname(run_url.rstrip("/")))
    index = int(posixpath.basename(run_url.rstrip("/")).removeprefix("g-"))
    collection = read_collection(root) or Collection()
    if any(g.index == index for g in collection.generations):
        return collection  # committed already (the process died after its commit)
    if index != len(collection.generations):
        raise RuntimeError(f"collection {root}: generation {index} finished but {len(collection.generations)} are committed")
    kind = "generation" if plan.earlier else "base"
    record = Generation(
        index=index,
        kind=kind,
        run=posixpath.relpath(run_url, root),
        plan=store_plan(plan).digest,
        inputs=plan.fingerprints,
        n_input=summary.n_input,
        n_kept=summary.n_kept,
        n_removed=summary.n_removed,
        n_failed=summary.n_failed,
        eps=summary.eps,
        against=plan.config.against if plan.earlier else None,
        committed=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        drift=drift(plan),
    )
    collection.generations.append(record)
    write_json(collection_json(root), collection.model_dump(mode="json"))
    return collection


def drift(plan: RunPlan) -> Drift:
    """Growth since the base fit, how far this generation's items sit from their centroids
    compared with the base's, and the cumulative cluster balance; a refit is recommended
    past REFIT_GROWTH or REFIT_CENTROID_SIM_DROP."""
    runs = [run for run in [*(load_plan(ref) for ref in plan.earlier), plan] if exists(run.layout.cluster_sizes)]
    sizes = np.zeros(plan.clusters, np.int64)
    for run in runs:
        sizes += read_npy(run.layout.cluster_sizes)
    base_sim = _mean_centroid_sim(runs[0]) if runs else None
    new_sim = _mean_centroid_sim(plan) if exists(plan.layout.cluster_sizes) else None
    n_base = int(read_npy(runs[0].layout.cluster_sizes).sum()) if runs else 0
    total = int(sizes.sum())
    growth = total / n_base if n_base else float("inf")
    reasons = []
    if growth >= REFIT_GROWTH:
        reasons.append(f"the collection grew {growth:.2f}x since its base was fitted (refit from {REFIT_GROWTH:.1f}x)")
    if base_sim is not None and new_sim is not None and base_sim - new_sim >= REFIT_CENTROID_SIM_DROP:
        reasons.append(f"new items sit further from their centroids (mean similarity {new_sim:.3f} vs {base_sim:.3f} for the base)")
    return Drift(
        items_since_base=total,
        growth=growth,
        base_mean_centroid_sim=base_sim,
        new_mean_centroid_sim=new_sim,
        largest_cluster=int(sizes.max()) if len(sizes) else 0,
        imbalance=float(plan.clusters * (sizes.astype(np.float64) ** 2).sum() / total**2) if total else 1.0,
        refit_recommended=bool(reasons),
        reason="; ".join(reasons) or None,
    )


def _mean_centroid_sim(plan: RunPlan) -> float | None:
    total, count = 0.0, 0
    for shard in plan.shards:
        sims = read_parquet(plan.layout.partition(shard.index), columns=["centroid_sim"]).column("centroid_sim")
        total += float(pc.sum(sims).as_py() or 0.0)
        count += len(sims)
    return total / count if count else None
