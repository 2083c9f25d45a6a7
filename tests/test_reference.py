"""Reference sets (--reference): run items duplicating a reference item are removed with reason
'reference'; reference items are never removed, written or counted (real runs: run_pipeline,
faiss, torch, parquet; the CLI as a subprocess)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.inputs.precomputed import InputError
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.layout import RunLayout, is_artifact
from semdedup_core.run.plan import plan_run

from .conftest import RunResults, raw_config, run_raw, single_thread, unit_rows, write_embeddings
from .test_cli import assert_fails_cleanly, cli

DIM = 16
EPS = 0.01
_SETTINGS = dict(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _run(cfg: RunConfig) -> RunResults:
    with single_thread():
        run_pipeline(cfg)
    return RunResults(cfg.output)


def _near(rng: np.random.Generator, rows: np.ndarray, noise: float) -> np.ndarray:
    moved = rows + noise * rng.standard_normal(rows.shape).astype(np.float32)
    return (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)


def _planted(rng: np.random.Generator, n_train: int = 200, n_test: int = 30, n_planted: int = 10):
    """(train vectors, test vectors, planted train rows): the first n_planted test items are
    copied (slightly moved) into train at random rows."""
    train = unit_rows(rng, n_train, DIM)
    test = unit_rows(rng, n_test, DIM)
    rows = rng.choice(n_train, n_planted, replace=False)
    train[rows] = _near(rng, test[:n_planted], 0.001)
    return train, test, rows


def _accounted(results: RunResults, all_ids: list[str]) -> None:
    """Every input id exactly once in kept / removed / failed, and the summary's counts add up
    (raw runs: exact copies are removed without being scored, so no check on the scores)."""
    decided = [r["id"] for part in (results.kept, results.removed, results.failed) for r in part]
    assert sorted(decided) == sorted(all_ids)
    s = results.summary
    assert (s["n_kept"], s["n_removed"], s["n_failed"]) == (len(results.kept), len(results.removed), len(results.failed))
    assert s["n_kept"] + s["n_removed"] + s["n_failed"] == s["n_input"] == len(all_ids)


def _by_reason(results: RunResults) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in results.removed:
        out.setdefault(r["reason"], set()).add(r["id"])
    return out


def _brute_force_reference(out: Path, eps: float, n_references: int = 1) -> dict[str, str]:
    """Run id -> reference id it is removed for, from the stored cluster assignments and the
    stored vectors only: max over the reference items of the same cluster of the float64 dot
    product rounded to float32, > float32(1 - eps); ties go to the earlier reference set."""

    def assigned(root: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
        ids, clusters, vectors = [], [], []
        for part in sorted((root / "partitions").glob("shard-*.parquet")):
            if part.name.endswith(".failed.parquet"):
                continue
            table = pq.read_table(part)
            ids += table.column("id").to_pylist()
            clusters.append(table.column("cluster").to_numpy())
            vectors.append(np.fromfile(part.with_suffix(".f32"), dtype="<f4").reshape(table.num_rows, DIM))
        return ids, np.concatenate(clusters) if clusters else np.zeros(0, np.int32), np.concatenate(vectors) if vectors else np.zeros((0, DIM), np.float32)

    run_ids, run_clusters, run_vectors = assigned(out)
    best = np.full(len(run_ids), -np.inf)
    best_id: list[str | None] = [None] * len(run_ids)
    for r in range(n_references):
        ref_ids, ref_clusters, ref_vectors = assigned(out / "reference" / f"r-{r:05d}")
        for i, (c, v) in enumerate(zip(run_clusters, run_vectors)):
            for j in np.flatnonzero(ref_clusters == c):
                sim = np.float32(np.dot(v.astype(np.float64), ref_vectors[j].astype(np.float64)))
                if sim > best[i]:
                    best[i], best_id[i] = sim, ref_ids[j]
    threshold = np.float32(1 - eps)
    return {run_ids[i]: best_id[i] for i in range(len(run_ids)) if best[i] > threshold}


def _nowhere_decided(results: RunResults, reference_only: set[str]) -> None:
    """Reference-only ids are never kept, removed or failed, nor scored."""
    decided = {r["id"] for r in results.kept} | {r["id"] for r in results.removed} | {r["id"] for r in results.failed}
    assert not (decided | {r["id"] for r in results.scores}) & reference_only


# ---------------------------------------------------------------- planted train/test overlap


def test_planted_text_overlap_is_removed_as_reference(tiny_bert, tmp_path):
    """Raw text with the tiny text model: test documents copied into train (verbatim, with
    other case and spacing, twice) go with reason 'reference'; the distinct train documents
    stay; the test set is nowhere in the results nor in the written dataset."""
    docs = [f"document {i} about topic {i % 7} with words w{i} w{i * 3} w{i * 5}" for i in range(50)]
    test_docs = [f"held out question {i} on w{i + 7} w{i * 2 + 1} and w{i * 4 + 3}" for i in range(8)]
    train = [{"id": f"tr{i}", "text": d} for i, d in enumerate(docs)]
    train += [{"id": "copy0", "text": test_docs[0]}, {"id": "copy0-again", "text": test_docs[0]}]
    train += [{"id": "copy1-case", "text": "  " + test_docs[1].upper() + " "}, {"id": "copy2", "text": test_docs[2]}]
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    # The test set's ids collide with train's on purpose: they live apart.
    (tmp_path / "test" / "test.jsonl").write_text("".join(json.dumps({"id": f"tr{i}", "text": d}) + "\n" for i, d in enumerate(test_docs)))
    out = tmp_path / "out"
    cfg = raw_config([tmp_path / "train" / "train.jsonl"], out, model=str(tiny_bert), eps=0.001, reference=[str(tmp_path / "test" / "test.jsonl")], write_dataset=True)
    results = run_raw(cfg)
    _accounted(results, [r["id"] for r in train])
    by_reason = _by_reason(results)
    assert by_reason.get("reference") == {"copy0", "copy0-again", "copy1-case", "copy2"}
    removed = {r["id"]: r for r in results.removed}
    assert removed["copy0-again"]["dup_of"] == "tr0" and removed["copy1-case"]["dup_of"] == "tr1"  # the test items' ids
    assert all(removed[i]["kept_id"] is None for i in by_reason["reference"])
    kept = {r["id"] for r in results.kept}
    baseline = run_raw(raw_config([tmp_path / "train" / "train.jsonl"], tmp_path / "baseline", model=str(tiny_bert), eps=0.001))
    assert kept == {r["id"] for r in baseline.kept} - by_reason["reference"]  # the distinct documents: as without a reference
    assert results.summary["n_reference"] == 4 and results.summary["n_input"] == len(train)
    written = [json.loads(line)["id"] for f in (out / "dataset").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(written) == sorted(kept)
    assert not set(test_docs) & {json.loads(line)["text"] for f in (out / "dataset").glob("*.jsonl") for line in f.read_text().splitlines()}


def test_planted_embedding_overlap_matches_brute_force_to_the_rule(tmp_path):
    """Precomputed vectors: the reference removals equal a brute force over the stored
    cluster assignment; every other decision is the same run's without a reference (items
    removed by the reference still count as earlier items, as removed items always do)."""
    rng = np.random.default_rng(7)
    train, test, planted = _planted(rng)
    # In-run duplicates too, some of planted items (their copies' fate follows the rule).
    train[150:170] = _near(rng, train[np.r_[planted, 0:10]], 0.002)
    ids = [f"x{i}" for i in range(len(train))]
    write_embeddings(tmp_path / "train" / "a.parquet", ids[:120], train[:120])
    write_embeddings(tmp_path / "train" / "b.parquet", ids[120:], train[120:])
    write_embeddings(tmp_path / "test" / "t.parquet", [f"q{i}" for i in range(len(test))], test)
    common = dict(input=[str(tmp_path / "train" / "*.parquet")], clusters=5, eps=EPS, seed=3)
    results = _run(RunConfig(output=str(tmp_path / "out"), reference=[str(tmp_path / "test" / "t.parquet")], **common))
    baseline = _run(RunConfig(output=str(tmp_path / "baseline"), **common))
    results.check_accounting(ids)
    expected = _brute_force_reference(tmp_path / "out", EPS)
    assert {f"x{i}" for i in planted} <= set(expected)
    by_reason = _by_reason(results)
    assert by_reason.get("reference", set()) == set(expected)
    assert {r["id"]: r["dup_of"] for r in results.removed if r["reason"] == "reference"} == expected
    assert by_reason.get("semantic", set()) == {r["id"] for r in baseline.removed} - set(expected)
    assert {r["id"] for r in results.kept} == {r["id"] for r in baseline.kept} - set(expected)
    kept = {r["id"] for r in results.kept}
    assert all(r["kept_id"] is None or r["kept_id"] in kept for r in results.removed)
    assert results.summary["n_reference"] == len(expected)
    _nowhere_decided(results, {f"q{i}" for i in range(len(test))})


def test_target_keep_is_met_before_decontamination(tmp_path):
    """Documented rule: eps is tuned on the in-run judging; reference removals come on top."""
    rng = np.random.default_rng(11)
    train, test, planted = _planted(rng)
    train[100:160] = _near(rng, train[:60], 0.02)
    write_embeddings(tmp_path / "a.parquet", [f"x{i}" for i in range(len(train))], train)
    write_embeddings(tmp_path / "t" / "t.parquet", [f"q{i}" for i in range(len(test))], test)
    common = dict(input=[str(tmp_path / "a.parquet")], clusters=4, target_keep=0.8)
    results = _run(RunConfig(output=str(tmp_path / "out"), reference=[str(tmp_path / "t" / "t.parquet")], **common))
    baseline = _run(RunConfig(output=str(tmp_path / "baseline"), **common))
    assert results.summary["eps"] == baseline.summary["eps"]
    n_reference = results.summary["n_reference"]
    assert n_reference >= 1
    assert results.summary["n_kept"] == baseline.summary["n_kept"] - len(_by_reason(results)["reference"] - _by_reason(baseline).get("semantic", set()))


# ---------------------------------------------------------------- hostile references, by class

_odd_ids = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(**_SETTINGS)
@given(
    ids=st.lists(_odd_ids, min_size=40, max_size=40, unique=True),
    collide=st.integers(0, 20),
    planted=st.integers(0, 8),
    seed=st.integers(0, 2**16),
)
def test_reference_ids_collide_with_run_ids_or_are_odd(tmp_path_factory, ids, collide, planted, seed):
    """Any unicode ids, reference ids equal to run ids (in part or all): the two stay apart,
    every run id is decided once, every reference removal is the brute force's."""
    tmp = tmp_path_factory.mktemp("ids")
    rng = np.random.default_rng(seed)
    train, test, rows = _planted(rng, n_train=40, n_test=10, n_planted=planted)
    run_ids = ids
    ref_ids = [run_ids[i] if i < collide else f"ref-{i}-{run_ids[i]}" for i in range(10)]
    write_embeddings(tmp / "in" / "a.parquet", run_ids, train)
    write_embeddings(tmp / "ref" / "r.parquet", ref_ids, test)
    results = _run(RunConfig(input=[str(tmp / "in" / "a.parquet")], output=str(tmp / "out"), reference=[str(tmp / "ref" / "r.parquet")], clusters=3, eps=EPS))
    results.check_accounting(run_ids)
    expected = _brute_force_reference(tmp / "out", EPS)
    assert {r["id"]: r["dup_of"] for r in results.removed if r["reason"] == "reference"} == expected
    assert {run_ids[i] for i in rows} <= set(expected)
    assert set(expected.values()) <= set(ref_ids)


