"""The Prefect flow under the real engine: the run layout of docs/architecture.md, its schemas, the
semantics against an independent brute force, tuning, and resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.stage_results import RunSummary

from .conftest import write_embeddings

DIM = 24
EPS = 0.1
CLUSTERS = 8
BUCKETS = 3

SCORES_FIELDS = [
    ("id", pa.string()),
    ("cluster", pa.int32()),
    ("centroid_sim", pa.float32()),
    ("max_sim", pa.float32()),
    ("dup_of", pa.string()),
    ("kept", pa.bool_()),
]


# ---------------------------------------------------------------- data


def _unit32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_dataset(folder: Path, seed: int = 0) -> dict:
    """~2.7k items in 3 shards: topic clusters, planted exact copies (some twice), near copies,
    and two broken rows. Returns the input in input order (shard order, then row order)."""
    rng = np.random.default_rng(seed)
    n_base, topics = 2300, 10
    centers = rng.standard_normal((topics, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    base = _unit32(centers[rng.integers(0, topics, n_base)] + 0.45 * rng.standard_normal((n_base, DIM)) / np.sqrt(DIM))
    exact_src = rng.choice(n_base, 150, replace=False)
    exact = np.concatenate([base[exact_src], base[exact_src[:40]]])  # 40 items copied twice
    near_src = rng.choice(n_base, 200, replace=False)
    near = _unit32(base[near_src] + 0.01 * rng.standard_normal((200, DIM)))
    vectors = np.concatenate([base, exact, near]).astype(np.float32)
    vectors = np.concatenate([vectors, np.zeros((2, DIM), np.float32)])
    vectors[-2, 3] = np.nan  # broken: NaN
    # vectors[-1] stays zero: broken, zero norm
    n = len(vectors)
    ids = np.array([f"it-{i:05d}" for i in range(n)])
    sq = np.einsum("ij,ij->i", vectors[:-2].astype(np.float64), vectors[:-2].astype(np.float64))
    assert np.abs(sq - 1).max() < 1e-5  # unit float32: the pipeline leaves them bit-for-bit as given
    exact_pairs = [(ids[s], ids[n_base + k]) for k, s in enumerate(np.concatenate([exact_src, exact_src[:40]]))]
    near_pairs = [(ids[s], ids[n_base + 190 + k]) for k, s in enumerate(near_src)]
    perm = rng.permutation(n)
    order_ids, order_vecs = [], []
    for s, part in enumerate(np.array_split(perm, [900, 1700])):  # shards of 900, 800, 1000
        write_embeddings(folder / f"shard-{s}.parquet", ids[part], vectors[part])
        order_ids.extend(ids[part].tolist())
        order_vecs.append(vectors[part])
    return {
        "glob": str(folder / "shard-*.parquet"),
        "ids": order_ids,
        "vectors": np.concatenate(order_vecs),
        "broken": {ids[-2], ids[-1]},
        "exact_pairs": exact_pairs,
        "near_pairs": near_pairs,
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("flow-data"))


def run_flow(**kw) -> RunSummary:
    from flows.dedup_flow import semdedup_flow

    return semdedup_flow(config=RunConfig(**kw))


@pytest.fixture(scope="module")
def eps_run(prefect_harness, dataset, tmp_path_factory) -> tuple[Path, RunSummary]:
    out = tmp_path_factory.mktemp("flow-eps") / "run"
    summary = run_flow(input=[dataset["glob"]], output=str(out), eps=EPS, clusters=CLUSTERS, buckets=BUCKETS, workers=2, seed=7)
    return out, summary


# ---------------------------------------------------------------- helpers


def read_scores(out: Path) -> pa.Table:
    files = sorted((out / "scores").glob("*.parquet"))
    assert files, "no scores parquet"
    return pa.concat_tables([pq.read_table(f) for f in files])


def result_tables(out: Path) -> dict[str, list]:
    return {name: pq.read_table(out / "result" / f"{name}.parquet").to_pylist() for name in ("kept", "removed", "failed")}


def brute_force_check(scores: pa.Table, dataset: dict, eps: float) -> None:
    """Independent SemDeDup (keep='hard') per cluster against the stored scores, exactly."""
    pos = {item: k for k, item in enumerate(dataset["ids"])}
    vectors = dataset["vectors"]
    rows = scores.to_pydict()
    by_id = {item: k for k, item in enumerate(rows["id"])}
    threshold = np.float32(1.0 - eps)
    clusters: dict[int, list[str]] = {}
    for item, c in zip(rows["id"], rows["cluster"]):
        clusters.setdefault(c, []).append(item)
    n_checked = 0
    for c, members in clusters.items():
        members.sort(key=lambda item: pos[item])  # input order
        key = {m: np.float32(1.0) - np.float32(rows["centroid_sim"][by_id[m]]) for m in members}
        ordered = sorted(members, key=lambda m: (-float(key[m]), pos[m]))  # key descending, ties in input order
        y = vectors[[pos[m] for m in ordered]].astype(np.float64)
        sims = (y @ y.T).astype(np.float32)
        for j, item in enumerate(ordered):
            r = by_id[item]
            if j == 0:
                assert rows["max_sim"][r] is None and rows["dup_of"][r] is None and rows["kept"][r] is True, (c, item)
                continue
            earlier = sims[j, :j]
            best = earlier.max()
            arg = int(np.flatnonzero(earlier == best)[0])
            assert rows["max_sim"][r] is not None and np.float32(rows["max_sim"][r]) == best, (c, item, rows["max_sim"][r], best)
            assert rows["dup_of"][r] == ordered[arg], (c, item, rows["dup_of"][r], ordered[arg])
            assert rows["kept"][r] == (not best > threshold), (c, item)
            n_checked += 1
    assert n_checked == len(rows["id"]) - len(clusters)


# ---------------------------------------------------------------- the layout


def test_run_layout_and_schemas(eps_run, dataset):
    out, summary = eps_run
    n = len(dataset["ids"])
    # run.json: config, versions, seeds, stages
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["eps"] == EPS and run["config"]["clusters"] == CLUSTERS and run["config"]["input"] == [dataset["glob"]]
    assert run["seeds"]["seed"] == 7
    assert {"numpy", "pyarrow", "prefect"} <= set(run["versions"])
    for stage in ("plan", "fit", "assign", "collect", "dedup", "finalize"):
        assert run["stages"][stage]["status"] == "done", run["stages"]
    assert "tune" not in run["stages"]
    # clustering/centroids.npy
    centroids = np.load(out / "clustering" / "centroids.npy")
    assert centroids.shape == (CLUSTERS, DIM) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids.astype(np.float64), axis=1), 1.0, atol=1e-6)
    # partitions/
    assert (out / "partitions").is_dir() and any((out / "partitions").iterdir())
    # scores/*.parquet
    files = sorted((out / "scores").glob("*.parquet"))
    assert len(files) == BUCKETS
    for f in files:
        schema = pq.read_schema(f)
        assert [(fld.name, fld.type) for fld in schema] == SCORES_FIELDS
    scores = read_scores(out)
    valid_ids = [i for i in dataset["ids"] if i not in dataset["broken"]]
    assert sorted(scores.column("id").to_pylist()) == sorted(valid_ids)
    assert scores.column("kept").null_count == 0 and scores.column("cluster").null_count == 0
    # max_sim null only for each cluster's first item; dup_of null exactly where max_sim is
    max_null = scores.column("max_sim").is_null().to_pylist()
    dup_null = scores.column("dup_of").is_null().to_pylist()
    assert max_null == dup_null
    clusters = scores.column("cluster").to_pylist()
    assert sum(max_null) == len(set(clusters))
    assert sorted(c for c, m in zip(clusters, max_null) if m) == sorted(set(clusters))
    assert set(clusters) <= set(range(CLUSTERS))
    # result/
    assert [(f.name, f.type) for f in pq.read_schema(out / "result" / "kept.parquet")] == [("id", pa.string())]
    assert [(f.name, f.type) for f in pq.read_schema(out / "result" / "removed.parquet")] == [
        ("id", pa.string()),
        ("dup_of", pa.string()),
        ("max_sim", pa.float32()),
        ("cluster", pa.int32()),
        ("reason", pa.string()),
        ("kept_id", pa.string()),
        ("source", pa.string()),
    ]
    assert {r["reason"] for r in pq.read_table(out / "result" / "removed.parquet").to_pylist()} == {"semantic"}
    assert [(f.name, f.type) for f in pq.read_schema(out / "result" / "failed.parquet")] == [
        ("id", pa.string()),
        ("source", pa.string()),
        ("error", pa.string()),
    ]
    stored = json.loads((out / "result" / "summary.json").read_text())
    assert RunSummary.model_validate(stored) == summary
    assert not (out / "result" / "removed.by-shard.parquet").exists()  # finalize's spill is gone
    for key in ("n_input", "n_embedded", "n_kept", "n_removed", "n_failed", "eps", "target_keep", "kept_fraction", "clusters", "stage_seconds", "versions", "per_source"):
        assert key in stored, key
    assert stored["n_input"] == n and stored["n_failed"] == 2 and stored["n_embedded"] == n - 2
    assert stored["n_kept"] + stored["n_removed"] == stored["n_embedded"]
    assert stored["eps"] == EPS and stored["target_keep"] is None and stored["clusters"] == CLUSTERS
    assert stored["kept_fraction"] == pytest.approx(stored["n_kept"] / stored["n_embedded"])
    assert {"plan", "fit", "assign", "dedup"} <= set(stored["stage_seconds"])
    assert "numpy" in stored["versions"]
    # report
    html = (out / "report" / "index.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and f"{n:,}" in html  # counts formatted for people


def test_results_account_for_every_item_once(eps_run, dataset):
    out, summary = eps_run
    tables = result_tables(out)
    kept = [r["id"] for r in tables["kept"]]
    removed = [r["id"] for r in tables["removed"]]
    failed = tables["failed"]
    assert sorted(kept + removed + [r["id"] for r in failed]) == sorted(dataset["ids"])
    assert (len(kept), len(removed), len(failed)) == (summary.n_kept, summary.n_removed, summary.n_failed)
    assert {r["id"] for r in failed} == dataset["broken"]
    assert all("shard-" in r["source"] and " row " in r["source"] and r["error"] for r in failed)
    # removed.parquet is exactly the removed rows of scores
    scores = {r["id"]: r for r in read_scores(out).to_pylist()}
    assert {r["id"] for r in tables["removed"]} == {i for i, r in scores.items() if not r["kept"]}
    for r in tables["removed"]:
        s = scores[r["id"]]
        assert (r["dup_of"], r["cluster"]) == (s["dup_of"], s["cluster"])
        assert np.float32(r["max_sim"]) == np.float32(s["max_sim"]) and r["max_sim"] > np.float32(1 - EPS)
    assert {r["id"] for r in tables["kept"]} == {i for i, r in scores.items() if r["kept"]}


def test_scores_equal_an_independent_brute_force(eps_run, dataset):
    out, _ = eps_run
    brute_force_check(read_scores(out), dataset, EPS)


def test_assignment_and_centroid_sim_are_consistent(eps_run, dataset):
    out, _ = eps_run
    centroids = np.load(out / "clustering" / "centroids.npy").astype(np.float64)
    pos = {item: k for k, item in enumerate(dataset["ids"])}
    scores = read_scores(out).to_pydict()
    x = dataset["vectors"][[pos[i] for i in scores["id"]]].astype(np.float64)
    sims = x @ centroids.T
    cluster = np.array(scores["cluster"])
    np.testing.assert_allclose(np.array(scores["centroid_sim"], np.float64), sims[np.arange(len(x)), cluster], atol=1e-5)
    assert np.all(sims[np.arange(len(x)), cluster] >= sims.max(axis=1) - 1e-5)  # nearest centroid


def test_planted_duplicates_are_removed(eps_run, dataset):
    out, _ = eps_run
    scores = {r["id"]: r for r in read_scores(out).to_pylist()}
    for a, b in dataset["exact_pairs"]:
        assert scores[a]["cluster"] == scores[b]["cluster"], (a, b)
        assert not (scores[a]["kept"] and scores[b]["kept"]), (a, b)  # identical vectors: one of them goes
    caught = sum(1 for a, b in dataset["near_pairs"] if not (scores[a]["kept"] and scores[b]["kept"]))
    assert caught >= 0.9 * len(dataset["near_pairs"])
    # every removed item points at an item of its own cluster that comes earlier and is similar enough
    for item, r in scores.items():
        if not r["kept"]:
            assert scores[r["dup_of"]]["cluster"] == r["cluster"]


# ---------------------------------------------------------------- resume


def _mtimes(out: Path) -> dict[str, int]:
    files = [*(out / "scores").glob("*.parquet"), *(out / "partitions").glob("*.parquet"), out / "clustering" / "centroids.npy"]
    return {str(f.relative_to(out)): f.stat().st_mtime_ns for f in files}


@pytest.fixture(scope="module")
def resumable_run(prefect_harness, dataset, tmp_path_factory) -> tuple[Path, RunSummary]:
    """A second run of its own, so the resume tests do not disturb the others."""
    out = tmp_path_factory.mktemp("flow-resume") / "run"
    summary = run_flow(input=[dataset["glob"]], output=str(out), eps=EPS, clusters=CLUSTERS, buckets=BUCKETS, workers=1, seed=7)
    return out, summary


def test_rerun_resumes_skips_finished_work_and_allows_execution_changes(resumable_run, dataset):
    out, first = resumable_run
    before_tables = result_tables(out)
    before_scores = read_scores(out)
    before = _mtimes(out)
    assert len([k for k in before if k.startswith("scores/")]) == BUCKETS
    # same command again, with execution-only fields changed: nothing is recomputed
    again = run_flow(input=[dataset["glob"]], output=str(out), eps=EPS, clusters=CLUSTERS, buckets=BUCKETS, workers=2, seed=7, tile_size=64, device="cpu")
    assert _mtimes(out) == before
    assert result_tables(out) == before_tables
    assert read_scores(out).equals(before_scores)
    for key in ("n_input", "n_embedded", "n_kept", "n_removed", "n_failed", "eps", "kept_fraction", "clusters"):
        assert getattr(again, key) == getattr(first, key), key
    run = json.loads((out / "run.json").read_text())
    assert run["execution"]["tile_size"] == 64
    assert all(run["stages"][s]["status"] == "done" for s in ("plan", "fit", "assign", "collect", "dedup", "finalize"))


def test_interrupted_run_recomputes_only_what_is_missing(resumable_run, dataset):
    out, first = resumable_run
    before_tables = result_tables(out)
    before_scores = {f.name: pq.read_table(f) for f in (out / "scores").glob("*.parquet")}
    before = _mtimes(out)
    # as if the run died while scoring bucket 1: its output and marker are gone, no results yet
    (out / "scores" / "bucket-00001.parquet").unlink()
    (out / "scores" / "bucket-00001.json").unlink()
    shutil.rmtree(out / "result")
    summary = run_flow(input=[dataset["glob"]], output=str(out), eps=EPS, clusters=CLUSTERS, buckets=BUCKETS, workers=1, seed=7, tile_size=7)
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != "scores/bucket-00001.parquet"} == {
        k: v for k, v in before.items() if k != "scores/bucket-00001.parquet"
    }
    assert (out / "scores" / "bucket-00001.parquet").exists()
    # recomputed with another tile size: the same bits
    for name, table in before_scores.items():
        assert pq.read_table(out / "scores" / name).equals(table), name
    assert result_tables(out) == before_tables
    assert summary.n_removed == first.n_removed and summary.n_kept == first.n_kept


def test_rerun_with_a_different_eps_is_refused(resumable_run, dataset):
    out, first = resumable_run
    summary_before = (out / "result" / "summary.json").read_text()
    scores_before = _mtimes(out)
    with pytest.raises(ConfigError) as info:
        run_flow(input=[dataset["glob"]], output=str(out), eps=0.2, clusters=CLUSTERS, buckets=BUCKETS, workers=1, seed=7)
    assert re.search(r"\beps\b", str(info.value)), str(info.value)
    assert "clusters" not in str(info.value)  # only what differs is named
    assert (out / "result" / "summary.json").read_text() == summary_before
    assert _mtimes(out) == scores_before


# ---------------------------------------------------------------- tuning


def test_target_keep_run_tunes_eps(prefect_harness, dataset, tmp_path):
    out = tmp_path / "tuned"
    target = 0.93
    summary = run_flow(input=[dataset["glob"]], output=str(out), target_keep=target, clusters=CLUSTERS, workers=2, seed=7, tuning_cluster_fraction=0.5)
    curve = pq.read_table(out / "tuning" / "curve.parquet")
    assert curve.column_names == ["eps", "predicted_kept_fraction"] and curve.num_rows > 2
    eps_grid = np.array(curve.column("eps").to_pylist())
    kept_grid = np.array(curve.column("predicted_kept_fraction").to_pylist())
    assert np.all(np.diff(eps_grid) > 0) and np.all(np.diff(kept_grid) <= 0)
    stored = json.loads((out / "result" / "summary.json").read_text())
    assert stored["target_keep"] == target
    assert stored["predicted_kept_fraction"] is not None and 0 < stored["predicted_kept_fraction"] <= 1
    assert 0 < stored["eps"] < 1
    assert stored["eps"] == summary.eps == json.loads((out / "tuning" / "result.json").read_text())["eps"]
    assert stored["n_kept"] + stored["n_removed"] + stored["n_failed"] == stored["n_input"] == len(dataset["ids"])
    assert "tune" in json.loads((out / "run.json").read_text())["stages"]
    # the tuned eps is applied exactly like a given one
    brute_force_check(read_scores(out), dataset, stored["eps"])


def test_tasks_get_the_plan_by_reference_stored_once_in_the_run(eps_run, dataset):
    """Units receive a PlanRef (output + digest), never the plan itself: the plan is stored
    once per version under plans/, content-addressed, and loads back as the run's plan."""
    from semdedup_core.run.plan import PlanRef, RunPlan, load_plan
    from semdedup_core.storage import digest

    out, summary = eps_run
    stored = sorted((out / "plans").glob("*.json"))
    assert len(stored) == 1  # precomputed input: one version of the plan (raw inputs: two)
    plan = RunPlan.model_validate_json(stored[0].read_bytes())
    assert plan.config.output == str(out) and plan.n_input == summary.n_input == len(dataset["ids"])
    assert digest([plan.model_dump_json()]) == stored[0].stem  # named by its content
    ref = PlanRef(output=str(out), digest=stored[0].stem)
    assert load_plan(ref) == plan
