"""Curated collections: a base, then generations that judge only new input objects against
what the collection already holds (real runs through run_pipeline, the kernel, parquet)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.dedup.kernel import cluster_max_sim
from semdedup_core.run.collection import generation_url, read_collection
from semdedup_core.run.dag import run_pipeline

from .conftest import RunResults, fast_embeddings, single_thread, unit_rows

REPO = Path(__file__).resolve().parent.parent
DIM = 16
CFG = dict(eps=0.05, clusters=6, buckets=3, kmeans_iterations=10, seed=4, workers=1)
HANG_GUARD_S = 240  # bounds every wait; nothing is asserted about time


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Corpus:
    """Input shards written night by night; every vector kept by id for checking."""

    def __init__(self, folder: Path, seed: int = 0):
        self.folder, self.rng = folder, np.random.default_rng(seed)
        self.vectors: dict[str, np.ndarray] = {}
        self.shard_ids: dict[str, list[str]] = {}

    def add(self, name: str, n_new: int, near_of: list[str] = (), copies_of: list[str] = (), broken: int = 0) -> Path:
        ids = [f"{name}-new-{i}" for i in range(n_new)] + [f"{name}-near-{i}" for i in range(len(near_of))]
        ids += [f"{name}-copy-{i}" for i in range(len(copies_of))] + [f"{name}-bad-{i}" for i in range(broken)]
        parts = [unit_rows(self.rng, n_new, DIM)]
        if near_of:
            base = np.stack([self.vectors[i] for i in near_of])
            parts.append(_unit(base + 0.002 * self.rng.standard_normal(base.shape).astype(np.float32)))
        if copies_of:
            parts.append(np.stack([self.vectors[i] for i in copies_of]))
        if broken:
            parts.append(np.zeros((broken, DIM), np.float32))  # zero vectors: failed
        vectors = np.concatenate(parts).astype(np.float32)
        self.vectors.update({i: v for i, v in zip(ids, vectors)})
        self.shard_ids[name] = ids
        return fast_embeddings(self.folder / f"{name}.parquet", ids, vectors)


def _run(cfg: RunConfig):
    with single_thread():
        return run_pipeline(cfg)


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _scores(run: Path) -> list[dict]:
    """Every scores row of a run, each cluster's rows in its stored keep order."""
    return [r for p in sorted((run / "scores").glob("bucket-*.parquet")) if not p.name.endswith(".earlier.parquet") for r in pq.read_table(p).to_pylist()]


def _decided(run: Path) -> tuple[set, dict, set]:
    r = RunResults(run)
    return {x["id"] for x in r.kept}, {x["id"]: x for x in r.removed}, {x["id"] for x in r.failed}


