"""Flat vs two-level spherical k-means (``fit_spherical_kmeans``): fit time and objective.

Each k gets one fixed sample of unit vectors from a two-level mixture (topics, subtopics
inside topics, points around subtopics: popularity lognormal at both levels), like the
sample ``fit_centroids`` draws. Both methods fit the same sample with the same seed and
iterations; their objective is then computed the same way for both: the sum over the
sample of the inner product of each point with its nearest centroid (exact faiss flat
search over all k centroids). Flat at large k is not run when its estimated fit time
(measured seconds per flat iteration at a smaller k, scaled by n*k, which is what one
iteration costs) exceeds --flat-budget; the estimate is reported instead. Where n*k exceeds
--exact-pairs the exact objective (as costly as one flat iteration) is replaced by the fit's
own (each point to the nearest centroid it may be assigned to: a lower bound of the exact one).

    .venv/bin/python benchmarks/bench_kmeans.py                       # k = 1,000 / 10,000 / 50,000
    .venv/bin/python benchmarks/bench_kmeans.py --json benchmarks/results/kmeans.json
    .venv/bin/python benchmarks/bench_kmeans.py --methods two-level --refine-iterations 0   # refinement's share
"""

from __future__ import annotations

import argparse
import sys
import time

import _common  # noqa: F401  (puts the repo root on sys.path)
import faiss
import numpy as np
from _common import ForeignLoad, machine_info, print_table, versions, write_json

from semdedup_core.dedup import clustering
from semdedup_core.dedup.clustering import fit_spherical_kmeans

# (k, sample points per centroid, iterations): the product's defaults at k=1,000; fewer
# points and iterations at larger k so that the exact objective and the flat fits fit in
# a few minutes on 2 cores.
CASES = [(1_000, 64, 20), (10_000, 5, 10), (50_000, 4, 10)]


def mixture_sample(n: int, dim: int, seed: int, topics: int = 300, subtopics: int = 30_000, chunk: int = 65536) -> np.ndarray:
    """Seeded (n, dim) unit float32 rows: topic -> subtopic (cosine ~0.5 to its topic) ->
    point (cosine ~0.7 to its subtopic); popularity lognormal at both levels."""
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def mix(centers: np.ndarray, count: int, cosine: float) -> tuple[np.ndarray, np.ndarray]:
        weights = rng.lognormal(0.0, 1.0, len(centers))
        which = rng.choice(len(centers), size=count, p=weights / weights.sum())
        noise = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(np.sqrt((1 - cosine) / dim))
        return which, noise + np.float32(np.sqrt(cosine)) * centers[which]

    topic_centers = unit(rng.standard_normal((topics, dim), dtype=np.float32))
    sub_centers = unit(mix(topic_centers, subtopics, 0.5)[1])
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, chunk):
        out[lo : lo + chunk] = unit(mix(sub_centers, min(chunk, n - lo), 0.7)[1])
    return out


def exact_objective(sample: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over the sample of the inner product with the nearest of all centroids."""
    index = faiss.IndexFlatIP(sample.shape[1])
    index.add(centroids)
    sims, _ = index.search(sample, 1)
    return float(sims.astype(np.float64).sum())


def timed_fit(sample: np.ndarray, k: int, iterations: int, seed: int, method: str) -> tuple[object, float, float, float | None]:
    with ForeignLoad() as load:
        wall, cpu = time.perf_counter(), time.process_time()
        fit = fit_spherical_kmeans(sample, k, iterations, seed, method=method)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return fit, wall, cpu, load.cores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--seed", type=int, default=0, help="data and k-means seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="faiss threads (default 1: on a shared 2-core machine, 2 OpenMP threads mostly wait on each other)")
    p.add_argument("--flat-budget", type=float, default=300.0, help="skip a flat fit estimated above this many seconds (default 300)")
    p.add_argument("--exact-pairs", type=float, default=2e9, help="exact objective only up to this many point-centroid pairs, n*k (default 2e9)")
    p.add_argument("--methods", nargs="+", default=["flat", "two-level"], choices=["flat", "two-level"], help="methods to fit (default both)")
    p.add_argument("--refine-iterations", type=int, help="override two-level's refinement iterations (to measure their share)")
    p.add_argument("--json", help="write all numbers to this JSON file")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    if args.refine_iterations is not None:
        clustering._REFINE_ITERATIONS = args.refine_iterations

    rows, results = [], []
    flat_seconds_per_point_centroid = None  # one flat iteration's wall time / (n * k)
    for k, per_centroid, iterations in CASES:
        n = k * per_centroid
        sample = mixture_sample(n, args.dim, args.seed)
        for method in args.methods:
            result = {"k": k, "n": n, "iterations": iterations, "method": method}
            estimate = None
            if method == "flat" and flat_seconds_per_point_centroid is not None:
                estimate = flat_seconds_per_point_centroid * n * k * iterations
            if estimate is not None and estimate > args.flat_budget:
                result |= {"skipped": True, "estimated_fit_s": round(estimate, 1)}
                rows.append([k, n, iterations, method, f"not run: ~{estimate:,.0f} s estimated", "", "", "", "", ""])
                results.append(result)
                print(f"  k={k} flat skipped, estimated {estimate:.0f} s", file=sys.stderr, flush=True)
                continue
            print(f"  k={k} n={n} {method} ...", file=sys.stderr, flush=True)
            fit, wall, cpu, foreign = timed_fit(sample, k, iterations, args.seed, method)
            if n * k <= args.exact_pairs:
                objective, evaluated = exact_objective(sample, fit.centroids), "exact"
            else:
                objective, evaluated = fit.final_objective, "fit's own"
            if method == "flat":
                flat_seconds_per_point_centroid = wall / iterations / (n * k)
            result |= {
                "fit_wall_s": round(wall, 2),
                "fit_cpu_s": round(cpu, 2),
                "other_process_cores": foreign,
                "objective": objective,
                "mean_cosine": objective / n,
                "fit_final_objective": fit.final_objective,
                "final_imbalance": fit.imbalance[-1],
                "coarse_clusters": fit.coarse_clusters,
                "objective_kind": evaluated,
            }
            results.append(result)
            rows.append(
                [k, n, iterations, method, f"{wall:.1f}", f"{cpu:.1f}", foreign, f"{objective:,.1f} ({evaluated})", f"{objective / n:.5f}", f"{fit.imbalance[-1]:.3f}"]
            )
    print_table(["k", "sample", "iters", "method", "fit wall s", "fit cpu s", "other cores", "objective", "mean cosine", "imbalance"], rows)
    write_json(args.json, {"machine": machine_info(), "versions": versions(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
