"""Keep strategies: the order in which a cluster's items are judged."""

from __future__ import annotations

import numpy as np
import pytest

from semdedup_core.dedup.ordering import cluster_order, distance_key, easy_order, hard_order, metadata_order, random_order


def test_hard_is_least_similar_first_with_ties_in_input_order():
    sims = np.array([0.9, 0.5, 0.7, 0.5, 0.9, 0.1], np.float32)
    assert hard_order(sims).tolist() == [5, 1, 3, 2, 0, 4]


def test_hard_ties_follow_the_float32_key_not_the_raw_similarity():
    # 1 - 1e-9 and 1 - 2e-9 both round to 1.0 in float32: equal keys, so input order decides.
    sims = np.array([2e-9, 1e-9], np.float32)
    assert distance_key(sims).tolist() == [1.0, 1.0]
    assert hard_order(sims).tolist() == [0, 1]


def test_easy_is_exactly_the_reverse_of_hard():
    rng = np.random.default_rng(0)
    sims = rng.choice(np.array([0.1, 0.2, 0.3], np.float32), size=50)  # many ties
    assert easy_order(sims).tolist() == hard_order(sims)[::-1].tolist()


def test_random_is_reproducible_per_seed_and_cluster():
    a = random_order(100, seed=1, cluster=4)
    assert sorted(a.tolist()) == list(range(100))
    assert a.tolist() == random_order(100, seed=1, cluster=4).tolist()
    assert a.tolist() != random_order(100, seed=1, cluster=5).tolist()
    assert a.tolist() != random_order(100, seed=2, cluster=4).tolist()


def test_metadata_ranks_larger_first_then_hard_ties():
    sims = np.array([0.5, 0.2, 0.5, 0.9, 0.2], np.float32)
    quality = np.array([1.0, 3.0, 3.0, np.nan, 1.0])
    order = metadata_order(sims, {"quality": quality}, ["quality"])
    # quality 3 (rows 1, 2: hard tie-break -> row 1 key .8 first), then quality 1 (rows 4 key .8, 0 key .5), NaN last.
    assert order.tolist() == [1, 2, 4, 0, 3]


def test_metadata_ascending_and_several_columns():
    sims = np.zeros(4, np.float32)
    meta = {"width": np.array([10.0, 10.0, 20.0, 20.0]), "blur": np.array([0.3, 0.1, 0.2, 0.2])}
    order = metadata_order(sims, meta, ["width", "blur:asc"])
    assert order.tolist() == [2, 3, 1, 0]


def test_unknown_strategy_and_missing_metadata_are_errors():
    with pytest.raises(ValueError, match="unknown keep strategy"):
        cluster_order("best", np.zeros(3, np.float32), seed=0, cluster=0)
    with pytest.raises(ValueError, match="metadata"):
        cluster_order("metadata", np.zeros(3, np.float32), seed=0, cluster=0)
