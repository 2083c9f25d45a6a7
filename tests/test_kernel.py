"""The dedup kernel against hand-computed values, a brute force and the paper's reference rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.dedup.kernel import cluster_max_sim, first_copy_mask, removed_mask, screening_band
from semdedup_core.dedup.ordering import cluster_order, easy_order, hard_order

from .conftest import unit_rows

# Six 4-d unit vectors whose dot products are exact multiples of 1/4 (no rounding anywhere).
HAND = np.array(
    [
        [0.5, 0.5, 0.5, 0.5],  # 0 A
        [1.0, 0.0, 0.0, 0.0],  # 1 B
        [0.5, 0.5, 0.5, -0.5],  # 2 C
        [0.0, 1.0, 0.0, 0.0],  # 3 D
        [0.5, 0.5, 0.5, 0.5],  # 4 E, an exact copy of A
        [0.5, 0.5, -0.5, -0.5],  # 5 F
    ],
    dtype=np.float32,
)
HAND_CENTROID = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


def brute_force(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full N x N in float64, rounded once to float32; earliest argmax over strictly earlier rows."""
    n = len(y)
    sims = (y.astype(np.float64) @ y.astype(np.float64).T).astype(np.float32)
    sims[np.triu_indices(n)] = -np.inf
    max_sim = sims.max(axis=1) if n else np.zeros(0, np.float32)
    dup_of = sims.argmax(axis=1) if n else np.zeros(0, np.int64)
    if n:
        max_sim[0], dup_of[0] = np.nan, -1
    return max_sim, dup_of


def reference_removed(y: np.ndarray, eps: float) -> np.ndarray:
    """The paper's reference rule: fp32 S = Y Y^T, triu(diagonal=1), max over dim 0, > 1 - eps."""
    yt = torch.from_numpy(y)
    triu = torch.triu(yt @ yt.T, diagonal=1)
    return (triu.max(dim=0).values > 1 - eps).numpy()


