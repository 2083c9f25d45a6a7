"""Decisions depend on the data only: not on the shard split, the assignment batch size or the
thread count. The ordering key (centroid_sim) and the nearest centroid are computed canonically,
so bit-identical vectors get bit-identical keys and equal keys keep input order."""

from __future__ import annotations

from contextlib import contextmanager

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.dedup import partitions
from semdedup_core.dedup.clustering import CentroidIndex
from semdedup_core.config import RunConfig
from semdedup_core.run.dag import run_pipeline

from .conftest import RunResults, write_embeddings

# faiss's float32 scores of a row change in the last bits with the batch it is in (at 64 dims,
# batches of ~2,000 rows and more round differently from small ones): the reference assigns
# all ~2,500 rows in one batch, the other runs in small ones or per shard.
DIM = 64
N_BASE = 2400
EPS = 0.05


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus() -> dict:
    """Topic clusters, groups of bit-identical vectors scattered through the input, and
    near-identical copies. Returns ids and vectors in input order."""
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((8, DIM))
    base = _unit(centers[rng.integers(0, 8, N_BASE)] + 0.9 * rng.standard_normal((N_BASE, DIM)))
    group_src = rng.choice(N_BASE, 25, replace=False)
    copies = np.repeat(group_src, 3)  # each group: the base item + 3 bit-identical copies
    near_src = rng.choice(np.setdiff1d(np.arange(N_BASE), group_src), 60, replace=False)
    near = _unit(base[near_src] + 2e-4 * rng.standard_normal((60, DIM)))
    vectors = np.concatenate([base, base[copies], near])
    source = np.concatenate([np.arange(N_BASE), copies, near_src])
    identical = np.concatenate([np.isin(np.arange(N_BASE), group_src), np.ones(len(copies), bool), np.zeros(len(near), bool)])
    order = rng.permutation(len(vectors))  # scatter the copies through the input
    vectors, source, identical = vectors[order], source[order], identical[order]
    ids = [f"item-{i:05d}" for i in range(len(vectors))]
    groups: dict[int, list[str]] = {}
    for pos in np.flatnonzero(identical):  # in input order
        groups.setdefault(int(source[pos]), []).append(ids[pos])
    return {"ids": ids, "vectors": vectors, "groups": list(groups.values())}


def _run(corpus: dict, root, shards: int, batch_rows: int, n_threads: int, monkeypatch) -> RunResults:
    data = root / "data"
    for s, part in enumerate(np.array_split(np.arange(len(corpus["ids"])), shards)):
        write_embeddings(data / f"part-{s:02d}.parquet", [corpus["ids"][i] for i in part], corpus["vectors"][part])
    monkeypatch.setattr(partitions, "READ_BATCH_ROWS", batch_rows)
    cfg = RunConfig(input=[str(data / "*.parquet")], output=str(root / "out"), clusters=6, eps=EPS, seed=5, buckets=2)
    with threads(n_threads):
        run_pipeline(cfg)
    return RunResults(root / "out")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> RunResults:
    mp = pytest.MonkeyPatch()
    try:
        return _run(corpus, tmp_path_factory.mktemp("reference"), shards=1, batch_rows=16384, n_threads=1, monkeypatch=mp)
    finally:
        mp.undo()


@pytest.mark.parametrize(
    ("shards", "batch_rows", "n_threads"),
    [(3, 1, 1), (7, 7, 2), (3, 64, 2), (7, 16384, 1), (1, 19, 2), (1, 20, 1)],
)
def test_split_batch_and_threads_change_nothing(corpus, reference, tmp_path, monkeypatch, shards, batch_rows, n_threads):
    res = _run(corpus, tmp_path, shards, batch_rows, n_threads, monkeypatch)
    res.check_accounting(corpus["ids"])
    assert res.decisions() == reference.decisions()


def test_identical_vectors_have_identical_keys_and_keep_the_first_input_item(corpus, reference):
    reference.check_accounting(corpus["ids"])
    scores = {r["id"]: r for r in reference.scores}
    kept = {r["id"] for r in reference.kept}
    for group in corpus["groups"]:
        assert len(group) == 4
        keys = {(scores[i]["cluster"], np.float32(scores[i]["centroid_sim"]).tobytes()) for i in group}
        assert len(keys) == 1, group  # same cluster, bit-identical centroid_sim
        assert group[0] in kept, group
        assert all(i not in kept and scores[i]["dup_of"] == group[0] for i in group[1:]), group


def test_centroid_sim_is_the_canonical_dot_with_the_nearest_centroid(corpus, reference):
    centroids = np.load(f"{reference.root}/clustering/centroids.npy").astype(np.float64)
    position = {item: k for k, item in enumerate(corpus["ids"])}
    rows = reference.scores
    x = corpus["vectors"][[position[r["id"]] for r in rows]].astype(np.float64)
    exact = (x @ centroids.T).astype(np.float32)  # float64 sums of exact products, rounded once
    cluster = np.array([r["cluster"] for r in rows])
    assert np.array_equal(np.array([r["centroid_sim"] for r in rows], np.float32), exact[np.arange(len(rows)), cluster])
    best = exact.max(axis=1)
    assert np.array_equal(exact[np.arange(len(rows)), cluster], best)
    assert all(c == np.flatnonzero(e == b)[0] for c, e, b in zip(cluster, exact, best))  # ties: lowest index


# ---------------------------------------------------------------- near-ties between centroids


def _near_tie(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids 0..4 where 1 and 3 differ from each other only in the last bits of one
    coordinate: every row scores them (almost) equally, within float32 rounding."""
    centroids = _unit(rng.standard_normal((5, DIM)))
    twin = centroids[1].copy()
    twin[7] = np.nextafter(twin[7], np.float32(np.inf))
    centroids[3] = twin
    x = _unit(centroids[1] + 0.05 * rng.standard_normal((n, DIM)))
    return centroids, x


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 300), n_threads=st.sampled_from([1, 2]))
def test_near_tie_resolves_canonically_whatever_the_batch(seed, batch, n_threads):
    centroids, x = _near_tie(np.random.default_rng(seed), 300)
    index = CentroidIndex(centroids)
    canonical = (x.astype(np.float64) @ centroids.astype(np.float64).T).astype(np.float32)
    with threads(n_threads):
        parts = [index.assign(x[i : i + batch]) for i in range(0, len(x), batch)]
    cluster = np.concatenate([p[0] for p in parts])
    sims = np.concatenate([p[1] for p in parts])
    best = canonical.max(axis=1)
    assert np.array_equal(sims, best)
    assert np.array_equal(cluster, np.argmax(canonical == best[:, None], axis=1))  # lowest index among equal
    tied = canonical[:, 1] == canonical[:, 3]
    assert tied.any()
    assert np.all(cluster[tied & (best == canonical[:, 1])] == 1)
