"""The paper's eta (appendix A.2), clustering/recall.json: against a brute force over every
pair of the run, on data built so duplicates straddle cluster borders, per seed, and on
degenerate shapes (real runs through run_pipeline, faiss k-means, parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semdedup_core.config import RunConfig
from semdedup_core.dedup.recall import NEAREST_CLUSTERS, SAMPLE_ITEMS, estimate_recall
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.plan import plan_run
from semdedup_core.run.stage_results import RecallEstimate

from .conftest import fast_embeddings, raw_config, run_raw, single_thread, unit_rows

DIM = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def _run(folder: Path, ids: list[str], vectors: np.ndarray, **config) -> tuple[RunConfig, RecallEstimate]:
    fast_embeddings(folder / "in" / "part.parquet", ids, vectors)
    cfg = RunConfig(input=[str(folder / "in" / "part.parquet")], output=str(folder / "run"), **{"kmeans_iterations": 10, **config})
    with single_thread():
        run_pipeline(cfg)
    return cfg, RecallEstimate.model_validate_json((folder / "run" / "clustering" / "recall.json").read_text())


def _brute_force(run: Path, vectors: dict[str, np.ndarray], eps: float, nearest: int) -> tuple[int, int]:
    """(pairs in own cluster, pairs in the nearest clusters) over every clustered item, from
    the stored clusters and centroids and the input vectors: all n^2 pairs compared."""
    scores = pa.concat_tables([pq.read_table(p) for p in sorted((run / "scores").glob("bucket-*[0-9].parquet"))]).to_pydict()
    ids, cluster = scores["id"], np.array(scores["cluster"])
    centroids = np.load(run / "clustering" / "centroids.npy").astype(np.float64)
    y = np.stack([vectors[i] for i in ids]).astype(np.float64)
    sims = (y @ y.T).astype(np.float32)
    duplicate = sims > np.float32(1.0 - eps)
    np.fill_diagonal(duplicate, False)
    to_centroid = y @ centroids.T
    in_cluster = in_nearest = 0
    for i, own in enumerate(cluster):
        others = sorted((c for c in range(len(centroids)) if c != own), key=lambda c: (-to_centroid[i, c], c))
        searched = np.isin(cluster, [own, *others[: nearest - 1]])
        in_nearest += int((duplicate[i] & searched).sum())
        in_cluster += int((duplicate[i] & (cluster == own)).sum())
    return in_cluster, in_nearest


def _topics_with_near_copies(rng: np.random.Generator, n_base: int, n_copies: int, topics: int = 6) -> tuple[list[str], np.ndarray]:
    centers = unit_rows(rng, topics, DIM)
    base = _unit(centers[rng.integers(0, topics, n_base)] + 0.6 * rng.standard_normal((n_base, DIM)) / np.sqrt(DIM))
    copies = _unit(base[rng.integers(0, n_base, n_copies)] + 0.02 * rng.standard_normal((n_copies, DIM)) / np.sqrt(DIM))
    vectors = np.concatenate([base, copies])
    return [f"v-{i:05d}" for i in range(len(vectors))], vectors


def _straddling(rng: np.random.Generator, n_pairs: int) -> tuple[list[str], np.ndarray]:
    """Pairs of near copies spread along the arc between two far-apart directions: k=2
    splits the arc near its middle, so the pairs there fall on both sides of the border."""
    a, b = np.eye(DIM)[0], np.eye(DIM)[1]
    angle = rng.uniform(0, np.pi / 2, n_pairs)
    points = np.cos(angle)[:, None] * a + np.sin(angle)[:, None] * b + 0.01 * rng.standard_normal((n_pairs, DIM))
    partners = points + 0.01 * rng.standard_normal((n_pairs, DIM))
    vectors = _unit(np.concatenate([points, partners]))
    return [f"s-{i:05d}" for i in range(len(vectors))], vectors


def test_eta_equals_a_brute_force_over_every_pair(tmp_path):
    ids, vectors = _topics_with_near_copies(np.random.default_rng(0), 700, 150)
    eps = 0.1
    cfg, estimate = _run(tmp_path, ids, vectors, eps=eps, clusters=8, buckets=3, seed=3)
    # Under SAMPLE_ITEMS items: every item is sampled, so the brute force needs no sample.
    assert estimate.sample_items == len(ids) < SAMPLE_ITEMS
    assert (estimate.eps, estimate.seed, estimate.nearest_clusters, estimate.skipped) == (eps, 3, NEAREST_CLUSTERS, None)
    in_cluster, in_nearest = _brute_force(Path(cfg.output), dict(zip(ids, vectors)), eps, NEAREST_CLUSTERS)
    assert (estimate.pairs_in_cluster, estimate.pairs_in_nearest) == (in_cluster, in_nearest)
    assert in_nearest >= 2 * 150  # each planted pair, counted from both of its items
    assert estimate.eta == in_cluster / in_nearest


def test_one_cluster_finds_every_pair_in_it(tmp_path):
    ids, vectors = _topics_with_near_copies(np.random.default_rng(1), 300, 60)
    _, estimate = _run(tmp_path, ids, vectors, eps=0.1, clusters=1)
    assert estimate.nearest_clusters == 1
    assert estimate.pairs_in_nearest >= 2 * 60 and estimate.pairs_in_cluster == estimate.pairs_in_nearest
    assert estimate.eta == 1.0


def test_duplicates_straddling_cluster_borders_lower_eta(tmp_path):
    ids, vectors = _straddling(np.random.default_rng(2), 400)
    eps = 0.01
    cfg, estimate = _run(tmp_path, ids, vectors, eps=eps, clusters=2)
    in_cluster, in_nearest = _brute_force(Path(cfg.output), dict(zip(ids, vectors)), eps, 2)
    assert (estimate.pairs_in_cluster, estimate.pairs_in_nearest) == (in_cluster, in_nearest)
    assert estimate.pairs_in_cluster < estimate.pairs_in_nearest
    assert estimate.eta is not None and 0 < estimate.eta < 1


def test_the_sample_is_determined_by_the_seed(tmp_path):
    ids, vectors = _topics_with_near_copies(np.random.default_rng(3), 800, 300)
    cfg, _ = _run(tmp_path, ids, vectors, eps=0.1, clusters=6, buckets=2, seed=5)
    plan = plan_run(cfg)  # the finished run, resumed
    first = estimate_recall(plan, 0.1, sample_items=60)
    assert first == estimate_recall(plan, 0.1, sample_items=60)
    assert first.sample_items == 60 and first.pairs_in_cluster <= first.pairs_in_nearest
    # Other seeds draw other samples: the pair counts of a few of them are not all the same.
    others = {estimate_recall(plan.model_copy(update={"config": cfg.model_copy(update={"seed": s})}), 0.1, sample_items=60).pairs_in_nearest for s in range(4)}
    assert len(others) > 1
    # A second run of the same configuration writes the same estimate.
    _, again = _run(tmp_path / "again", ids, vectors, eps=0.1, clusters=6, buckets=2, seed=5)
    assert again == RecallEstimate.model_validate_json((Path(cfg.output) / "clustering" / "recall.json").read_text())


def test_target_keep_runs_estimate_at_the_final_eps(tmp_path):
    ids, vectors = _topics_with_near_copies(np.random.default_rng(4), 500, 200)
    cfg, estimate = _run(tmp_path, ids, vectors, target_keep=0.8, clusters=4)
    summary = json.loads((Path(cfg.output) / "result" / "summary.json").read_text())
    assert estimate.eps == summary["eps"]
    assert (estimate.pairs_in_cluster, estimate.pairs_in_nearest) == _brute_force(Path(cfg.output), dict(zip(ids, vectors)), summary["eps"], NEAREST_CLUSTERS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 9),
    shape=st.sampled_from(["random", "identical", "pairs"]),
    clusters=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_degenerate_shapes_match_the_brute_force(tmp_path_factory, n, shape, clusters, seed):
    rng = np.random.default_rng(seed)
    if shape == "identical":
        vectors = np.repeat(unit_rows(rng, 1, DIM), n, axis=0)
    elif shape == "pairs":  # every item has a near copy: small clusters of two
        half = unit_rows(rng, (n + 1) // 2, DIM)
        vectors = _unit(np.concatenate([half, half + 0.001 * rng.standard_normal(half.shape)]))[:n]
    else:
        vectors = unit_rows(rng, n, DIM)
    ids = [f"d-{i}" for i in range(n)]
    k = min(clusters, n)  # one item per cluster where k == n
    cfg, estimate = _run(tmp_path_factory.mktemp("shape"), ids, vectors, eps=0.05, clusters=k, seed=seed)
    if n < 2:
        assert estimate.skipped and estimate.sample_items == 0 and estimate.eta is None
        return
    assert estimate.skipped is None and estimate.sample_items == n
    assert estimate.nearest_clusters == min(NEAREST_CLUSTERS, k)
    in_cluster, in_nearest = _brute_force(Path(cfg.output), dict(zip(ids, vectors)), 0.05, estimate.nearest_clusters)
    assert (estimate.pairs_in_cluster, estimate.pairs_in_nearest) == (in_cluster, in_nearest)
    assert estimate.eta == (in_cluster / in_nearest if in_nearest else None)
    if shape == "identical":  # every ordered pair is a duplicate, found wherever the copies landed
        assert in_nearest == n * (n - 1)


def test_collection_generations_skip_and_the_base_estimates(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / "in"
    ids, vectors = _topics_with_near_copies(rng, 200, 40)
    fast_embeddings(folder / "night1.parquet", ids, vectors)
    cfg = RunConfig(input=[str(folder)], output=str(tmp_path / "coll"), collection=True, eps=0.1, clusters=4, kmeans_iterations=10)
    with single_thread():
        run_pipeline(cfg)
        fast_embeddings(folder / "night2.parquet", [f"n2-{i}" for i in range(30)], unit_rows(rng, 30, DIM))
        run_pipeline(cfg)
    base = RecallEstimate.model_validate_json((tmp_path / "coll" / "generations" / "g-00000" / "clustering" / "recall.json").read_text())
    generation = RecallEstimate.model_validate_json((tmp_path / "coll" / "generations" / "g-00001" / "clustering" / "recall.json").read_text())
    assert base.skipped is None and base.sample_items == 240 and base.eta is not None
    assert generation.skipped and "generation" in generation.skipped and generation.eta is None and generation.sample_items == 0


def test_raw_text_run_estimates_on_its_own_embeddings(tmp_path, tiny_bert):
    corpus = tmp_path / "corpus.jsonl"
    words = [f"w{i}" for i in range(60)]
    rng = np.random.default_rng(7)
    texts = [" ".join(rng.choice(words, 12)) for _ in range(40)]
    texts += [t + " w1" for t in texts[:10]]  # near copies
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = raw_config([corpus], tmp_path / "run", model=str(tiny_bert), eps=0.05)
    results = run_raw(cfg)
    estimate = RecallEstimate.model_validate_json((tmp_path / "run" / "clustering" / "recall.json").read_text())
    assert estimate.skipped is None and estimate.sample_items == results.summary["n_embedded"]
    assert estimate.pairs_in_cluster <= estimate.pairs_in_nearest


def test_object_storage_run_estimates_as_a_local_run(tmp_path, moto_s3):
    """s3:// in and out on moto's HTTP server (the sampled rows are ranged GETs from worker
    threads): the estimate equals the local run's."""
    ids, vectors = _topics_with_near_copies(np.random.default_rng(8), 400, 100)
    local_cfg, local = _run(tmp_path, ids, vectors, eps=0.1, clusters=5, buckets=2)
    bucket = moto_s3.new_bucket("recall")
    source = moto_s3.upload(tmp_path / "in" / "part.parquet", bucket, "in/part.parquet")
    cfg = local_cfg.model_copy(update={"input": [source], "output": f"s3://{bucket}/run"})
    with single_thread():
        run_pipeline(cfg)
    remote = RecallEstimate.model_validate_json(moto_s3.get(bucket, "run/clustering/recall.json"))
    assert remote == local and remote.sample_items == len(ids) and remote.eta is not None