def test_generations_judge_only_new_objects_and_never_touch_earlier_decisions(tmp_path):
    corpus = Corpus(tmp_path / "in")
    corpus.add("night1-a", 300)
    corpus.add("night1-b", 300, near_of=[f"night1-a-new-{i}" for i in range(20)])
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(corpus.folder)], output=str(coll), collection=True, **CFG)

    base = _run(cfg)
    base_kept, base_removed, _ = _decided(Path(generation_url(str(coll), 0)))
    assert base.n_input == 620 and len(base_removed) >= 20
    g0_files = _files(Path(generation_url(str(coll), 0)))

    old_kept = sorted(base_kept)
    old_removed = sorted(base_removed)
    corpus.add("night2", 40, near_of=old_kept[:25], copies_of=old_kept[25:35] + old_removed[:5], broken=2)
    gen = _run(cfg)
    g1 = Path(generation_url(str(coll), 1))
    kept, removed, failed = _decided(g1)
    new_ids = set(corpus.shard_ids["night2"])
    # every new item in exactly one of kept / removed / failed; nothing else
    assert kept | set(removed) | failed == new_ids and len(kept) + len(removed) + len(failed) == len(new_ids)
    assert (gen.n_input, gen.n_failed) == (len(new_ids), 2)
    # only the new shard was processed; the base's files are untouched (bytes and mtimes)
    assert [Path(s["url"]).name for s in json.loads((g1 / "run.json").read_text())["shards"]] == ["night2.parquet"]
    assert _files(Path(generation_url(str(coll), 0))) == g0_files
    # the planted copies go, each as a copy of the earlier item it copies; new distinct items stay
    for i, original in enumerate(old_kept[:25] + old_kept[25:35]):
        rid = f"night2-near-{i}" if i < 25 else f"night2-copy-{i - 25}"
        assert rid in removed, rid
        assert removed[rid]["dup_of"] == original and removed[rid]["kept_id"] == original
    assert {f"night2-new-{i}" for i in range(40)} <= kept
    # a copy of an earlier *removed* item is judged against the earlier kept items (default):
    # removed for the kept item its original was removed for
    for i, original in enumerate(old_removed[:5]):
        rid = f"night2-copy-{10 + i}"
        assert removed[rid]["kept_id"] == base_removed[original]["kept_id"] == removed[rid]["dup_of"]

    record = read_collection(str(coll))
    assert [g.kind for g in record.generations] == ["base", "generation"]
    assert set(record.generations[1].inputs) == {str(corpus.folder / "night2.parquet")}
    assert record.generations[1].drift.items_since_base == 620 + len(new_ids) - 2  # assigned items: failed rows excluded
    committed = (coll / "collection.json").read_bytes()

    again = _run(cfg)  # night 3: nothing new
    assert again.note is not None and "nothing new" in again.note and again.n_input == 0
    assert (coll / "collection.json").read_bytes() == committed
    assert not Path(generation_url(str(coll), 2)).exists()


def test_against_all_equals_one_ranked_run_over_the_union_to_the_bit(tmp_path):
    """With against='all', each new item's max_sim and dup_of equal those of one run over the
    union in which, per cluster, the earlier items come first in their order and the new
    items follow in theirs (same centroids): recomputed here with the kernel on the union."""
    corpus = Corpus(tmp_path / "in", seed=1)
    corpus.add("a", 400, near_of=[])
    corpus.add("b", 100, near_of=[f"a-new-{i}" for i in range(60)])
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(corpus.folder)], output=str(coll), collection=True, against="all", **CFG)
    _run(cfg)
    base_scores = _scores(Path(generation_url(str(coll), 0)))
    removed_before = {r["id"] for r in base_scores if not r["kept"]}
    assert removed_before  # earlier removed items exist: 'all' must judge against them too
    corpus.add("c", 50, near_of=sorted(removed_before)[:30] + [f"a-new-{i}" for i in range(100, 120)])
    _run(cfg)
    new_scores = _scores(Path(generation_url(str(coll), 1)))
    expected_dup_to_removed = 0
    for cluster in sorted({r["cluster"] for r in new_scores}):
        earlier = [r["id"] for r in base_scores if r["cluster"] == cluster]  # stored keep order
        new = [r for r in new_scores if r["cluster"] == cluster]
        union = earlier + [r["id"] for r in new]
        whole = cluster_max_sim(np.stack([corpus.vectors[i] for i in union]), tile_size=7)
        for j, row in enumerate(new, start=len(earlier)):
            if whole.dup_of[j] < 0:
                assert row["dup_of"] is None
                continue
            assert np.float32(row["max_sim"]).view(np.uint32) == whole.max_sim[j].view(np.uint32), row
            assert row["dup_of"] == union[whole.dup_of[j]], row
            expected_dup_to_removed += union[whole.dup_of[j]] in removed_before
    assert expected_dup_to_removed > 0  # the comparison covered dup_of pointing at earlier removed items