def _broken(rng: np.random.Generator, vectors: np.ndarray, kinds: list[str]) -> list:
    """Rows as lists, some broken (one kind per row, 'ok' leaves it)."""
    rows = []
    for v, kind in zip(vectors, kinds):
        if kind == "nan":
            v = v.copy()
            v[rng.integers(DIM)] = np.nan
        elif kind == "inf":
            v = v.copy()
            v[0] = np.inf
        elif kind == "zero":
            v = np.zeros_like(v)
        elif kind == "short":
            v = v[: DIM - 3]
        rows.append(None if kind == "null" else [float(x) for x in v])
    return rows


@settings(**_SETTINGS)
@given(kinds=st.lists(st.sampled_from(["ok", "ok", "nan", "inf", "zero", "short", "null"]), min_size=12, max_size=12), seed=st.integers(0, 2**16))
def test_broken_reference_rows_are_ignored_and_reported(tmp_path_factory, kinds, seed):
    """Unusable reference rows (NaN, inf, zero, wrong length, null) never crash the run: they
    are listed in the reference's failed file and judge nothing; the usable ones still do."""
    tmp = tmp_path_factory.mktemp("broken")
    rng = np.random.default_rng(seed)
    train, test, rows = _planted(rng, n_train=40, n_test=12, n_planted=12)
    write_embeddings(tmp / "in" / "a.parquet", [f"x{i}" for i in range(40)], train)
    table = pa.table({"id": [f"q{i}" for i in range(12)], "embedding": pa.array(_broken(rng, test, kinds), pa.list_(pa.float32()))})
    (tmp / "ref").mkdir()
    pq.write_table(table, tmp / "ref" / "r.parquet")
    cfg = RunConfig(input=[str(tmp / "in" / "a.parquet")], output=str(tmp / "out"), reference=[str(tmp / "ref" / "r.parquet")], clusters=3, eps=EPS)
    full, short = sum(k != "short" and k != "null" for k in kinds), kinds.count("short")
    if full <= short:  # the reference's own dimension is then the short one (or none): refused before anything is written
        with pytest.raises((ConfigError, InputError), match="--reference"):
            _run(cfg)
        assert not (tmp / "out").exists()
        return
    results = _run(cfg)
    results.check_accounting([f"x{i}" for i in range(40)])
    failed = pq.read_table(tmp / "out" / "reference" / "r-00000" / "partitions" / "shard-00000.failed.parquet").column("id").to_pylist()
    usable = {f"q{i}" for i, k in enumerate(kinds) if k == "ok"}
    assert set(failed) == {f"q{i}" for i in range(12)} - usable  # each broken row reported, once
    expected = _brute_force_reference(tmp / "out", EPS)
    assert {r["id"]: r["dup_of"] for r in results.removed if r["reason"] == "reference"} == expected
    assert set(expected.values()) <= usable  # only usable reference items judge
    # Every planted copy of a usable reference item that shares its cluster is removed (one in
    # another cluster is beyond SemDeDup's cluster-local search, as in any run).
    def cluster_of(root: Path) -> dict[str, int]:
        parts = [pq.read_table(p) for p in sorted((root / "partitions").glob("shard-*.parquet")) if not p.name.endswith(".failed.parquet")]
        return {i: int(c) for t in parts for i, c in zip(t.column("id").to_pylist(), t.column("cluster").to_pylist())}

    run_cluster, ref_cluster = cluster_of(tmp / "out"), cluster_of(tmp / "out" / "reference" / "r-00000")
    together = {f"x{rows[i]}" for i, k in enumerate(kinds) if k == "ok" and run_cluster[f"x{rows[i]}"] == ref_cluster[f"q{i}"]}
    assert together <= set(expected)


