"""What each unit of the DAG returns: small typed records, also stored as its completion marker.

A unit's result is written as JSON after everything else the unit writes (see
``run_step`` in :mod:`semdedup_core.run.dag`), so a re-run reads it back instead of
recomputing. Arrays never travel in these records: they live in the run's storage.
Field names are the keys of the JSON files of docs/architecture.md §"Run layout".
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict


class StageResult(BaseModel):
    # Markers written by an older version may carry keys this one does not know.
    model_config = ConfigDict(extra="ignore")


class ScanResult(StageResult):
    shard: int
    n_items: int
    n_failed: int


class ExactResult(StageResult):
    n_items: int
    n_failed: int
    n_exact: int


class EmbedResult(StageResult):
    shard: int
    n_items: int
    n_embedded: int
    n_failed: int
    n_exact: int
    dim: int
    seconds: float
    n_long_texts: int | None = None  # text shards: longer than the model's limit
    long_text: str | None = None


class FitResult(StageResult):
    clusters: int
    buckets: int
    sample_size: int
    iterations: int
    method: str = "flat"  # or "two-level"
    # Per iteration: the sample's summed inner product with its assigned centroid, and
    # faiss's imbalance factor; then the same sum for the returned centroids.
    objective: list[float]
    imbalance_factor: list[float]
    final_objective: float | None = None
    gpu: bool
    # Two-level only: the coarse level's k and its own per-iteration figures.
    coarse_clusters: int | None = None
    coarse_objective: list[float] | None = None
    coarse_imbalance_factor: list[float] | None = None


class ShardPartition(StageResult):
    """A shard's items assigned to clusters, stored grouped by bucket."""

    shard: int
    n_rows: int
    n_assigned: int
    n_failed: int
    # bucket -> [[row group, first row, rows], ...] in the shard's partition file
    row_groups: dict[str, list[list[int]]]
    cluster_counts: dict[str, int]


class PartitionIndex(StageResult):
    """Where each bucket's rows are: ``buckets[b]`` = [[shard, row groups], ...]."""

    buckets: list[list[list]]
    n_assigned: int
    n_failed: int
    nonempty_clusters: int


class TuningResult(StageResult):
    mode: str  # "sample": the eps predicted on the tuning sample; "exact": met on every item
    target_keep: float
    eps: float
    sampled_eps: float
    predicted_kept_fraction: float
    n_judged: int
    sample_clusters: int
    sample_items: int
    target_n_kept: int | None = None
    n_kept: int | None = None
    achieved_kept_fraction: float | None = None


class BucketScores(StageResult):
    bucket: int
    n_scored: int
    clusters: int
    eps: float | None  # None until the exact threshold is applied (tuning='exact')
    n_removed: int | None = None


class WrittenShard(StageResult):
    shard: int
    kept: bool  # the shard's kept items are in dataset/
    removed: bool  # its removed items are in removed/
    counts: dict[str, int]


class SourceCounts(BaseModel):
    source: str
    input: int
    kept: int
    removed: int
    failed: int


class Written(BaseModel):
    dataset: str | None
    removed: str | None
    counts: dict[str, int]


class RunSummary(StageResult):
    """summary.json: what the run decided, beside what every summary records about the run."""

    output: str
    n_input: int
    n_embedded: int
    n_judged: int
    n_kept: int
    n_removed: int
    n_exact: int
    n_failed: int
    # Removed with reason 'reference' (included in n_removed; exact copies of them too); None without a reference set.
    n_reference: int | None = None
    eps: float | None
    target_keep: float | None = None
    # Of the judged items (input minus failed; exact copies count as removed), as target_keep.
    kept_fraction: float | None = None
    predicted_kept_fraction: float | None = None
    sampled_eps: float | None = None
    tuning: str | None = None
    n_long_texts: int | None = None
    long_text: str | None = None
    clusters: int
    buckets: int
    per_source: list[SourceCounts] = []
    keep: str
    device: str
    input_format: str
    embedder: dict | None = None
    stage_seconds: dict[str, float]
    versions: dict[str, str]
    warnings: list[str] = []
    refused: str | None = None  # why nothing could be judged (every item failed)
    note: str | None = None  # a run that had nothing to do says why (a collection with nothing new)
    written: Written | None = None


class SimilarityHistogram(StageResult):
    """result/similarity.json: how the judged items' max_sim is distributed.

    max_sim does not depend on eps, so this one histogram gives the kept fraction at every
    eps (``kept_fraction_at``), for the report and the artifacts, without reading the scores
    again. Bin ``i`` holds ``lower + i * width <= max_sim < lower + (i + 1) * width``; the
    last bin also holds max_sim == 1.
    """

    lower: float
    width: float
    counts: list[int]
    n_first: int  # no earlier item in its cluster (max_sim undefined): kept at every eps
    n_exact: int  # identical content, removed before embedding: removed at every eps

    @property
    def n_judged(self) -> int:
        return self.n_first + self.n_exact + sum(self.counts)

    def kept_fraction_at(self, eps):
        """Kept fraction of the judged items at each eps (exact at bin edges, else within one bin)."""
        counts = np.asarray(self.counts, np.int64)
        below = np.r_[0, np.cumsum(counts)]  # below[i]: items with max_sim < lower + i * width
        edge = np.clip(np.floor((1.0 - np.asarray(eps, np.float64) - self.lower) / self.width + 1e-9).astype(np.int64) + 1, 0, len(counts))
        return (self.n_first + below[edge]) / max(self.n_judged, 1)


class RecallEstimate(StageResult):
    """clustering/recall.json: the paper's eta (its appendix A.2) on a seeded sample.

    Of the duplicate pairs (cosine similarity > 1 - eps) that a search over each sampled
    item's ``nearest_clusters`` nearest clusters finds, the share that lie inside one
    cluster, which is all the cluster-local search of SemDeDup can see.
    """

    eps: float
    seed: int
    sample_items: int
    nearest_clusters: int
    pairs_in_cluster: int
    pairs_in_nearest: int
    eta: float | None  # None when the search found no duplicate pair, or it was skipped
    skipped: str | None = None  # why no item was sampled (a collection generation, too few items)