def test_a_generation_killed_midway_resumes_to_the_same_collection(tmp_path):
    """kill -9 during the generation's dedup stage leaves collection.json as it was; the
    re-run resumes the same generation folder and commits the same state as an unbroken run."""
    corpus = Corpus(tmp_path / "in", seed=2)
    corpus.add("a", 3000)
    big = dict(CFG, clusters=40, buckets=40, tile_size=64)
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    for coll in (reference, broken):
        _run(RunConfig(input=[str(corpus.folder)], output=str(coll), collection=True, **big))
    corpus.add("b", 3000, near_of=[f"a-new-{i}" for i in range(500)])
    _run(RunConfig(input=[str(corpus.folder)], output=str(reference), collection=True, **big))
    before = (broken / "collection.json").read_bytes()

    cfg = RunConfig(input=[str(corpus.folder)], output=str(broken), collection=True, **big)
    script = "import sys; from semdedup_core.config import RunConfig; from semdedup_core.run.dag import run_pipeline; run_pipeline(RunConfig.model_validate_json(sys.argv[1]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", SEMDEDUP_LEASE_TTL="5", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", script, cfg.model_dump_json()], env=env, cwd=REPO)
    scores = Path(generation_url(str(broken), 1)) / "scores"
    deadline = time.monotonic() + HANG_GUARD_S
    while not list(scores.glob("bucket-*.json")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_then = len(list(scores.glob("bucket-*.json")))
    assert 0 < done_then < 40, done_then  # killed in the middle of the dedup stage
    assert (broken / "collection.json").read_bytes() == before  # nothing committed
    time.sleep(6)  # the killed run's lease (TTL 5 s) expires
    _run(cfg)

    def state(coll: Path) -> list[dict]:
        return [{k: v for k, v in g.model_dump().items() if k not in ("committed", "run", "plan")} for g in read_collection(str(coll)).generations]

    assert state(broken) == state(reference)
    for g in (0, 1):
        assert RunResults(Path(generation_url(str(broken), g))).decisions() == RunResults(Path(generation_url(str(reference), g))).decisions()


def test_changed_and_foreign_inputs_are_refused_before_any_work(tmp_path):
    corpus = Corpus(tmp_path / "in", seed=3)
    shard = corpus.add("a", 100)
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(corpus.folder)], output=str(coll), collection=True, **CFG)
    _run(cfg)
    committed = (coll / "collection.json").read_bytes()
    corpus.add("a", 120)  # the processed object rewritten
    corpus.add("b", 50)
    with pytest.raises(ConfigError, match="changed since"):
        _run(cfg)
    assert (coll / "collection.json").read_bytes() == committed and not Path(generation_url(str(coll), 1)).exists()
    skipped = _run(cfg.model_copy(update={"changed_inputs": "skip"}))
    assert skipped.n_input == 50  # only the new object; the changed one left out
    assert set(read_collection(str(coll)).generations[1].inputs) == {str(corpus.folder / "b.parquet")}
    # a collection never lands on a plain run, nor a plain run on a collection
    with pytest.raises(ConfigError):
        _run(RunConfig(input=[str(shard)], output=str(coll), **CFG))
    plain = tmp_path / "plain"
    _run(RunConfig(input=[str(shard)], output=str(plain), **CFG))
    with pytest.raises(ConfigError):
        _run(RunConfig(input=[str(shard)], output=str(plain), collection=True, **CFG))
    # a generation must use the base's recipe (embeddings, order)
    with pytest.raises(ConfigError, match="another configuration"):
        _run(cfg.model_copy(update={"keep": "easy", "changed_inputs": "skip"}))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    nights=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 60), st.integers(0, 30), st.integers(0, 10), st.integers(0, 2)), min_size=2, max_size=4),
    against=st.sampled_from(["kept", "all"]),
)
def test_every_item_is_decided_once_across_any_sequence_of_nights(tmp_path_factory, nights, against):
    """Random growth (new shards with fresh items, near copies and exact copies of anything
    seen before, broken rows; nights without new shards): every input id is in exactly one
    generation's kept / removed / failed; earlier generations' files never change; a removed
    item's kept_id is an item kept by its own or an earlier generation."""
    tmp = tmp_path_factory.mktemp("nights")
    corpus = Corpus(tmp / "in", seed=len(nights))
    coll = tmp / "coll"
    cfg = RunConfig(input=[str(corpus.folder)], output=str(coll), collection=True, against=against, **dict(CFG, clusters=3, buckets=2))
    corpus.add("n0", 80)
    rng = np.random.default_rng(7)
    snapshots: list[dict] = []
    for night, (n_shards, n_new, n_near, n_copy, n_bad) in enumerate(nights, start=1):
        seen = sorted(corpus.vectors)
        for s in range(n_shards):
            corpus.add(f"n{night}-{s}", n_new, near_of=list(rng.choice(seen, n_near)), copies_of=list(rng.choice(seen, n_copy)), broken=n_bad)
        summary = _run(cfg)
        generations = read_collection(str(coll)).generations if (coll / "collection.json").exists() else []
        for g, files in enumerate(snapshots):
            assert _files(Path(generation_url(str(coll), g))) == files, f"generation {g} changed"
        snapshots = [_files(Path(generation_url(str(coll), g.index))) for g in generations]
        if summary.note is not None:
            assert n_shards == 0 or summary.n_input == 0
    generations = read_collection(str(coll)).generations
    decided: dict[str, tuple[int, str]] = {}
    kept_by: dict[str, int] = {}
    for g in generations:
        kept, removed, failed = _decided(Path(generation_url(str(coll), g.index)))
        for ids, what in ((kept, "kept"), (set(removed), "removed"), (failed, "failed")):
            for i in ids:
                assert i not in decided, (i, decided.get(i), g.index)
                decided[i] = (g.index, what)
        kept_by.update({i: g.index for i in kept})
        for r in removed.values():
            assert kept_by.get(r["kept_id"], g.index + 1) <= g.index, r
    assert set(decided) == set(corpus.vectors)