def test_empty_references(tiny_bert, tmp_path):
    """An empty raw reference (or one whose every item fails) removes nothing; an empty
    embeddings file is refused like an empty input, before anything is written."""
    docs = [f"document {i} about topic {i % 5} with w{i} w{i * 3}" for i in range(30)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "empty.jsonl").write_text("")
    (tmp_path / "ref" / "bad.jsonl").write_text('{"id": "b1"}\nnot json\n{"id": "b2", "text": 7}\n')
    results = run_raw(raw_config([tmp_path / "train.jsonl"], tmp_path / "out", model=str(tiny_bert), eps=0.001, reference=[str(tmp_path / "ref" / "empty.jsonl"), str(tmp_path / "ref" / "bad.jsonl")]))
    baseline = run_raw(raw_config([tmp_path / "train.jsonl"], tmp_path / "baseline", model=str(tiny_bert), eps=0.001))
    _accounted(results, [f"d{i}" for i in range(30)])
    assert results.summary["n_reference"] == 0
    assert results.decisions()["kept"] == baseline.decisions()["kept"]
    failed_refs = pq.read_table(tmp_path / "out" / "reference" / "r-00001" / "embeddings" / "shard-00000.failed.parquet")
    assert failed_refs.num_rows + pq.read_table(tmp_path / "out" / "reference" / "r-00001" / "scan" / "shard-00000.parquet").num_rows >= 1
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32()))}), tmp_path / "ref" / "empty.parquet")
    write_embeddings(tmp_path / "in.parquet", [f"x{i}" for i in range(20)], unit_rows(np.random.default_rng(0), 20, DIM))
    with pytest.raises(InputError, match="--reference .*empty.parquet"):
        plan_run(RunConfig(input=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out2"), reference=[str(tmp_path / "ref" / "empty.parquet")]))
    assert not (tmp_path / "out2").exists()


def test_reference_is_an_earlier_run_or_collection_of_ours(tmp_path):
    """An earlier run's (or collection's) stored embeddings serve as the reference, never
    recomputed: the decisions equal those with the reference's own files."""
    rng = np.random.default_rng(5)
    train, test, planted = _planted(rng)
    write_embeddings(tmp_path / "train" / "a.parquet", [f"x{i}" for i in range(len(train))], train)
    write_embeddings(tmp_path / "test" / "t.parquet", [f"q{i}" for i in range(len(test))], test)
    _run(RunConfig(input=[str(tmp_path / "test" / "t.parquet")], output=str(tmp_path / "test-run"), clusters=2, eps=EPS))
    with single_thread():
        run_pipeline(RunConfig(input=[str(tmp_path / "test" / "t.parquet")], output=str(tmp_path / "test-coll"), clusters=2, eps=EPS, collection=True))
    common = dict(input=[str(tmp_path / "train" / "a.parquet")], clusters=5, eps=EPS)
    direct = _run(RunConfig(output=str(tmp_path / "direct"), reference=[str(tmp_path / "test" / "t.parquet")], **common))
    assert _by_reason(direct)["reference"] == {f"x{i}" for i in planted}
    for name, ref in (("from-run", "test-run"), ("from-coll", "test-coll")):
        results = _run(RunConfig(output=str(tmp_path / name), reference=[str(tmp_path / ref)], **common))
        assert results.decisions()["removed"] == direct.decisions()["removed"]


def test_raw_run_with_precomputed_reference_embeddings(tiny_bert, tmp_path):
    """A raw run takes precomputed reference embeddings of its model's dimension (here: the
    file an earlier raw run of the test set wrote) or that earlier run itself (its
    embeddings, not embedded again) with the same decisions as the raw test set, and
    refuses embeddings of another dimension before anything is written."""
    test_docs = [f"held out question {i} on w{i + 7} w{i * 2 + 1}" for i in range(6)]
    docs = [f"document {i} about topic {i % 5} with w{i} w{i * 3}" for i in range(30)] + test_docs[:3]
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "text": d}) + "\n" for i, d in enumerate(test_docs)))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    run_raw(raw_config([tmp_path / "test" / "test.jsonl"], tmp_path / "test-run", model=str(tiny_bert), eps=0.001))
    common = dict(model=str(tiny_bert), eps=0.001)
    from_raw = run_raw(raw_config([tmp_path / "train.jsonl"], tmp_path / "a", reference=[str(tmp_path / "test" / "test.jsonl")], **common))
    stored = tmp_path / "test-run" / "embeddings" / "shard-00000.parquet"
    from_file = run_raw(raw_config([tmp_path / "train.jsonl"], tmp_path / "b", reference=[str(stored)], **common))
    assert _by_reason(from_raw)["reference"] == {"d30", "d31", "d32"}
    assert from_file.decisions()["removed"] == from_raw.decisions()["removed"]
    from_run = run_raw(raw_config([tmp_path / "train.jsonl"], tmp_path / "d", reference=[str(tmp_path / "test-run")], **common))
    assert from_run.decisions()["removed"] == from_raw.decisions()["removed"]
    assert (tmp_path / "a" / "reference" / "r-00000" / "embeddings").is_dir()
    assert not (tmp_path / "d" / "reference" / "r-00000" / "embeddings").exists()  # the earlier run's embeddings, not embedded again
    write_embeddings(tmp_path / "wrong" / "w.parquet", ["w0", "w1"], unit_rows(np.random.default_rng(0), 2, 8))
    with pytest.raises(ConfigError, match="--reference .*w.parquet: holds 8-d embeddings but the run's model .* makes 32-d ones"):
        plan_run(raw_config([tmp_path / "train.jsonl"], tmp_path / "c", reference=[str(tmp_path / "wrong" / "w.parquet")], **common))
    assert not (tmp_path / "c").exists()


