"""Tuning eps to a target kept fraction (paper §6.5)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core.config import RunConfig
from semdedup_core.run.dag import run_pipeline
from semdedup_core.dedup.tuning import choose_eps, kept_fraction, sample_clusters

from .test_targets import nearest_reachable_kept


def test_kept_fraction_counts_first_items_as_kept_and_is_strict():
    max_sim = np.array([np.nan, 0.5, 0.9, 0.99], np.float32)
    assert kept_fraction(max_sim, 0.5).tolist() == 0.5  # 0.5 is not > 0.5: NaN and 0.5 kept
    assert kept_fraction(max_sim, np.array([0.001, 0.05, 0.6])).tolist() == [1.0, 0.75, 0.25]


def test_choose_eps_interpolates_between_bracketing_points():
    rng = np.random.default_rng(0)
    max_sim = (1 - rng.uniform(0, 0.2, 200_000)).astype(np.float32)  # kept(eps) = 1 - 5 * eps on [0, 0.2]
    eps, predicted, grid, kept = choose_eps(max_sim, 0.37)
    assert abs(eps - 0.126) < 5e-4
    assert abs(predicted - 0.37) < 2e-3
    assert np.all(np.diff(kept) <= 0) and np.all(np.diff(grid) > 0)


def test_sample_clusters_is_seeded_and_skips_empty_clusters():
    sizes = np.array([0, 5, 3, 0, 7, 1, 2, 9, 4, 6, 8, 0])
    chosen = sample_clusters(sizes, 0.3, seed=1)
    assert len(chosen) == 3 and np.all(sizes[chosen] > 0)
    assert chosen.tolist() == sample_clusters(sizes, 0.3, seed=1).tolist()


def _synthetic_corpus(folder, n_base=200_000, n_copies=100_000, dim=32, shards=4, seed=0):
    """Items around 64 topics, plus copies of random items at log-uniform noise levels, so the
    kept fraction falls smoothly as eps grows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim))
    base = centers[rng.integers(0, 64, n_base)] + 0.6 * rng.standard_normal((n_base, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noise = np.exp(rng.uniform(np.log(0.002), np.log(0.2), n_copies))[:, None]
    copies = base[rng.integers(0, n_base, n_copies)] + noise * rng.standard_normal((n_copies, dim)) / np.sqrt(dim)
    vectors = np.concatenate([base, copies]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.array([f"s{i}" for i in range(len(vectors))])
    order = rng.permutation(len(vectors))
    for s, part in enumerate(np.array_split(order, shards)):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors[part].reshape(-1)), dim)
        pq.write_table(pa.table({"id": ids[part], "embedding": emb}), folder / f"part-{s}.parquet")
    return str(folder / "part-*.parquet")


@pytest.mark.parametrize("target", [0.72, 0.88])
def test_target_met_to_the_item_and_predicted_within_half_a_point(tmp_path_factory, target):
    data = tmp_path_factory.getbasetemp() / "tuning-corpus"
    if not data.exists():
        data.mkdir()
        _synthetic_corpus(data)
    out = tmp_path_factory.mktemp("tuned")
    cfg = RunConfig(input=[str(data / "part-*.parquet")], output=str(out), clusters=300, target_keep=target, seed=3)
    summary = run_pipeline(cfg)
    assert summary.n_input == 300_000 and summary.n_failed == 0
    max_sim = [v for f in sorted((out / "scores").glob("*.parquet")) for v in pq.read_table(f, columns=["max_sim"]).column("max_sim").to_pylist()]
    wanted, nearest = nearest_reachable_kept(max_sim, target, 300_000)
    assert summary.tuning == "exact" and summary.n_kept in nearest, (summary, wanted, nearest)
    assert abs(summary.predicted_kept_fraction - target) <= 0.005, summary
    curve = pq.read_table(out / "tuning" / "curve.parquet")
    assert curve.column_names == ["eps", "predicted_kept_fraction"]
    tuned = json.loads((out / "tuning" / "result.json").read_text())
    # 10 % of the clusters, grown until they hold 10 % of the items.
    assert tuned["sample_clusters"] >= 30 and tuned["sample_items"] >= 30_000 and tuned["eps"] == summary.eps
