"""Spherical k-means with faiss: fitted on a seeded sample, then every item assigned by inner product."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from semdedup_core.dedup.kernel import ieee_fp32_matmul, screening_band

# fp32 screening scores held at once (rows x k), and (row, centroid) pairs rescored at once:
# memory stays bounded whatever the batch and k.
_SCREEN_SCORES = 2**23
_RESCORE_PAIRS = 1024


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