def test_text_generations_embed_only_the_new_shard(tiny_bert, tmp_path):
    """Raw text: a generation scans and embeds only the new jsonl; the base's embeddings stay
    byte for byte (and mtime) as they were; exact and near copies of earlier texts go."""
    folder = tmp_path / "in"
    folder.mkdir()
    docs = [f"document {i} about topic {i % 7} with words w{i} w{i * 3} w{i * 5}" for i in range(60)]
    for s in range(2):
        (folder / f"night1-{s}.jsonl").write_text("".join(json.dumps({"id": f"d{s}-{i}", "text": docs[s * 30 + i]}) + "\n" for i in range(30)))
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(folder)], output=str(coll), collection=True, model=str(tiny_bert), eps=0.001, clusters=2, decode_workers=0, seed=1)
    _run(cfg)
    g0 = Path(generation_url(str(coll), 0))
    embedded_before = _files(g0 / "embeddings")
    base_kept, _, _ = _decided(g0)
    new = [{"id": "n-exact", "text": docs[3]}, {"id": "n-spaced", "text": "  " + docs[40].upper() + " "}, {"id": "n-fresh", "text": "an entirely new text"}]
    (folder / "night2.jsonl").write_text("".join(json.dumps(d) + "\n" for d in new))
    gen = _run(cfg)
    g1 = Path(generation_url(str(coll), 1))
    assert _files(g0 / "embeddings") == embedded_before
    assert sorted(p.name for p in (g1 / "embeddings").glob("*.parquet")) == ["shard-00000.failed.parquet", "shard-00000.parquet"]
    assert pq.read_table(g1 / "embeddings" / "shard-00000.parquet").column("id").to_pylist() == ["n-exact", "n-spaced", "n-fresh"]
    kept, removed, failed = _decided(g1)
    assert gen.n_input == 3 and not failed
    for rid, original in (("n-exact", "d0-3"), ("n-spaced", "d1-10")):
        if original in base_kept:  # an earlier kept text: its copies go, as copies of it
            assert removed[rid]["dup_of"] == original, removed.get(rid)
    assert "n-fresh" in kept


