"""Cost of the canonical nearest-centroid assignment against a plain faiss top-1 search.

The plain search (what the assignment was before) gives each row a float32 centroid_sim
that depends on the batch it is in; the canonical assignment (``CentroidIndex.assign``)
screens with a torch fp32 GEMM, takes every centroid within the error band of the row's
best score (usually one) and rescores those canonically (float64 sums of exact products,
rounded once). Both run on the same rows in the same batches as the assign stage
(``partitions.READ_BATCH_ROWS``), interleaved, medians reported.

    .venv/bin/python benchmarks/bench_assignment.py                  # 200,000 x 512, k=500, 2 threads
    .venv/bin/python benchmarks/bench_assignment.py --n 50000 --repeats 5 --json benchmarks/results/assign.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common  # noqa: F401  (puts the repo root on sys.path)
import faiss
import numpy as np
import torch
from _common import ForeignLoad, machine_info, print_table, synth_embeddings, versions, write_json

from semdedup_core.dedup.clustering import CentroidIndex, fit_spherical_kmeans, sample_rows
from semdedup_core.dedup.kernel import screening_band
from semdedup_core.dedup.partitions import READ_BATCH_ROWS


def plain_search(index: faiss.Index, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    labels, sims = [], []
    for lo in range(0, len(x), batch):
        s, i = index.search(x[lo : lo + batch], 1)
        labels.append(i[:, 0].astype(np.int32))
        sims.append(s[:, 0])
    return np.concatenate(labels), np.concatenate(sims)


def gemm_only(centroids: np.ndarray, x: np.ndarray, batch: int) -> None:
    """The canonical assignment's fp32 screening GEMM alone (its floor)."""
    screen = torch.from_numpy(centroids).T.contiguous()
    for lo in range(0, len(x), batch):
        torch.from_numpy(x[lo : lo + batch]) @ screen


def canonical(index: CentroidIndex, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [index.assign(x[lo : lo + batch]) for lo in range(0, len(x), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="rows to assign (default 200000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--k", type=int, default=500, help="centroids (default 500)")
    p.add_argument("--batch", type=int, default=READ_BATCH_ROWS, help=f"rows per search, as the assign stage (default {READ_BATCH_ROWS})")
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    info = machine_info()
    print(f"# bench_assignment  {info['cpu_model']}, {info['cores']} cores, {args.threads} threads, {info['date']}")
    x = synth_embeddings(args.n, args.dim, args.seed, topics=args.k)
    sample = x[np.concatenate(sample_rows([args.n], 64 * args.k, args.seed))]
    centroids = fit_spherical_kmeans(sample, args.k, iterations=10, seed=args.seed).centroids
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(centroids)
    index = CentroidIndex(centroids)
    window = 2 * screening_band(args.dim)  # the assignment's candidate window

    times: dict[str, list[float]] = {"plain faiss top-1": [], "canonical": [], "torch fp32 GEMM alone": []}
    loads: list[float] = []
    for _ in range(args.repeats):
        runs = (
            ("plain faiss top-1", lambda: plain_search(flat, x, args.batch)),
            ("canonical", lambda: canonical(index, x, args.batch)),
            ("torch fp32 GEMM alone", lambda: gemm_only(centroids, x, args.batch)),
        )
        for name, fn in runs:
            with ForeignLoad() as load:
                start = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - start)
            loads.append(load.cores or 0.0)
            if name == "plain faiss top-1":
                plain_labels, plain_sims = result
            elif name == "canonical":
                labels, sims = result
    top2, _ = flat.search(x, 2)
    crowded = float(np.mean(top2[:, 1] >= top2[:, 0] - window))  # rows rescoring 2+ centroids
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["canonical"] / median["plain faiss top-1"]
    rows = [[name, f"{args.n:,} x {args.dim}, k={args.k}", f"{statistics.median(t):.2f}", f"{min(t):.2f}"] for name, t in times.items()]
    print_table(["assignment", "size", "median s", "best s"], rows)
    print()
    print(f"canonical / plain: {ratio:.2f}x; canonical / its GEMM alone: {median['canonical'] / median['torch fp32 GEMM alone']:.2f}x "
          f"(medians of {args.repeats} interleaved runs; max other-process cores {max(loads):.2f})")
    print(f"rows with a runner-up inside the band (2+ centroids rescored): {crowded:.2%}")
    print(f"rows whose cluster differs from faiss top-1: {int((labels != plain_labels).sum())}; centroid_sim bits differ: {int((sims != plain_sims).sum())}")
    write_json(
        args.json,
        {
            "machine": info,
            "versions": versions(),
            "args": vars(args),
            "seconds": times,
            "ratio_canonical_over_plain_median": ratio,
            "crowded_share": crowded,
            "max_other_process_cores": max(loads),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
