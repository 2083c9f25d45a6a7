"""Where each artifact of a run lives (docs/architecture.md §"Run layout"). Every other module asks here for a URL."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from semdedup_core.storage import join, temp_target

_SHARD = r"shard-\d{5,}"
_BUCKET = r"bucket-\d{5,}"
# Every file a run writes, by folder ("" is the run folder itself). Written-back datasets are
# named after the input files, so those two folders are matched against the run's inputs.
_ARTIFACTS = {
    "": re.compile(r"run\.json|lease\.json"),
    "plans": re.compile(r"[0-9a-f]{32}\.json"),
    "scan": re.compile(rf"{_SHARD}\.(?:parquet|json)"),
    "exact": re.compile(r"duplicates\.parquet|index\.json"),
    "embeddings": re.compile(rf"{_SHARD}(?:\.failed)?\.parquet|{_SHARD}\.json"),
    "clustering": re.compile(r"centroids\.npy|bucket_of_cluster\.npy|fit\.json|recall\.json"),
    "partitions": re.compile(rf"{_SHARD}(?:\.parquet|\.f32|\.failed\.parquet|\.json)|index\.json|cluster_sizes\.npy"),
    "tuning": re.compile(rf"curve\.parquet|result\.json|sample\.json|sample-{_BUCKET}\.parquet"),
    "scores": re.compile(rf"{_BUCKET}\.(?:parquet|json|earlier\.parquet)"),
    "result": re.compile(r"(?:kept|removed|failed|removed\.by-shard)\.parquet|summary\.json|similarity\.json|pairs\.parquet"),
    "report": re.compile(r"index\.html|report\.json"),
    "written": re.compile(rf"{_SHARD}\.json"),
    "reference": re.compile(rf"{_BUCKET}\.(?:parquet|json)"),
}
# Each reference set's own embedding and assignment artifacts, laid out as a run folder.
_REFERENCE_RUN = re.compile(r"reference/r-\d{5,}/(.+)")
_DATASET_FOLDERS = ("dataset", "removed")
_IMAGE_LIST = re.compile(r"images-\d{5,}\.txt")
# What on_existing='reuse-embeddings' keeps of an earlier run.
EMBEDDING_FOLDERS = ("scan", "exact", "embeddings")
ARTIFACT_FOLDERS = tuple(f for f in _ARTIFACTS if f) + _DATASET_FOLDERS


def is_artifact(relative: str, dataset_names: frozenset[str] = frozenset()) -> bool:
    """Whether ``relative`` (a path inside a run folder) is a file a run of ours writes there.

    ``dataset_names``: the input file names the run writes back under dataset/ and removed/.
    """
    nested = _REFERENCE_RUN.fullmatch(relative)
    if nested is not None:
        return not nested.group(1).startswith("reference/") and is_artifact(nested.group(1))
    folder, name = posixpath.split(relative)
    if folder in _DATASET_FOLDERS:
        return name in dataset_names or _IMAGE_LIST.fullmatch(name) is not None
    pattern = _ARTIFACTS.get(folder)
    return pattern is not None and pattern.fullmatch(name) is not None


def is_temp_artifact(relative: str, dataset_names: frozenset[str] = frozenset()) -> bool:
    """Whether ``relative`` is a temporary file an interrupted write of one of our artifacts left."""
    folder, name = posixpath.split(relative)
    target = temp_target(name)
    return target is not None and is_artifact(posixpath.join(folder, target), dataset_names)


@dataclass(frozen=True)
class RunLayout:
    root: str
    # A rethreshold run (semdedup_core/run/rethreshold.py) reads the eps-independent stage
    # artifacts (scan, exact, embeddings, clustering fit, partitions) of the run it derives
    # from, read-only, and writes everything else under its own root.
    stages_root: str | None = None

    def _at(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _stage(self, *parts: str) -> str:
        return join(self.stages_root or self.root, *parts)

    @property
    def run_json(self) -> str:
        return self._at("run.json")

    def plan(self, digest: str) -> str:
        """The run plan with this content digest, which tasks load instead of carrying it."""
        return self._at("plans", f"{digest}.json")

    @property
    def lease(self) -> str:
        return self._at("lease.json")

    # embedding stage (raw inputs): scan, exact duplicates, embeddings
    def scan(self, shard: int) -> str:
        return self._stage("scan", f"shard-{shard:05d}.parquet")

    def scan_done(self, shard: int) -> str:
        return self._stage("scan", f"shard-{shard:05d}.json")

    @property
    def exact_duplicates(self) -> str:
        return self._stage("exact", "duplicates.parquet")

    @property
    def exact_done(self) -> str:
        return self._stage("exact", "index.json")

    def embeddings(self, shard: int) -> str:
        return self._stage("embeddings", f"shard-{shard:05d}.parquet")

    def embeddings_failed(self, shard: int) -> str:
        return self._stage("embeddings", f"shard-{shard:05d}.failed.parquet")

    def embeddings_done(self, shard: int) -> str:
        """Written last by a shard's embedding: its completion marker."""
        return self._stage("embeddings", f"shard-{shard:05d}.json")

    # clustering
    @property
    def centroids(self) -> str:
        return self._stage("clustering", "centroids.npy")

    @property
    def bucket_of_cluster(self) -> str:
        return self._stage("clustering", "bucket_of_cluster.npy")

    @property
    def clustering_stats(self) -> str:
        """Written last by the fit stage: its completion marker."""
        return self._stage("clustering", "fit.json")

    @property
    def recall_estimate(self) -> str:
        """The paper's eta: the share of duplicate pairs the cluster-local search finds."""
        return self._at("clustering", "recall.json")

    # partitions (items grouped by bucket of clusters, one file per input shard)
    def partition(self, shard: int) -> str:
        return self._stage("partitions", f"shard-{shard:05d}.parquet")

    def partition_vectors(self, shard: int) -> str:
        return self._stage("partitions", f"shard-{shard:05d}.f32")

    def partition_failed(self, shard: int) -> str:
        return self._stage("partitions", f"shard-{shard:05d}.failed.parquet")

    def partition_manifest(self, shard: int) -> str:
        """Written last by a shard's assignment: its completion marker."""
        return self._stage("partitions", f"shard-{shard:05d}.json")

    @property
    def partition_index(self) -> str:
        return self._stage("partitions", "index.json")

    @property
    def cluster_sizes(self) -> str:
        return self._stage("partitions", "cluster_sizes.npy")

    # tuning
    @property
    def tuning_curve(self) -> str:
        return self._at("tuning", "curve.parquet")

    @property
    def tuning_result(self) -> str:
        """The eps used for target_keep (sampled, or met on all items), written last."""
        return self._at("tuning", "result.json")

    @property
    def tuning_prediction(self) -> str:
        """The sampled prediction: the tune stage's completion marker."""
        return self._at("tuning", "sample.json")

    def tuning_sample(self, bucket: int) -> str:
        """The tuning sample's scores in a bucket, reused by the dedup stage."""
        return self._at("tuning", f"sample-bucket-{bucket:05d}.parquet")

    # scores
    def scores(self, bucket: int) -> str:
        return self._at("scores", f"bucket-{bucket:05d}.parquet")

    def scores_done(self, bucket: int) -> str:
        return self._at("scores", f"bucket-{bucket:05d}.json")

    def scores_earlier(self, bucket: int) -> str:
        """A collection generation's bucket: the earlier items its new items were removed for."""
        return self._at("scores", f"bucket-{bucket:05d}.earlier.parquet")

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
    def similarity(self) -> str:
        """The judged items' max_sim histogram (eps-independent), written by finalize."""
        return self._at("result", "similarity.json")

    @property
    def pairs(self) -> str:
        """finalize's seeded sample of (removed or kept item, its most similar earlier item) for the report."""
        return self._at("result", "pairs.parquet")

    @property
    def summary(self) -> str:
        return self._at("result", "summary.json")

    @property
    def report(self) -> str:
        return self._at("report", "index.html")

    @property
    def report_done(self) -> str:
        """Written last by the report step: its completion marker."""
        return self._at("report", "report.json")

    # the dataset written back in its own format
    def dataset(self, name: str) -> str:
        return self._at("dataset", name)

    def removed_dataset(self, name: str) -> str:
        return self._at("removed", name)

    def written(self, shard: int) -> str:
        """Which of dataset/removed a shard's writer finished (its completion marker)."""
        return self._at("written", f"shard-{shard:05d}.json")

    # reference sets (docs/architecture.md §"Reference sets")
    def reference_run(self, index: int) -> str:
        """The folder holding reference set ``index``'s embeddings and partitions."""
        return self._at("reference", f"r-{index:05d}")

    def reference_scores(self, bucket: int) -> str:
        """A bucket's items: their most similar reference item (eps-independent)."""
        return self._at("reference", f"bucket-{bucket:05d}.parquet")

    def reference_done(self, bucket: int) -> str:
        return self._at("reference", f"bucket-{bucket:05d}.json")