def test_collection_on_object_storage(moto_s3, tmp_path):
    """The collection, its generations and its commit in a bucket (moto's HTTP S3 server)."""
    bucket = moto_s3.new_bucket("collection")
    corpus = Corpus(tmp_path / "in", seed=5)
    moto_s3.upload(corpus.add("a", 200), bucket, "in/a.parquet")
    coll = f"s3://{bucket}/curated"
    cfg = RunConfig(input=[f"s3://{bucket}/in/"], output=coll, collection=True, **CFG)
    _run(cfg)
    moto_s3.upload(corpus.add("b", 30, near_of=[f"a-new-{i}" for i in range(10)]), bucket, "in/b.parquet")
    gen = _run(cfg)
    assert gen.n_input == 40
    record = read_collection(coll)
    assert [(g.kind, sorted(g.inputs)) for g in record.generations] == [("base", [f"s3://{bucket}/in/a.parquet"]), ("generation", [f"s3://{bucket}/in/b.parquet"])]
    results = RunResults(generation_url(coll, 1), moto_s3)
    removed = {r["id"]: r for r in results.removed}
    assert {f"b-near-{i}" for i in range(10)} <= set(removed)
    assert all(removed[f"b-near-{i}"]["dup_of"] == f"a-new-{i}" for i in range(10))
    assert {r["id"] for r in results.kept} | set(removed) == set(corpus.shard_ids["b"])
    assert _run(cfg).note is not None


def test_a_night_of_unusable_items_is_processed_and_the_next_night_goes_on(tiny_bert, tmp_path):
    """Raw text whose new object holds nothing usable: the run stops as usual (NoUsableItems),
    but the object counts as processed (a failed generation is committed), so the next night
    is not stuck on it."""
    from semdedup_core.results.summary import NoUsableItems

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": f"a{i}", "text": f"text number {i} here"}) + "\n" for i in range(20)))
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(folder)], output=str(coll), collection=True, model=str(tiny_bert), eps=0.001, clusters=2, decode_workers=0)
    _run(cfg)
    (folder / "b.jsonl").write_text("".join(json.dumps({"id": f"b{i}", "text": " " * i}) + "\n" for i in range(5)))
    with pytest.raises(NoUsableItems):
        _run(cfg)
    record = read_collection(str(coll))
    assert [(g.kind, g.n_input, g.n_failed) for g in record.generations] == [("base", 20, 0), ("generation", 5, 5)]
    (folder / "c.jsonl").write_text(json.dumps({"id": "c0", "text": "text number 3 here"}) + "\n" + json.dumps({"id": "c1", "text": "something else"}) + "\n")
    night3 = _run(cfg)
    assert night3.n_input == 2 and len(read_collection(str(coll)).generations) == 3
    assert _run(cfg).note is not None


def test_cli_collection_nights_and_status(tmp_path):
    """`semdedup run --collection` twice over a growing folder, a night with nothing new
    (no Prefect started), `semdedup status`; misuses refused in one line (exit 2)."""
    from .test_cli import assert_fails_cleanly, cli

    corpus = Corpus(tmp_path / "in", seed=9)
    corpus.add("a", 200)
    coll = tmp_path / "coll"
    args = ["run", str(corpus.folder), "--collection", str(coll), "--eps", "0.05", "--clusters", "4"]
    first = cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    corpus.add("b", 20, near_of=[f"a-new-{i}" for i in range(5)])
    second = cli(args, tmp_path)
    assert second.returncode == 0, second.stderr
    third = cli(args, tmp_path)
    assert third.returncode == 0 and "nothing new" in third.stdout, third.stdout + third.stderr
    status = cli(["status", str(coll)], tmp_path)
    assert status.returncode == 0, status.stderr
    rows = [line for line in status.stdout.splitlines() if line.startswith("generation ")]
    assert len(rows) == 2, status.stdout
    assert rows[0].startswith("generation 0 (base") and "1 input objects, 200 items" in rows[0], rows[0]
    assert rows[1].startswith("generation 1 (generation") and "1 input objects, 25 items" in rows[1] and "against kept" in rows[1], rows[1]
    kept = sum(len(_decided(Path(generation_url(str(coll), g)))[0]) for g in (0, 1))
    assert f"kept items since the latest base (generation 0): {kept:,}" in status.stdout

    assert_fails_cleanly(cli([*args[:2], "--collection", str(tmp_path / "c2"), "--output", str(tmp_path / "o")], tmp_path), tmp_path / "c2", "--collection")
    assert_fails_cleanly(cli(["run", str(corpus.folder), "--output", str(tmp_path / "o"), "--against", "all"], tmp_path), tmp_path / "o", "collection")
    assert_fails_cleanly(cli(["status", str(corpus.folder)], tmp_path), tmp_path / "nothing", "no semdedup collection")