def test_raw_run_refuses_a_run_made_with_another_model(tiny_bert, tiny_opt, tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "r.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": f"text w{i} w{i + 1}"}) + "\n" for i in range(10)))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc w{i} w{i * 2}"}) + "\n" for i in range(10)))
    run_raw(raw_config([tmp_path / "ref" / "r.jsonl"], tmp_path / "ref-run", model=str(tiny_opt), eps=0.01))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--reference .*ref-run.*tiny-opt.*this run embeds with .*tiny-bert"):
        plan_run(raw_config([tmp_path / "train.jsonl"], out, model=str(tiny_bert), reference=[str(tmp_path / "ref-run")]))
    assert not out.exists()


# ---------------------------------------------------------------- misconfigurations: exit 2, nothing written


@pytest.fixture(scope="module")
def train_and_test(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli-ref")
    rng = np.random.default_rng(2)
    train, test, _ = _planted(rng)
    write_embeddings(folder / "train" / "a.parquet", [f"x{i}" for i in range(len(train))], train)
    write_embeddings(folder / "test" / "t.parquet", [f"q{i}" for i in range(len(test))], test)
    return folder / "train" / "a.parquet", folder / "test" / "t.parquet"


@pytest.mark.parametrize(
    "reference, fragments",
    [
        ("{out}", ["--reference", "overlaps --output"]),
        ("{out}/sub", ["--reference", "overlaps --output"]),
        ("{tmp}", ["--reference", "overlaps --output"]),
        ("{tmp}/missing.parquet", ["--reference", "missing.parquet", "no input files match"]),
        ("{small}", ["--reference", "8-d embeddings but the input has 16-d"]),
        ("{train}", ["--reference", "an input of this run"]),
        ("{train_folder}/*.parquet", ["--reference", "an input of this run"]),
    ],
)
def test_misconfigured_references_exit_2_before_anything_is_written(train_and_test, tmp_path, reference, fragments):
    train, _ = train_and_test
    write_embeddings(tmp_path / "small" / "s.parquet", ["s0", "s1"], unit_rows(np.random.default_rng(1), 2, 8))
    out = tmp_path / "out"
    url = reference.format(out=out, tmp=tmp_path, small=tmp_path / "small" / "s.parquet", train=train, train_folder=train.parent)
    proc = cli(["run", str(train), "--output", str(out), "--reference", url], tmp_path)
    assert_fails_cleanly(proc, out, *fragments)


def test_reference_with_a_collection_is_refused(train_and_test, tmp_path):
    train, test = train_and_test
    out = tmp_path / "coll"
    proc = cli(["run", str(train), "--collection", str(out), "--reference", str(test)], tmp_path)
    assert_fails_cleanly(proc, out, "reference", "collection")


def test_cli_run_with_references(train_and_test, tmp_path):
    """`semdedup run --reference A --reference B`: both sets judge; the summary counts them."""
    train, test = train_and_test
    rng = np.random.default_rng(9)
    train_vectors = np.array(pq.read_table(train).column("embedding").to_pylist(), np.float32)
    second = _near(rng, train_vectors[100:103], 0.001)
    write_embeddings(tmp_path / "more" / "m.parquet", ["m0", "m1", "m2"], second)
    out = tmp_path / "out"
    proc = cli(["run", str(train), "--output", str(out), "--reference", str(test), "--reference", str(tmp_path / "more" / "m.parquet"), "--eps", str(EPS), "--clusters", "5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = RunResults(out)
    results.check_accounting([f"x{i}" for i in range(200)])
    expected = _brute_force_reference(out, EPS, n_references=2)
    assert {r["id"]: r["dup_of"] for r in results.removed if r["reason"] == "reference"} == expected
    assert {"m0", "m1", "m2"} <= set(expected.values())
    assert results.summary["n_reference"] == len(expected) and math.isclose(results.summary["eps"], EPS)


def test_a_resume_over_a_rewritten_reference_is_refused(train_and_test, tmp_path):
    """The reference's objects are fingerprinted with the inputs: rewriting one between a run
    and its re-run refuses the re-run (exit 2, one line) instead of using stale decisions."""
    train, test = train_and_test
    reference = tmp_path / "ref" / "t.parquet"
    reference.parent.mkdir()
    reference.write_bytes(test.read_bytes())
    out = tmp_path / "out"
    cfg = RunConfig(input=[str(train)], output=str(out), reference=[str(reference)], clusters=5, eps=EPS)
    first = _run(cfg)
    assert plan_run(cfg).references[0].n_input == 30  # the same reference: the run resumes
    write_embeddings(reference, [f"q{i}" for i in range(5)], unit_rows(np.random.default_rng(3), 5, DIM))
    with pytest.raises(ConfigError, match="reference .*t.parquet changed since the run"):
        plan_run(cfg)
    assert RunResults(out).decisions() == first.decisions()


def test_fresh_deletes_the_reference_artifacts_and_nothing_else(train_and_test, tmp_path):
    assert is_artifact("reference/r-00000/partitions/shard-00000.f32") and is_artifact("reference/bucket-00000.parquet")
    assert not is_artifact("reference/r-00000/notes.txt") and not is_artifact("reference/r-00000/reference/bucket-00000.parquet")
    train, test = train_and_test
    out = tmp_path / "out"
    cfg = RunConfig(input=[str(train)], output=str(out), reference=[str(test)], clusters=5, eps=EPS)
    _run(cfg)
    (out / "reference" / "r-00000" / "notes.txt").write_text("mine")
    _run(cfg.model_copy(update={"reference": [], "on_existing": "fresh"}))
    assert (out / "reference" / "r-00000" / "notes.txt").read_text() == "mine"
    assert not list((out / "reference").rglob("*.parquet"))
    assert RunLayout(str(out)).reference_run(0).endswith("reference/r-00000")
