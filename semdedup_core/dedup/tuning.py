"""eps for a target kept fraction: predicted on a sample (paper §6.5), then met on all items.

The target is a fraction of the *judged* items: the input minus the failed items, exact
copies (resolved before embedding) counting as removed.

- Prediction (``tune_eps``): the paper's recipe, on a seeded sample of clusters that is
  also large in items (so a few clusters never decide). ``max_sim`` does not depend on
  eps, so the sample is scored once and the kept fraction evaluated for any eps: a coarse
  grid brackets the target, a finer grid narrows it, linear interpolation gives eps. The
  sample's scores are kept and reused by the dedup stage, so sampling costs nothing extra.
- Exact (``exact_eps``, the default): after the full scoring, the eps that keeps
  ``round(F x judged)`` items, to the item up to ties in max_sim. It streams the max_sim
  column twice through histograms over float32 bit patterns, so it is exact with memory
  bounded by two 65,536-bin histograms, whatever the number of items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_core.dedup.scoring import iter_cluster_scores, order_function
from semdedup_core.dedup.partitions import load_bucket
from semdedup_core.run.plan import RunPlan
from semdedup_core.run.stage_results import PartitionIndex, RunSummary, TuningResult
from semdedup_core.storage import read_npy, read_parquet, write_json, write_parquet

COARSE_GRID = np.unique(np.concatenate([np.geomspace(1e-5, 0.5, 60), np.linspace(0.5, 0.999, 20)]))
REFINE_POINTS = 64
# A sampled eps that misses the target by more than this (fraction of judged items) is warned about.
MISS_TOLERANCE = 0.01
# float32 thresholds float32(1 - eps) reachable with 0 < eps < 1, exactly.
_LOWEST_THRESHOLD = np.float32(2.0**-24)
_HIGHEST_THRESHOLD = np.float32(1.0 - 2.0**-24)
_HALF_BITS = 16

SAMPLE_SCHEMA = pa.schema([("id", pa.string()), ("cluster", pa.int32()), ("max_sim", pa.float32()), ("dup_index", pa.int64())])


def sample_clusters(sizes: np.ndarray, fraction: float, seed: int, min_items: int = 0) -> np.ndarray:
    """Seeded clusters (sorted): at least ``fraction`` of the non-empty clusters, and more,
    in the same seeded order, until they hold ``max(min_items, fraction x items)`` items
    (or all of them)."""
    nonempty = np.flatnonzero(sizes > 0)
    if not len(nonempty):
        return nonempty
    drawn = np.random.default_rng(seed).permutation(nonempty)
    count = max(1, math.ceil(fraction * len(nonempty)))
    total = int(sizes[nonempty].sum())
    wanted_items = min(total, max(min_items, math.ceil(fraction * total)))
    count = max(count, int(np.searchsorted(np.cumsum(sizes[drawn]), wanted_items)) + 1)
    return np.sort(drawn[: min(count, len(drawn))])


def kept_fraction(max_sim: np.ndarray, eps: float | np.ndarray) -> np.ndarray:
    """Kept fraction at each eps, from the sorted max_sim of the sample (NaN = first item, kept)."""
    finite = np.sort(max_sim[~np.isnan(max_sim)])
    thresholds = np.float32(1.0) - np.asarray(eps, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float32)
    # kept iff max_sim <= float32(1 - eps): count of finite values <= threshold.
    kept = np.searchsorted(finite, thresholds, side="right") + (len(max_sim) - len(finite))
    return kept / max(len(max_sim), 1)


def choose_eps(max_sim: np.ndarray, target: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(eps, predicted kept fraction, eps grid evaluated, kept fraction on it)."""
    grid = COARSE_GRID
    kept = kept_fraction(max_sim, grid)
    for _ in range(2):  # coarse, then refined inside the bracket
        lo, hi = _bracket(grid, kept, target)
        fine = np.linspace(grid[lo], grid[hi], REFINE_POINTS)
        grid = np.unique(np.concatenate([grid, fine]))
        kept = kept_fraction(max_sim, grid)
    lo, hi = _bracket(grid, kept, target)
    if kept[lo] == kept[hi]:
        eps = float(grid[lo])
    else:  # kept falls as eps grows: interpolate eps linearly in kept fraction
        w = (kept[lo] - target) / (kept[lo] - kept[hi])
        eps = float(grid[lo] + w * (grid[hi] - grid[lo]))
    eps = min(max(eps, float(grid[0])), float(grid[-1]))
    return eps, float(kept_fraction(max_sim, eps)), grid, kept


