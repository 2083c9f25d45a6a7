"""Two-level spherical k-means: exactly k unit centroids, deterministic for a seed, close to
flat k-means on clustered data, robust to tiny, skewed and duplicated samples; and a run with
kmeans_method='two-level' accounts every item."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.config import KMEANS_TWO_LEVEL_MIN_CLUSTERS, ConfigError, RunConfig
from semdedup_core.dedup.clustering import fit_spherical_kmeans, resolve_kmeans_method
from semdedup_core.run.dag import run_pipeline

from .conftest import RunResults, single_thread, unit_rows, write_embeddings
from .test_cli import cli
from .test_cli_errors import one_error_line


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted_blobs(rng: np.random.Generator, blobs: int, dim: int, cosine: float, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs on the sphere: rows at cosine ~`cosine` to their blob's random centre."""
    centres = unit_rows(rng, blobs, dim)
    truth = np.repeat(np.arange(blobs), sizes)
    noise = rng.standard_normal((len(truth), dim)).astype(np.float32) * np.float32(np.sqrt((1 - cosine) / dim))
    return _unit(np.float32(np.sqrt(cosine)) * centres[truth] + noise), truth


def purity(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of rows in the majority planted blob of their found cluster."""
    table = np.zeros((found.max() + 1, truth.max() + 1), np.int64)
    np.add.at(table, (found, truth), 1)
    return float(table.max(axis=1).sum() / len(truth))


def adjusted_purity(found: np.ndarray, truth: np.ndarray) -> float:
    """Harmonic mean of purity and inverse purity: splitting a blob costs as merging two."""
    p, q = purity(found, truth), purity(truth, found)
    return 2 * p * q / (p + q)


def check_fit(fit, sample: np.ndarray, k: int) -> None:
    """What every fit owes its caller, whatever the method."""
    assert fit.centroids.shape == (k, sample.shape[1]) and fit.centroids.dtype == np.float32
    assert np.all(np.isfinite(fit.centroids))
    np.testing.assert_allclose(np.linalg.norm(fit.centroids.astype(np.float64), axis=1), 1.0, atol=1e-5)
    assert fit.labels.shape == (len(sample),) and fit.labels.min() >= 0 and fit.labels.max() < k
    # final_objective is the inner product of each row with the centroid it is labelled with.
    own = np.einsum("ij,ij->i", sample.astype(np.float64), fit.centroids[fit.labels].astype(np.float64))
    assert fit.final_objective == pytest.approx(own.sum(), rel=1e-5, abs=1e-4)
    assert len(fit.objective) == len(fit.imbalance) >= 1
    assert all(i >= 1 - 1e-6 for i in fit.imbalance)  # k * sum(size^2) / n^2 >= 1


def distinct_count(x: np.ndarray) -> int:
    return len(np.unique(x, axis=0))


# ---------------------------------------------------------------- quality on planted blobs


@pytest.mark.parametrize("seed", [0, 1])
def test_two_level_recovers_planted_blobs_about_as_well_as_flat(seed):
    rng = np.random.default_rng(seed)
    blobs = 150
    sizes = rng.integers(20, 60, blobs)  # unequal blobs, as real clusters
    sample, truth = planted_blobs(rng, blobs, dim=48, cosine=0.6, sizes=sizes)
    with single_thread():
        flat = fit_spherical_kmeans(sample, blobs, iterations=20, seed=seed, method="flat")
        two = fit_spherical_kmeans(sample, blobs, iterations=20, seed=seed, method="two-level")
    check_fit(two, sample, blobs)
    assert two.method == "two-level" and two.coarse_clusters == round(np.sqrt(blobs))
    # The same measure for both: every row to its nearest centroid among all k.
    flat_obj = (sample @ flat.centroids.T).max(axis=1).astype(np.float64).sum()
    two_obj = (sample @ two.centroids.T).max(axis=1).astype(np.float64).sum()
    # The planted blobs' own centroids are the reference; k-means' local optima (flat's
    # included) land a few percent below it.
    planted = _unit(np.stack([sample[truth == b].mean(axis=0) for b in range(blobs)]))
    planted_obj = (sample @ planted.T).max(axis=1).astype(np.float64).sum()
    assert two_obj >= 0.97 * flat_obj
    assert two_obj >= 0.95 * planted_obj
    nearest = (sample @ two.centroids.T).argmax(axis=1)
    assert adjusted_purity(nearest, truth) >= adjusted_purity((sample @ flat.centroids.T).argmax(axis=1), truth) - 0.03


def test_two_level_objective_is_reported_per_iteration_and_refinement_improves_it():
    rng = np.random.default_rng(3)
    sample, _ = planted_blobs(rng, 80, dim=32, cosine=0.5, sizes=np.full(80, 30))
    with single_thread():
        fit = fit_spherical_kmeans(sample, 80, iterations=6, seed=3, method="two-level")
    check_fit(fit, sample, 80)
    assert len(fit.coarse_objective) == len(fit.coarse_imbalance) >= 1
    # Refinement iterations only ever move a row to a better centroid, and the fit's final
    # objective is that of its final centroids: never below the last iteration's.
    refinement = fit.objective[6:]
    assert refinement and all(b >= a - 1e-3 for a, b in zip(refinement, refinement[1:]))
    assert fit.final_objective >= refinement[-1] - 1e-3
    stats = fit.stats()
    assert stats["method"] == "two-level" and stats["coarse_clusters"] == 9
    assert stats["objective"] == fit.objective and stats["final_objective"] == fit.final_objective


# ---------------------------------------------------------------- any shape, any seed


@st.composite
def samples(draw):
    n = draw(st.integers(1, 120))
    k = draw(st.one_of(st.integers(1, n), st.integers(max(1, n - 3), n)))  # often k close to n
    dim = draw(st.integers(2, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    distinct = draw(st.integers(1, n))  # duplicates when distinct < n
    skew = draw(st.booleans())  # most rows copies of a few directions: lopsided coarse cells
    rng = np.random.default_rng(seed)
    pool = unit_rows(rng, distinct, dim)
    if skew:
        weights = np.r_[[50.0], np.ones(distinct - 1)]
        rows = rng.choice(distinct, size=n, p=weights / weights.sum())
        rows[:distinct] = np.arange(distinct)  # every pool row at least once
    else:
        rows = rng.integers(0, distinct, n)
        rows[:distinct] = np.arange(distinct)
    return pool[rng.permutation(rows)], k, seed


@settings(max_examples=40, deadline=None)
@given(case=samples(), iterations=st.integers(1, 4))
def test_any_small_sample_gives_exactly_k_unit_centroids_deterministically(case, iterations):
    sample, k, seed = case
    with single_thread():
        fit = fit_spherical_kmeans(sample, k, iterations, seed, method="two-level")
        again = fit_spherical_kmeans(sample, k, iterations, seed, method="two-level")
    check_fit(fit, sample, k)
    assert fit.centroids.tobytes() == again.centroids.tobytes()
    assert np.array_equal(fit.labels, again.labels) and fit.objective == again.objective
    distinct = distinct_count(sample)
    if distinct >= k:  # enough distinct points: no two centroids alike
        assert distinct_count(fit.centroids) == k
    if distinct <= k:  # every distinct point is a centroid: each row sits on its own
        assert fit.final_objective == pytest.approx(len(sample), rel=1e-5)


def test_fewer_distinct_points_than_clusters_still_gives_k_centroids():
    rng = np.random.default_rng(7)
    pool = unit_rows(rng, 5, 8)
    sample = pool[np.r_[np.zeros(40, int), np.arange(5)]]  # 45 rows, 5 distinct, one dominant
    with single_thread():
        fit = fit_spherical_kmeans(sample, 20, 5, seed=7, method="two-level")
    check_fit(fit, sample, 20)
    assert distinct_count(fit.centroids) == 5  # the sample's own points, some repeated
    assert fit.final_objective == pytest.approx(len(sample), rel=1e-5)


# ---------------------------------------------------------------- choosing the method


def test_auto_picks_two_level_from_the_threshold_on():
    assert resolve_kmeans_method("auto", KMEANS_TWO_LEVEL_MIN_CLUSTERS) == "two-level"
    assert resolve_kmeans_method("auto", KMEANS_TWO_LEVEL_MIN_CLUSTERS - 1) == "flat"
    assert resolve_kmeans_method("flat", 10**6) == "flat"
    assert resolve_kmeans_method("two-level", 2) == "two-level"


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="kmeans_method"):
        RunConfig.load(input=["x.parquet"], output="out", kmeans_method="hierarchical")


def test_unknown_method_on_the_command_line_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMDEDUP_LOG_DIR", str(tmp_path / "logs"))
    out = tmp_path / "out"
    proc = cli(["run", "x.parquet", "--output", str(out), "--kmeans-method", "hierarchical"], tmp_path)
    one_error_line(proc, 2, "--kmeans-method", "hierarchical", "two-level")
    assert not out.exists()


# ---------------------------------------------------------------- a whole run


def test_run_with_two_level_kmeans_accounts_every_item(tmp_path):
    rng = np.random.default_rng(11)
    sample, _ = planted_blobs(rng, 12, dim=16, cosine=0.8, sizes=rng.integers(5, 40, 12))
    vectors = np.concatenate([sample, sample[:15]])  # exact copies to remove
    ids = [f"row-{i}" for i in range(len(vectors))]
    write_embeddings(tmp_path / "data" / "part-0.parquet", ids[:100], vectors[:100])
    write_embeddings(tmp_path / "data" / "part-1.parquet", ids[100:], vectors[100:])
    cfg = RunConfig(input=[str(tmp_path / "data" / "*.parquet")], output=str(tmp_path / "out"), clusters=20, kmeans_method="two-level", eps=0.05, seed=1)
    with single_thread():
        run_pipeline(cfg)
    res = RunResults(tmp_path / "out")
    res.check_accounting(ids)
    assert {r["id"] for r in res.removed} >= set(ids[len(sample) :]) - {r["id"] for r in res.failed}
    fit = json.loads((tmp_path / "out" / "clustering" / "fit.json").read_text())
    assert fit["method"] == "two-level" and fit["clusters"] == 20 and fit["coarse_clusters"] == 4
    assert len(np.load(tmp_path / "out" / "clustering" / "centroids.npy")) == 20