def planted_cluster(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Random unit rows with exact copies (ties) and near-copies planted."""
    y = unit_rows(rng, n, dim)
    m = max(1, n // 5)
    y[rng.integers(0, n, m)] = y[rng.integers(0, n, m)]
    near_dst, near_src = rng.integers(0, n, m), rng.integers(0, n, m)
    y[near_dst] = y[near_src] + 1e-3 * rng.standard_normal((m, dim)).astype(np.float32)
    y[near_dst] /= np.linalg.norm(y[near_dst], axis=1, keepdims=True)
    return y


def test_hand_computed_hard_order():
    centroid_sim = HAND @ HAND_CENTROID  # A .5, B 1, C .5, D 0, E .5, F .5
    order = cluster_order("hard", centroid_sim, seed=0, cluster=0)
    # key = 1 - sim descending: D (1), then A, C, E, F (0.5, input order), then B (0).
    assert order.tolist() == [3, 0, 2, 4, 5, 1]
    result = cluster_max_sim(HAND[order], tile_size=2)
    # D first (null); A.D=.5; C ties D and A at .5 -> D; E.A=1; F ties D and C at .5 -> D; B ties A..F at .5 -> A.
    np.testing.assert_array_equal(result.max_sim, np.array([np.nan, 0.5, 0.5, 1.0, 0.5, 0.5], np.float32))
    assert result.dup_of.tolist() == [-1, 0, 0, 1, 0, 1]
    # eps = 0.5: threshold exactly 0.5, strict: only E (max_sim 1) goes.
    assert (~removed_mask(result.max_sim, 0.5)).tolist() == [True, True, True, False, True, True]
    # eps = 0.6: threshold 0.4: everything after the first item goes.
    assert (~removed_mask(result.max_sim, 0.6)).tolist() == [True, False, False, False, False, False]


def test_hand_computed_easy_order_is_the_reverse():
    centroid_sim = HAND @ HAND_CENTROID
    order = cluster_order("easy", centroid_sim, seed=0, cluster=0)
    assert order.tolist() == [1, 5, 4, 2, 0, 3]  # B, F, E, C, A, D
    result = cluster_max_sim(HAND[order], tile_size=4)
    np.testing.assert_array_equal(result.max_sim, np.array([np.nan, 0.5, 0.5, 0.5, 1.0, 0.5], np.float32))
    # F.B=.5; E ties B,F? E.F=0 -> B; C ties B,F,E -> B; A.E=1 -> E (position 2); D.F=.5 earliest -> F (position 1).
    assert result.dup_of.tolist() == [-1, 0, 0, 0, 2, 1]


@pytest.mark.parametrize("strategy", ["hard", "easy", "random"])
def test_kernel_equals_brute_force_with_ties_and_near_duplicates(strategy):
    rng = np.random.default_rng(7)
    for trial in range(6):
        n, dim = int(rng.integers(2, 300)), int(rng.choice([3, 8, 64, 257]))
        y = planted_cluster(rng, n, dim)
        centroid = y.mean(axis=0)
        centroid /= np.linalg.norm(centroid)
        order = cluster_order(strategy, y @ centroid, seed=3, cluster=trial)
        ordered = y[order]
        expected_sim, expected_dup = brute_force(ordered)
        got = cluster_max_sim(ordered, tile_size=int(rng.integers(1, 80)))
        np.testing.assert_array_equal(got.max_sim, expected_sim)
        np.testing.assert_array_equal(got.dup_of, expected_dup)


def test_planted_exact_copies_point_to_the_earliest_copy():
    rng = np.random.default_rng(1)
    base = unit_rows(rng, 20, 16)
    y = np.concatenate([base, base[[3] * 50], base[[7] * 30]])  # 80 exact copies
    result = cluster_max_sim(y, tile_size=16)
    copies = np.arange(20, 100)
    assert set(result.dup_of[copies[:50]].tolist()) == {3}
    assert set(result.dup_of[copies[50:]].tolist()) == {7}
    assert result.max_sim[copies].min() > np.float32(0.9999)


def test_identical_results_for_every_tile_size():
    rng = np.random.default_rng(11)
    y = planted_cluster(rng, 301, 48)
    reference = cluster_max_sim(y, tile_size=301)
    for tile in (1, 2, 3, 7, 64, 100, 150, 256, 300, 302, 4096):
        got = cluster_max_sim(y, tile_size=tile)
        np.testing.assert_array_equal(got.max_sim, reference.max_sim, err_msg=f"tile {tile}")
        np.testing.assert_array_equal(got.dup_of, reference.dup_of, err_msg=f"tile {tile}")


def test_item_exactly_at_the_threshold_is_kept():
    x2 = np.array([0.6, 0.8], dtype=np.float32)
    y = np.stack([np.array([1.0, 0.0], np.float32), x2])
    result = cluster_max_sim(y, tile_size=1)
    assert result.max_sim[1] == np.float32(0.6)
    assert np.float32(1 - 0.4) == np.float32(0.6)
    assert not removed_mask(result.max_sim, 0.4)[1]  # equal: kept
    assert removed_mask(result.max_sim, 0.40001)[1]  # threshold just below: removed


def test_same_keep_set_as_the_papers_reference_for_hard_and_easy():
    rng = np.random.default_rng(5)
    y = planted_cluster(rng, 400, 32)
    centroid = y.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    band = screening_band(y.shape[1])
    for order in (hard_order(y @ centroid), easy_order(y @ centroid)):
        ordered = y[order]
        result = cluster_max_sim(ordered, tile_size=37)
        for eps in np.linspace(0.001, 0.999, 97):
            threshold = np.float32(1 - eps)
            near = np.abs(np.nan_to_num(result.max_sim, nan=-9) - threshold) <= band
            assert not near.any(), "test data must not sit in the rounding band"
            np.testing.assert_array_equal(removed_mask(result.max_sim, eps), reference_removed(ordered, eps))


def test_first_copy_mask_marks_first_of_each_identical_group():
    y = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0.5], [0, 1], [1, 0]], dtype=np.float32)
    assert first_copy_mask(y).tolist() == [True, True, False, True, False, False]


def test_small_and_torch_inputs():
    assert cluster_max_sim(np.zeros((0, 4), np.float32)).max_sim.shape == (0,)
    one = cluster_max_sim(np.ones((1, 4), np.float32) / 2)
    assert np.isnan(one.max_sim[0]) and one.dup_of[0] == -1
    rng = np.random.default_rng(2)
    y = unit_rows(rng, 50, 8)
    from_torch = cluster_max_sim(torch.from_numpy(y), tile_size=8)
    np.testing.assert_array_equal(from_torch.max_sim, cluster_max_sim(y).max_sim)
    with pytest.raises(ValueError, match="float32"):
        cluster_max_sim(y.astype(np.float64))
    with pytest.raises(ValueError, match="tile_size"):
        cluster_max_sim(y, tile_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines)")
def test_cuda_gives_the_same_result_as_cpu():
    rng = np.random.default_rng(9)
    y = planted_cluster(rng, 3000, 128)
    cpu = cluster_max_sim(y, tile_size=512, device="cpu")
    gpu = cluster_max_sim(y, tile_size=512, device="cuda")
    np.testing.assert_array_equal(gpu.max_sim, cpu.max_sim)
    np.testing.assert_array_equal(gpu.dup_of, cpu.dup_of)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), first=st.integers(0, 120), tile=st.integers(1, 50), copies=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_rows_before_first_query_are_keys_only_and_the_rest_is_unchanged(n, first, tile, copies, seed):
    """A collection's generation judges only its new rows against every earlier row: for
    each row from first_query on, the same max_sim and dup_of as the whole cluster, bit for
    bit, whatever the tiling; earlier rows are left unjudged."""
    first = min(first, n)
    rng = np.random.default_rng(seed)
    y = planted_cluster(rng, n, 12)
    if copies and n > 1:  # exact copies across the boundary too
        y[rng.integers(0, n, copies)] = y[rng.integers(0, n, copies)]
    whole = cluster_max_sim(y, tile_size=tile)
    part = cluster_max_sim(y, tile_size=tile, first_query=first)
    np.testing.assert_array_equal(part.max_sim[first:], whole.max_sim[first:])
    np.testing.assert_array_equal(part.dup_of[first:], whole.dup_of[first:])
    assert np.isnan(part.max_sim[:first]).all() and (part.dup_of[:first] == -1).all()
    sims, dups = brute_force(y)
    np.testing.assert_array_equal(part.max_sim[max(first, 1):], sims[max(first, 1):])
    with pytest.raises(ValueError):
        cluster_max_sim(y, first_query=n + 1)


@settings(max_examples=50, deadline=None)
@given(
    tile=st.integers(1, 40),
    tiles=st.integers(0, 3),
    offset=st.integers(-2, 2),
    queries=st.integers(0, 45),
    copies=st.integers(0, 10),
    seed=st.integers(0, 2**16),
)
def test_buffers_sized_to_the_cluster_give_the_brute_force_result(tile, tiles, offset, queries, copies, seed):
    """The kernel sizes its tile buffer and diagonal mask to min(tile_size, queries) x
    min(tile_size, rows): clusters one row either side of a tile multiple, and query runs
    shorter, equal to or longer than a tile, still give the brute force to the bit."""
    n = max(1, tile * tiles + offset)
    first = max(0, n - queries)
    rng = np.random.default_rng(seed)
    y = planted_cluster(rng, n, 9)
    if copies and n > 1:
        y[rng.integers(0, n, copies)] = y[rng.integers(0, n, copies)]
    got = cluster_max_sim(y, tile_size=tile, first_query=first)
    sims, dups = brute_force(y)
    start = max(first, 1)
    np.testing.assert_array_equal(got.max_sim[start:], sims[start:])
    np.testing.assert_array_equal(got.dup_of[start:], dups[start:])
    assert np.isnan(got.max_sim[:start]).all() and (got.dup_of[:start] == -1).all()