def _bracket(grid: np.ndarray, kept: np.ndarray, target: float) -> tuple[int, int]:
    """Indices lo < hi with kept[lo] >= target >= kept[hi] (clamped at the ends of the grid)."""
    above = np.flatnonzero(kept >= target)
    lo = int(above[-1]) if len(above) else 0
    return lo, min(lo + 1, len(grid) - 1)


def judged_items(plan: RunPlan, n_scored: int) -> int:
    """Items the target is a fraction of: the scored items plus the exact copies of scored
    items (removed as 'exact'); copies of an item that failed fail too and do not count."""
    if not plan.embeds:
        return n_scored
    layout = plan.layout
    failed = [read_parquet(layout.embeddings_failed(s.index), columns=["id"]).column("id") for s in plan.sources]
    failed += [read_parquet(layout.partition_failed(s.index), columns=["id"]).column("id") for s in plan.shards]
    failed_ids = pa.chunked_array(failed, type=pa.string()).combine_chunks()
    copies_of = read_parquet(layout.exact_duplicates, columns=["dup_of"]).column("dup_of")
    return n_scored + int(pc.sum(pc.invert(pc.is_in(copies_of, value_set=failed_ids))).as_py() or 0)


def tune_eps(plan: RunPlan, partition_index: PartitionIndex) -> TuningResult:
    """Score the sampled clusters (kept in tuning/ for the dedup stage), predict eps, write
    tuning/curve.parquet (with tuning='sample' also tuning/result.json: the prediction is the
    eps used)."""
    layout, cfg = plan.layout, plan.config
    sizes = read_npy(layout.cluster_sizes)
    chosen = sample_clusters(sizes, cfg.tuning_cluster_fraction, cfg.seed, cfg.tuning_min_items)
    bucket_of = read_npy(layout.bucket_of_cluster)
    order = order_function(plan)
    sims: list[np.ndarray] = []
    for bucket in np.unique(bucket_of[chosen]):
        entries = partition_index.buckets[int(bucket)]
        data = load_bucket(plan, entries, order, only_clusters=chosen)
        bucket_sims, dup_index = [], []  # dup_of as an index into the cluster's keep order
        for _, lo, max_sim, dup_rows in iter_cluster_scores(plan, data):
            bucket_sims.append(max_sim)
            dup_index.append(np.where(dup_rows >= 0, dup_rows - lo, -1))
        sims += bucket_sims
        first = np.concatenate(dup_index) < 0
        columns = {"id": data.ids, "cluster": data.cluster.astype(np.int32), "max_sim": pa.array(np.concatenate(bucket_sims), mask=first), "dup_index": np.concatenate(dup_index)}
        write_parquet(layout.tuning_sample(int(bucket)), pa.table(columns, schema=SAMPLE_SCHEMA))
    max_sim = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    return sampled_prediction(plan, partition_index, len(chosen), max_sim)


def sampled_prediction(plan: RunPlan, partition_index: PartitionIndex, sample_clusters: int, max_sim: np.ndarray) -> TuningResult:
    """The paper's prediction from the sample's max_sim (NaN: first of its cluster): write
    tuning/curve.parquet (with tuning='sample' also tuning/result.json) and return it."""
    layout, cfg = plan.layout, plan.config
    n_scored = partition_index.n_assigned
    judged = judged_items(plan, n_scored)
    # The sample judges scored items only; exact copies are removed whatever eps is.
    scored_target = min(1.0, cfg.target_keep * judged / n_scored) if n_scored else cfg.target_keep
    eps, predicted_scored, grid, kept = choose_eps(max_sim, scored_target)
    share = n_scored / judged if judged else 1.0
    write_parquet(layout.tuning_curve, pa.table({"eps": grid, "predicted_kept_fraction": kept * share}))
    result = TuningResult(
        mode="sample",
        target_keep=cfg.target_keep,
        eps=eps,
        sampled_eps=eps,
        predicted_kept_fraction=predicted_scored * share,
        n_judged=judged,
        sample_clusters=sample_clusters,
        sample_items=len(max_sim),
    )
    if cfg.tuning == "sample":
        write_json(layout.tuning_result, result.model_dump(mode="json"))
    return result


# ---------------------------------------------------------------- exact eps on all items


