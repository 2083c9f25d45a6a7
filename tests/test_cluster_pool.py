"""A bucket's clusters scored on a pool of single-threaded torch calls, a collection's earlier
vectors read as stored and gathered per cluster, and ranged reads straight into an array:
each gives exactly what the serial, reordering, copying path gives (real runs, parquet, moto)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from semdedup_core import storage
from semdedup_core.config import RunConfig
from semdedup_core.dedup.kernel import cluster_max_sim
from semdedup_core.dedup.partitions import load_bucket, load_bucket_keys
from semdedup_core.dedup.scoring import _partition_index, map_clusters, order_function
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.plan import PlanRef, load_plan
from semdedup_core.storage import StorageError, read_range, read_range_into

from .conftest import fast_embeddings, single_thread, unit_rows

DIM = 16


@pytest.fixture
def torch_threads():
    """Set torch's thread count for a test; the count before is put back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _cluster(rng: np.random.Generator, n: int, copies: int) -> np.ndarray:
    y = unit_rows(rng, n, 8)
    if n == 0:
        return y
    if n > 1 and copies:
        y[rng.integers(1, n, copies)] = y[0]  # bitwise copies: ties the earliest row must win
    near = rng.random(n) < 0.3
    y[near] = y[0] + 1e-3 * rng.standard_normal((int(near.sum()), 8)).astype(np.float32)
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 160), min_size=0, max_size=12),
    keys_share=st.floats(0, 1),
    tile=st.integers(1, 70),
    threads=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
@example(sizes=[150, 3, 40, 5], keys_share=0.5, tile=16, threads=2, seed=1)  # one cluster alone on all threads, the rest pooled
@example(sizes=[60, 60, 60, 60], keys_share=0.0, tile=64, threads=3, seed=2)  # all pooled
def test_pool_gives_the_serial_result_bit_for_bit(torch_threads, sizes, keys_share, tile, threads, seed):
    rng = np.random.default_rng(seed)
    clusters = [_cluster(rng, n, copies=int(rng.integers(0, 4))) for n in sizes]
    firsts = [int(len(y) * keys_share) for y in clusters]  # rows before it are earlier keys only
    calls = [functools.partial(cluster_max_sim, y, tile_size=tile, first_query=f) for y, f in zip(clusters, firsts)]
    torch_threads(1)
    serial = [call() for call in calls]
    torch_threads(threads)
    pooled = map_clusters(calls, [len(y) for y in clusters], "cpu")
    assert torch.get_num_threads() == threads  # the unit's thread count is put back
    assert len(pooled) == len(serial)
    for got, want in zip(pooled, serial):
        np.testing.assert_array_equal(got.max_sim, want.max_sim)
        np.testing.assert_array_equal(got.dup_of, want.dup_of)


