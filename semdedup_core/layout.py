"""Where each artifact of a run lives (DESIGN §5). Every other module asks here for a URL."""

from __future__ import annotations

from dataclasses import dataclass

from .storage import join


@dataclass(frozen=True)
class RunLayout:
    root: str

    def _at(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def run_json(self) -> str:
        return self._at("run.json")

    @property
    def lease(self) -> str:
        return self._at("lease.json")

    # embedding stage (raw inputs): scan, exact duplicates, embeddings
    def scan(self, shard: int) -> str:
        return self._at("scan", f"shard-{shard:05d}.parquet")

    def scan_done(self, shard: int) -> str:
        return self._at("scan", f"shard-{shard:05d}.json")

    @property
    def exact_duplicates(self) -> str:
        return self._at("exact", "duplicates.parquet")

    @property
    def exact_done(self) -> str:
        return self._at("exact", "index.json")

    def embeddings(self, shard: int) -> str:
        return self._at("embeddings", f"shard-{shard:05d}.parquet")

    def embeddings_failed(self, shard: int) -> str:
        return self._at("embeddings", f"shard-{shard:05d}.failed.parquet")

    def embeddings_done(self, shard: int) -> str:
        """Written last by a shard's embedding: its completion marker."""
        return self._at("embeddings", f"shard-{shard:05d}.json")

    # clustering
    @property
    def centroids(self) -> str:
        return self._at("clustering", "centroids.npy")

    @property
    def bucket_of_cluster(self) -> str:
        return self._at("clustering", "bucket_of_cluster.npy")

    @property
    def clustering_stats(self) -> str:
        """Written last by the fit stage: its completion marker."""
        return self._at("clustering", "fit.json")

    # partitions (items grouped by bucket of clusters, one file per input shard)
    def partition(self, shard: int) -> str:
        return self._at("partitions", f"shard-{shard:05d}.parquet")

    def partition_vectors(self, shard: int) -> str:
        return self._at("partitions", f"shard-{shard:05d}.f32")

    def partition_failed(self, shard: int) -> str:
        return self._at("partitions", f"shard-{shard:05d}.failed.parquet")

    def partition_manifest(self, shard: int) -> str:
        """Written last by a shard's assignment: its completion marker."""
        return self._at("partitions", f"shard-{shard:05d}.json")

    @property
    def partition_index(self) -> str:
        return self._at("partitions", "index.json")

    @property
    def cluster_sizes(self) -> str:
        return self._at("partitions", "cluster_sizes.npy")

    # tuning
    @property
    def tuning_curve(self) -> str:
        return self._at("tuning", "curve.parquet")

    @property
    def tuning_result(self) -> str:
        return self._at("tuning", "result.json")

    # scores
    def scores(self, bucket: int) -> str:
        return self._at("scores", f"bucket-{bucket:05d}.parquet")

    def scores_done(self, bucket: int) -> str:
        return self._at("scores", f"bucket-{bucket:05d}.json")

    # results
    @property
    def kept(self) -> str:
        return self._at("result", "kept.parquet")

    @property
    def removed(self) -> str:
        return self._at("result", "removed.parquet")

    @property
    def failed(self) -> str:
        return self._at("result", "failed.parquet")

    @property
    def removed_spill(self) -> str:
        """finalize's removed rows between its two passes (deleted when it ends)."""
        return self._at("result", "removed.by-shard.parquet")

    @property
    def summary(self) -> str:
        return self._at("result", "summary.json")

    @property
    def report(self) -> str:
        return self._at("report", "index.html")

    # the dataset written back in its own format
    def dataset(self, name: str) -> str:
        return self._at("dataset", name)

    def removed_dataset(self, name: str) -> str:
        return self._at("removed", name)

    def written(self, shard: int) -> str:
        """Which of dataset/removed a shard's writer finished (its completion marker)."""
        return self._at("written", f"shard-{shard:05d}.json")