def _sortable(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order (-0.0 folded onto +0.0: they compare equal)."""
    bits = (np.asarray(values, np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))


def _unsortable(key: int) -> np.float32:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return np.array([bits], np.uint32).view(np.float32)[0]


def _finite_max_sims(plan: RunPlan) -> Iterator[np.ndarray]:
    """Each bucket's non-null max_sim values, one bucket in memory at a time."""
    for bucket in range(plan.buckets):
        column = read_parquet(plan.layout.scores(bucket), columns=["max_sim"]).column("max_sim")
        yield pc.drop_null(column).to_numpy()


def threshold_keeping(values: Callable[[], Iterable[np.ndarray]], n_items: int, wanted: int) -> tuple[np.float32, int]:
    """(float32 threshold t, items kept) where ``max_sim <= t`` keeps the count nearest to
    ``wanted`` that a threshold reachable with 0 < eps < 1 can keep (equal distance: more kept).

    ``values()`` streams the finite max_sim values of ``n_items`` items (called two or three
    times); the other items (first of their cluster) are always kept. Exact: the values are
    counted in a histogram over their high 16 bits, then over the low 16 bits of the one
    high bin holding the boundary.
    """
    high = np.zeros(2**_HALF_BITS, np.int64)
    for chunk in values():
        high += np.bincount(_sortable(chunk) >> _HALF_BITS, minlength=2**_HALF_BITS)
    n_values = int(high.sum())
    n_first = n_items - n_values
    if not n_values:
        return _HIGHEST_THRESHOLD, n_first
    want = wanted - n_first  # how many finite values to keep: the lowest ones
    rank = min(max(want, 1), n_values)  # 1-based rank of the value at the boundary
    value, below, at_or_below = _value_of_rank(values, high, rank)
    if want >= at_or_below or (want > below and at_or_below - want <= want - below):
        threshold, kept = value, at_or_below  # keep the boundary value and its ties
    else:
        threshold, kept = np.nextafter(value, np.float32(-np.inf)), below
    # eps in (0, 1) reaches thresholds in [2**-24, 1 - 2**-24] only (not, e.g., copies at 1.0).
    clamped = min(max(threshold, _LOWEST_THRESHOLD), _HIGHEST_THRESHOLD)
    if clamped != threshold:
        threshold, kept = clamped, sum(int((chunk <= clamped).sum()) for chunk in values())
    return np.float32(threshold), n_first + kept


def _value_of_rank(values: Callable[[], Iterable[np.ndarray]], high: np.ndarray, rank: int) -> tuple[np.float32, int, int]:
    """(the rank-th smallest value, how many are below it, how many at or below it)."""
    cumulative = np.cumsum(high)
    top = int(np.searchsorted(cumulative, rank))  # the high half holding the rank-th value
    before = int(cumulative[top - 1]) if top else 0
    low = np.zeros(2**_HALF_BITS, np.int64)
    for chunk in values():
        keys = _sortable(chunk)
        keys = keys[keys >> _HALF_BITS == top]
        low += np.bincount(keys & (2**_HALF_BITS - 1), minlength=2**_HALF_BITS)
    cumulative_low = before + np.cumsum(low)
    bottom = int(np.searchsorted(cumulative_low, rank))
    at_or_below = int(cumulative_low[bottom])
    return _unsortable((top << _HALF_BITS) | bottom), at_or_below - int(low[bottom]), at_or_below


def exact_eps(plan: RunPlan, partition_index: PartitionIndex, sampled: TuningResult) -> TuningResult:
    """The eps keeping round(target x judged) items (the nearest reachable count when max_sim
    ties straddle it). Needs every bucket scored."""
    n_scored = partition_index.n_assigned
    judged = judged_items(plan, n_scored)
    wanted = math.floor(plan.config.target_keep * judged + 0.5)
    threshold, n_kept = threshold_keeping(lambda: _finite_max_sims(plan), n_scored, wanted)
    return sampled.model_copy(
        update={
            "mode": "exact",
            "eps": 1.0 - float(threshold),  # exact: float32(1 - eps) == threshold
            "target_n_kept": wanted,
            "n_kept": n_kept,
            "n_judged": judged,
            "achieved_kept_fraction": n_kept / judged if judged else None,
        }
    )


def target_miss_warning(summary: RunSummary) -> str | None:
    """One warning line when the paper's sampled eps (tuning='sample') misses the target by
    more than a point; None otherwise."""
    target, achieved = summary.target_keep, summary.kept_fraction
    if summary.tuning != "sample" or target is None or achieved is None or abs(achieved - target) <= MISS_TOLERANCE:
        return None
    return (
        f"target_keep {target:.4f} missed: the sampled eps {summary.eps:.6g} keeps {achieved:.4f} of the judged items "
        f"(predicted {summary.predicted_kept_fraction:.4f}); tuning='exact' meets the target on all items"
    )
