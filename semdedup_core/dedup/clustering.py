"""Spherical k-means with faiss: fitted on a seeded sample, then every item assigned by inner product."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from semdedup_core.config import KMEANS_TWO_LEVEL_MIN_CLUSTERS
from semdedup_core.dedup.kernel import ieee_fp32_matmul, screening_band

# fp32 screening scores held at once (rows x k), and (row, centroid) pairs rescored at once:
# memory stays bounded whatever the batch and k.
_SCREEN_SCORES = 2**23
_RESCORE_PAIRS = 1024


@dataclass(frozen=True)
class KMeansFit:
    """A fitted spherical k-means.

    objective and imbalance are per iteration, and always sum over the whole sample the inner
    product of each point with the centroid it is assigned to in that iteration (before the
    iteration's update), resp. give k * sum(cluster size^2) / n^2. Flat: faiss's own stats.
    Two-level: the fine iterations (each point among the fine centroids of its own coarse
    cell; the cells' faiss stats summed), then the refinement iterations (each point among
    the fine centroids of its nearest coarse cells). final_objective and labels assign every
    sample point with the returned centroids, in the same way as the method's last iteration
    (flat: nearest of all k). coarse_* are the first level's own faiss stats (two-level only).
    """

    centroids: np.ndarray  # float32 (k, d), unit norm
    objective: list[float]
    imbalance: list[float]
    final_objective: float
    labels: np.ndarray  # int64 (sample_size,): each sample point's centroid
    sample_size: int
    method: str  # "flat" | "two-level"
    coarse_clusters: int = 0
    coarse_objective: list[float] = field(default_factory=list)
    coarse_imbalance: list[float] = field(default_factory=list)

    def stats(self) -> dict:
        """The fit's entries of fit.json."""
        stats = {
            "method": self.method,
            "objective": self.objective,
            "imbalance_factor": self.imbalance,
            "final_objective": self.final_objective,
        }
        if self.method == "two-level":
            stats |= {
                "coarse_clusters": self.coarse_clusters,
                "coarse_objective": self.coarse_objective,
                "coarse_imbalance_factor": self.coarse_imbalance,
            }
        return stats


def sample_rows(row_counts: list[int], sample_size: int, seed: int) -> list[np.ndarray]:
    """A seeded uniform sample of global rows, returned as sorted row numbers per shard."""
    total = int(sum(row_counts))
    size = min(sample_size, total)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
    bounds = np.concatenate([[0], np.cumsum(row_counts)])
    return [picked[(picked >= lo) & (picked < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_kmeans_method(method: str, k: int) -> str:
    """'flat' or 'two-level': what kmeans_method (config) means for k clusters."""
    if method == "auto":
        return "two-level" if k >= KMEANS_TWO_LEVEL_MIN_CLUSTERS else "flat"
    if method not in ("flat", "two-level"):
        raise ValueError(f"unknown k-means method {method!r}")
    return method


def fit_spherical_kmeans(
    sample: np.ndarray, k: int, iterations: int, seed: int, use_gpu: bool = False, method: str = "auto"
) -> KMeansFit:
    """Spherical k-means on the sample: flat, or two-level for large k (resolve_kmeans_method)."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    n, d = sample.shape
    if k > n:
        raise ValueError(f"cannot fit {k} clusters on {n} sampled points")
    if resolve_kmeans_method(method, k) == "two-level":
        return _fit_two_level(sample, k, iterations, seed, use_gpu)
    return _fit_flat(sample, k, iterations, seed, use_gpu)


def _kmeans(d: int, k: int, n: int, iterations: int, seed: int, use_gpu: bool, points_per_centroid: int | None = None) -> faiss.Kmeans:
    """faiss spherical k-means; it trains on all n points unless points_per_centroid caps them."""
    return faiss.Kmeans(
        d,
        k,
        niter=iterations,
        seed=seed,
        spherical=True,
        gpu=use_gpu,
        verbose=False,
        max_points_per_centroid=points_per_centroid or max(1, -(-n // k)),
        min_points_per_centroid=1,  # small samples are the caller's choice: no warnings
    )


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _fit_flat(sample: np.ndarray, k: int, iterations: int, seed: int, use_gpu: bool) -> KMeansFit:
    """faiss k-means on unit vectors with centroids re-normalised every iteration."""
    n, d = sample.shape
    km = _kmeans(d, k, n, iterations, seed, use_gpu)
    km.train(sample)
    centroids = _unit(km.centroids)
    sims, labels = _nearest(km.index, centroids, sample)
    stats = km.iteration_stats
    return KMeansFit(
        centroids=centroids,
        objective=[float(s["obj"]) for s in stats],
        imbalance=[float(s["imbalance_factor"]) for s in stats],
        final_objective=float(sims.astype(np.float64).sum()),
        labels=labels,
        sample_size=n,
        method="flat",
    )


def _nearest(index: faiss.Index, centroids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inner product, centroid) of each row's nearest centroid, through a faiss flat index."""
    index.reset()
    index.add(centroids)
    sims, labels = index.search(x, 1)
    return sims[:, 0], labels[:, 0]


# The coarse level trains on at most this many points per coarse centroid (faiss's default):
# its centroids only need to split the sample into cells, and all points are assigned after.
_COARSE_POINTS_PER_CENTROID = 256
# Refinement: a point may move to the fine centroids of this many nearest cells (its own first),
# for this many iterations; measured in benchmarks/README.md.
_REFINE_CELLS = 4
_REFINE_ITERATIONS = 3
# Rows summed at once when recomputing centroids: memory stays bounded whatever the sample.
_MEAN_CHUNK_ROWS = 65536


def _fit_two_level(sample: np.ndarray, k: int, iterations: int, seed: int, use_gpu: bool) -> KMeansFit:
    """k1 ~ sqrt(k) coarse cells, then each cell split into fine clusters in proportion to its
    size (exactly k in all), then a few refinement iterations over the whole sample in which a
    point may move to the fine centroids of its _REFINE_CELLS nearest cells. An iteration
    costs about n*(k1 + k/k1)*d instead of flat k-means' n*k*d.

    Cells get at least one fine centroid each, never more than their distinct points (if the
    whole sample has fewer than k distinct points, every distinct point becomes a centroid and
    the rest repeat them), and fine k-means starts from distinct points of the cell, so no two
    centroids start equal; a cell with as many fine centroids as distinct points takes those
    points. Deterministic for a seed: faiss is seeded, cells are trained in order, initial
    points are drawn from a generator seeded by (seed, cell), sums run in a fixed order.
    """
    n, d = sample.shape
    k1 = max(1, round(math.sqrt(k)))
    coarse = _kmeans(d, k1, n, iterations, seed, use_gpu, points_per_centroid=_COARSE_POINTS_PER_CENTROID)
    coarse.train(sample)
    coarse.index.reset()
    coarse.index.add(_unit(coarse.centroids))
    _, near_cells = coarse.index.search(sample, min(k1, _REFINE_CELLS))
    cell_of = near_cells[:, 0]
    members = _rows_by_cell(cell_of[:, None], k1)
    sizes = np.array([len(m) for m in members])
    distinct = [_distinct_rows(sample[m]) for m in members]
    capacity = np.array([len(u) for u in distinct])
    if capacity.sum() >= k:
        fine_counts = _fine_counts(sizes, np.minimum(capacity, 1), capacity, k)
    else:  # fewer distinct points than clusters: each is a centroid, some repeated
        fine_counts = _fine_counts(sizes, capacity, sizes, k)
    first = np.concatenate([[0], np.cumsum(fine_counts)])

    # One assignment index for every cell (on the GPU when asked, as faiss's gpu flag builds it).
    index = faiss.IndexFlatIP(d)
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    centroids = np.empty((k, d), np.float32)
    objective, sum_sq_sizes = np.zeros(iterations), np.zeros(iterations)
    for cell, (rows, kc) in enumerate(zip(members, fine_counts)):
        if kc == 0:
            continue
        x = sample[rows]
        if kc >= len(distinct[cell]):
            # Each distinct point its own centroid (cycled if the sample runs short of them).
            cell_centroids = _unit(x[np.resize(distinct[cell], kc)])
            sims, labels = _nearest(index, cell_centroids, x)
            objective += sims.astype(np.float64).sum()
            sum_sq_sizes += np.square(np.bincount(labels, minlength=kc)).sum()
        else:
            init = np.random.default_rng([seed, cell]).choice(distinct[cell], size=kc, replace=False)
            km = _kmeans(d, int(kc), len(x), iterations, seed, use_gpu=False)
            km.index = index
            km.train(x, init_centroids=x[np.sort(init)])
            cell_centroids = _unit(km.centroids)
            # faiss stops a cell early once its objective no longer improves: its last
            # iteration stands for the ones it skipped.
            stats = km.iteration_stats
            stats += stats[-1:] * (iterations - len(stats))
            objective += [s["obj"] for s in stats]
            # faiss's imbalance factor is kc * sum(size^2) / len(x)^2: recover sum(size^2).
            sum_sq_sizes += [s["imbalance_factor"] * len(x) ** 2 / kc for s in stats]
        centroids[first[cell] : first[cell + 1]] = cell_centroids
    objective, imbalance = objective.tolist(), (k * sum_sq_sizes / n**2).tolist()

    neighbourhoods = _rows_by_cell(near_cells, k1)
    for _ in range(_REFINE_ITERATIONS):
        sims, labels = _assign_near(sample, centroids, neighbourhoods, first, index)
        objective.append(float(sims.astype(np.float64).sum()))
        imbalance.append(float(k * np.square(np.bincount(labels, minlength=k).astype(np.float64)).sum() / n**2))
        centroids = _spherical_means(sample, labels, centroids)
    sims, labels = _assign_near(sample, centroids, neighbourhoods, first, index)
    return KMeansFit(
        centroids=centroids,
        objective=objective,
        imbalance=imbalance,
        final_objective=float(sims.astype(np.float64).sum()),
        labels=labels,
        sample_size=n,
        method="two-level",
        coarse_clusters=k1,
        coarse_objective=[float(s["obj"]) for s in coarse.iteration_stats],
        coarse_imbalance=[float(s["imbalance_factor"]) for s in coarse.iteration_stats],
    )


def _rows_by_cell(cells: np.ndarray, k1: int) -> list[np.ndarray]:
    """For each cell, the rows (ascending) that list it in their (rows, m) array of cells."""
    flat = cells.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(k1 + 1))
    rows = order // cells.shape[1]
    return [rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _assign_near(sample, centroids, neighbourhoods, first, index) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid among the fine centroids of the cells it is near (its own
    cell first): one flat search per cell, ties to the earlier cell, then the lower centroid."""
    best = np.full(len(sample), -np.inf, np.float32)
    labels = np.full(len(sample), -1, np.int64)
    for cell, rows in enumerate(neighbourhoods):
        if len(rows) == 0 or first[cell] == first[cell + 1]:
            continue
        sims, local = _nearest(index, centroids[first[cell] : first[cell + 1]], sample[rows])
        better = sims > best[rows]
        best[rows[better]] = sims[better]
        labels[rows[better]] = local[better] + first[cell]
    return best, labels


def _spherical_means(sample: np.ndarray, labels: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Normalised mean of each cluster's rows, summed in a fixed order and in float64; a
    cluster left empty keeps its previous centroid."""
    k, d = previous.shape
    sums = np.zeros((k, d), np.float64)
    order = np.argsort(labels, kind="stable")
    for lo in range(0, len(order), _MEAN_CHUNK_ROWS):
        chunk = order[lo : lo + _MEAN_CHUNK_ROWS]
        chunk_labels = labels[chunk]
        starts = np.flatnonzero(np.r_[True, chunk_labels[1:] != chunk_labels[:-1]])
        sums[chunk_labels[starts]] += np.add.reduceat(sample[chunk], starts, axis=0, dtype=np.float64)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 0, sums / np.where(norms > 0, norms, 1.0), previous).astype(np.float32)


def _distinct_rows(x: np.ndarray) -> np.ndarray:
    """Row numbers of the first occurrence of each distinct (bitwise) row, in row order."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    _, first = np.unique(np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel(), return_index=True)
    return np.sort(first)


def _fine_counts(sizes: np.ndarray, minimum: np.ndarray, capacity: np.ndarray, k: int) -> np.ndarray:
    """Fine clusters per cell, summing to k: each cell's minimum, then the rest one at a time
    to the cell with the most points per fine cluster (Webster's divisor, size/(count+1/2)),
    never above a cell's capacity. Ties go to the lower cell: deterministic."""
    counts = minimum.astype(np.int64)
    heap = [(-sizes[c] / (counts[c] + 0.5), c) for c in np.flatnonzero(counts < capacity)]
    heapq.heapify(heap)
    for _ in range(k - int(counts.sum())):
        _, c = heapq.heappop(heap)
        counts[c] += 1
        if counts[c] < capacity[c]:
            heapq.heappush(heap, (-sizes[c] / (counts[c] + 0.5), c))
    return counts


class CentroidIndex:
    """Nearest centroid by inner product, chosen canonically.

    An fp32 GEMM screens: its scores depend on the batch a row is in, the thread count and
    the device, but stay within ``screening_band`` of the exact dot product. Every centroid
    within twice that band of a row's best fp32 score (usually one) is rescored canonically,
    as the kernel rescores max_sim: float32 products, exact in float64, summed in float64
    and rounded once. The highest canonical score wins, exact ties to the lowest centroid
    index. A row's cluster and centroid_sim thus depend only on the row and the centroids:
    bit-identical vectors get bit-identical keys wherever and however they are read.
    """

    def __init__(self, centroids: np.ndarray, device: str = "cpu"):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._centroids64 = self.centroids.astype(np.float64)
        # d x k, contiguous: torch's sgemm is markedly faster on it than on a transposed view.
        self._screen = torch.from_numpy(self.centroids).to(torch.device(device)).T.contiguous()
        self._window = 2 * screening_band(self.centroids.shape[1])

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster int32, canonical centroid_sim float32) for each row."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        k = len(self.centroids)
        cluster = np.empty(len(x), np.int64)
        crowded_rows, crowded_cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        step = max(1, _SCREEN_SCORES // k)
        for lo in range(0, len(x), step):
            block = torch.from_numpy(np.require(x[lo : lo + step], requirements="W")).to(self._screen.device)
            with ieee_fp32_matmul():
                scores = block @ self._screen
            top = scores.topk(min(2, k), dim=1)
            cluster[lo : lo + len(block)] = top.indices[:, 0].cpu().numpy()
            if k > 1:
                # Rows whose runner-up is inside the window (rare: near a cluster border) may
                # have several candidates: all centroids inside the window of their best.
                close = (top.values[:, 1] >= top.values[:, 0] - self._window).nonzero().squeeze(1)
                if len(close):
                    near = scores[close] >= top.values[close, :1] - self._window
                    r, c = near.nonzero(as_tuple=True)
                    crowded_rows.append(close[r].cpu().numpy() + lo)
                    crowded_cols.append(c.cpu().numpy())
        centroid_sim = self._canonical(x, np.arange(len(x)), cluster)
        rows, cols = np.concatenate(crowded_rows), np.concatenate(crowded_cols)
        if len(rows):
            sims = self._canonical(x, rows, cols)
            # Per row: highest canonical score, then lowest centroid index.
            order = np.lexsort((cols, -sims, rows))
            first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
            cluster[rows[first]] = cols[first]
            centroid_sim[rows[first]] = sims[first]
        return cluster.astype(np.int32), centroid_sim

    def _canonical(self, x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """x[rows] . centroids[cols]: float64 sums (numpy's fixed pairwise order along a
        contiguous row) of exact products, rounded once to float32."""
        out = np.empty(len(rows), np.float32)
        for lo in range(0, len(rows), _RESCORE_PAIRS):
            r, c = rows[lo : lo + _RESCORE_PAIRS], cols[lo : lo + _RESCORE_PAIRS]
            out[lo : lo + _RESCORE_PAIRS] = (x[r].astype(np.float64) * self._centroids64[c]).sum(axis=1)
        return out
