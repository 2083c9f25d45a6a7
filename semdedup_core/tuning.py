"""Tune eps to a target kept fraction (paper §6.5) on a seeded sample of clusters.

``max_sim`` does not depend on eps, so the sample is scored once and the kept fraction
is then evaluated for any eps: a coarse grid finds the two eps values bracketing the
target, a finer grid inside that bracket narrows it, and linear interpolation between
the final bracketing points gives eps.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from .dedup import iter_cluster_scores, order_function
from .partitions import load_bucket
from .run import RunPlan
from .storage import exists, read_json, read_npy, write_json, write_parquet

COARSE_GRID = np.unique(np.concatenate([np.geomspace(1e-5, 0.5, 60), np.linspace(0.5, 0.999, 20)]))
REFINE_POINTS = 64


def sample_clusters(sizes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded share of the non-empty clusters (at least one), sorted."""
    nonempty = np.flatnonzero(sizes > 0)
    count = max(1, math.ceil(fraction * len(nonempty)))
    return np.sort(np.random.default_rng(seed).choice(nonempty, size=min(count, len(nonempty)), replace=False))


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


def tune_eps(plan: RunPlan, partition_index: dict) -> dict:
    """Score the sampled clusters, write tuning/curve.parquet and tuning/result.json (last)."""
    layout, cfg = plan.layout, plan.config
    if exists(layout.tuning_result):
        return read_json(layout.tuning_result)
    sizes = read_npy(layout.cluster_sizes)
    chosen = sample_clusters(sizes, cfg.tuning_cluster_fraction, cfg.seed)
    bucket_of = read_npy(layout.bucket_of_cluster)
    order = order_function(plan)
    sims: list[np.ndarray] = []
    for bucket in np.unique(bucket_of[chosen]):
        entries = partition_index["buckets"][int(bucket)]
        data = load_bucket(plan, entries, order, only_clusters=chosen)
        sims.extend(max_sim for _, _, max_sim, _ in iter_cluster_scores(plan, data))
    max_sim = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    eps, predicted, grid, kept = choose_eps(max_sim, cfg.target_keep)
    write_parquet(layout.tuning_curve, pa.table({"eps": grid, "predicted_kept_fraction": kept}))
    result = {
        "target_keep": cfg.target_keep,
        "eps": eps,
        "predicted_kept_fraction": predicted,
        "sample_clusters": len(chosen),
        "sample_items": len(max_sim),
    }
    write_json(layout.tuning_result, result)
    return result
