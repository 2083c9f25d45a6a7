"""Spherical k-means with faiss: fitted on a seeded sample, then every item assigned by inner product."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


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
    """Nearest centroid by inner product (exact, faiss flat index)."""

    def __init__(self, centroids: np.ndarray, use_gpu: bool = False):
        d = centroids.shape[1]
        index = faiss.IndexFlatIP(d)
        if use_gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self._index = index

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster int32, centroid_sim float32) for each row."""
        if len(vectors) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        sims, labels = self._index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int32), sims[:, 0].astype(np.float32)