def _night(folder: Path, name: str, rng: np.random.Generator, n: int, earlier: np.ndarray | None) -> np.ndarray:
    vectors = unit_rows(rng, n, DIM)
    if earlier is not None:  # near-copies and exact copies of earlier items: judged against them
        vectors[: n // 10] = earlier[: n // 10] + 1e-3 * rng.standard_normal((n // 10, DIM)).astype(np.float32)
        vectors[n // 10 : n // 5] = earlier[n // 10 : n // 5]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    fast_embeddings(folder / f"{name}.parquet", [f"{name}-{i}" for i in range(n)], vectors)
    return vectors


def _collection(root: Path, inputs: Path, threads: int, against: str) -> None:
    cfg = RunConfig(
        input=[str(inputs)], output=str(root), collection=True, eps=0.05, clusters=5, buckets=2, seed=3, workers=1,
        threads_per_task=threads, against=against, kmeans_iterations=10,
    )
    with single_thread():  # heavy steps set threads_per_task; this test process's counts are put back after
        run_pipeline(cfg)


def _scores(run: Path) -> dict[str, object]:
    return {p.name: pq.read_table(p) for p in sorted((run / "scores").glob("bucket-*.parquet"))}


@pytest.mark.parametrize("against", ["kept", "all"])
def test_collection_scores_do_not_depend_on_the_unit_threads(tmp_path, against):
    """A base and a generation with one compute thread (serial clusters) and with three
    (clusters on a pool): every scores file, the earlier-items files included, is equal."""
    rng = np.random.default_rng(11)
    data = tmp_path / "data"
    base = _night(data, "night-1", rng, 1500, None)
    roots = {threads: tmp_path / f"coll-{threads}" for threads in (1, 3)}
    for threads, root in roots.items():
        _collection(root, data, threads, against)
    _night(data, "night-2", rng, 600, base)
    for threads, root in roots.items():
        _collection(root, data, threads, against)
    generations = {t: json.loads((r / "collection.json").read_text())["generations"] for t, r in roots.items()}
    assert [g["n_input"] for g in generations[1]] == [1500, 600]
    assert generations[1][1]["n_removed"] >= 120  # the planted copies were found
    for g in ("g-00000", "g-00001"):
        one, three = (_scores(roots[t] / "generations" / g) for t in (1, 3))
        assert one.keys() == three.keys() and one
        for name in one:
            assert one[name].equals(three[name]), f"{g}/{name} differs with a pool of threads"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A collection base whose partitions hold several clusters per bucket, over 3 shards."""
    folder = tmp_path_factory.mktemp("keys")
    rng = np.random.default_rng(5)
    for s in range(3):
        fast_embeddings(folder / "data" / f"s{s}.parquet", [f"s{s}-{i}" for i in range(700)], unit_rows(rng, 700, DIM))
    cfg = RunConfig(input=[str(folder / "data")], output=str(folder / "coll"), collection=True, eps=0.05, clusters=9, buckets=3, seed=1, workers=1, kmeans_iterations=8)
    with single_thread():
        run_pipeline(cfg)
    record = json.loads((folder / "coll" / "collection.json").read_text())["generations"][0]
    return PlanRef(output=str(folder / "coll" / record["run"]), digest=record["plan"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bucket=st.integers(0, 2), wanted=st.one_of(st.none(), st.sets(st.integers(-1, 10), max_size=10)))
def test_keys_as_stored_gather_to_the_keep_ordered_bucket(finished_run, bucket, wanted):
    plan = load_plan(finished_run)
    entries = _partition_index(finished_run).buckets[bucket]
    only = None if wanted is None else np.array(sorted(wanted), np.int64)
    data = load_bucket(plan, entries, order_function(plan), only_clusters=only)
    keys = load_bucket_keys(plan, entries, order_function(plan), only_clusters=only)
    assert keys.ids.equals(data.ids)
    np.testing.assert_array_equal(keys.cluster, data.cluster)
    np.testing.assert_array_equal(keys.starts, data.starts)
    np.testing.assert_array_equal(keys.clusters, data.clusters)
    assert keys.vectors[keys.rows].tobytes() == data.vectors.tobytes()
    if only is not None:
        assert set(keys.clusters.tolist()) <= set(only.tolist())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 5000), start=st.integers(0, 6000), rows=st.integers(0, 300))
def test_ranged_read_into_an_array_equals_the_bytes(tmp_path, size, start, rows):
    blob = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    start = min(start, size - 1)
    count = min(rows, (size - start) // 4)
    out = np.full(count, np.nan, np.float32)
    read_range_into(str(path), start, out)
    assert out.tobytes() == read_range(str(path), start, start + 4 * count)


def test_ranged_read_into_an_array_on_object_storage(moto_s3, tmp_path):
    bucket = moto_s3.new_bucket("into")
    vectors = unit_rows(np.random.default_rng(2), 300, DIM)
    local = tmp_path / "v.f32"
    local.write_bytes(vectors.tobytes())
    url = moto_s3.upload(local, bucket, "v.f32")
    out = np.empty((120, DIM), np.float32)
    read_range_into(url, 50 * DIM * 4, out)
    assert out.tobytes() == vectors[50:170].tobytes()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_short_ranged_read_is_a_storage_error(moto_s3, tmp_path, monkeypatch, where):
    """A truncated vectors file fails naming the object, never fills part of the array."""
    monkeypatch.setattr(storage, "STORAGE_ATTEMPTS", 1)
    local = tmp_path / "short.f32"
    local.write_bytes(b"\0" * 100)
    url = str(local) if where == "local" else moto_s3.upload(local, moto_s3.new_bucket("short"), "short.f32")
    with pytest.raises(StorageError, match="short.f32.*short read"):
        read_range_into(url, 40, np.empty(20, np.float32))
