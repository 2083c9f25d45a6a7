"""Spherical k-means with faiss: fitted on a seeded sample, then every item assigned by inner product."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .kernel import canonical_dot, screening_band

# Crowded rows (several centroids inside the error band) are scored against all centroids
# this many at a time, so memory stays bounded by block x k floats.
_CROWDED_BLOCK = 1024


@dataclass(frozen=True)
class KMeansFit:
    centroids: np.ndarray  # float32 (k, d), unit norm
    objective: list[float]  # faiss objective (sum of inner products) per iteration
    imbalance: list[float]  # faiss imbalance factor per iteration
    sample_size: int


def sample_rows(row_counts: list[int], sample_size: int, seed: int) -> list[np.ndarray]:
    """A seeded uniform sample of global rows, returned as sorted row numbers per shard."""
    total = int(sum(row_counts))
    size = min(sample_size, total)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
    bounds = np.concatenate([[0], np.cumsum(row_counts)])
    return [picked[(picked >= lo) & (picked < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def fit_spherical_kmeans(sample: np.ndarray, k: int, iterations: int, seed: int, use_gpu: bool = False) -> KMeansFit:
    """faiss k-means on unit vectors with centroids re-normalised every iteration."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    n, d = sample.shape
    if k > n:
        raise ValueError(f"cannot fit {k} clusters on {n} sampled points")
    km = faiss.Kmeans(
        d,
        k,
        niter=iterations,
        seed=seed,
        spherical=True,
        gpu=use_gpu,
        verbose=False,
        # The sample is already the training set: no second subsampling, no warnings.
        max_points_per_centroid=max(1, -(-n // k)),
        min_points_per_centroid=1,
    )
    km.train(sample)
    centroids = km.centroids.astype(np.float32, copy=True)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids /= np.where(norms > 0, norms, 1.0).astype(np.float32)
    stats = km.iteration_stats
    return KMeansFit(
        centroids=centroids,
        objective=[float(s["obj"]) for s in stats],
        imbalance=[float(s["imbalance_factor"]) for s in stats],
        sample_size=n,
    )


class CentroidIndex:
    """Nearest centroid by inner product, chosen canonically.

    faiss (BLAS) finds each row's best centroids; its scores depend on the batch a row is
    in, the thread count and the device. Every centroid within the BLAS error band of the
    best one is then rescored with the kernel's canonical dot, and the highest canonical
    score wins, exact ties to the lowest centroid index. So a row's cluster and
    centroid_sim depend only on the row and the centroids: bit-identical vectors get
    bit-identical keys wherever they are.
    """

    def __init__(self, centroids: np.ndarray, use_gpu: bool = False):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        k, d = self.centroids.shape
        index = faiss.IndexFlatIP(d)
        if use_gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        index.add(self.centroids)
        self._index = index
        # Any centroid whose BLAS score is within 2 bands of the BLAS best may be the best.
        self._window = 2 * screening_band(d)

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster int32, centroid_sim float32 canonical) for each row."""
        n, k = len(vectors), len(self.centroids)
        if n == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        x = np.require(vectors, np.float32, ["C", "W"])  # torch wants writable memory
        top = min(2, k)
        approx, labels = self._index.search(x, top)
        rows, cols = np.arange(n), labels[:, 0]
        if top == 2:
            # The runner-up is inside the window: the row may have more candidates than two,
            # so take them all from one full row of scores (rare: rows near a cluster border).
            crowded = np.flatnonzero(approx[:, 1] >= approx[:, 0] - self._window)
            if len(crowded):
                lone = np.ones(n, bool)
                lone[crowded] = False
                rows_parts, cols_parts = [np.flatnonzero(lone)], [labels[lone, 0]]
                for start in range(0, len(crowded), _CROWDED_BLOCK):
                    block = crowded[start : start + _CROWDED_BLOCK]
                    full = x[block] @ self.centroids.T
                    near_r, near_c = np.nonzero(full >= full.max(axis=1, keepdims=True) - self._window)
                    rows_parts.append(block[near_r])
                    cols_parts.append(near_c)
                rows, cols = np.concatenate(rows_parts), np.concatenate(cols_parts)
        sims = canonical_dot(torch.from_numpy(x), torch.from_numpy(rows), torch.from_numpy(self.centroids), torch.from_numpy(cols.astype(np.int64))).numpy()
        # Per row: highest canonical score, then lowest centroid index.
        order = np.lexsort((cols, -sims, rows))
        first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
        cluster = np.empty(n, np.int32)
        centroid_sim = np.empty(n, np.float32)
        cluster[rows[first]] = cols[first]
        centroid_sim[rows[first]] = sims[first]
        return cluster, centroid_sim
