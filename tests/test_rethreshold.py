"""``semdedup rethreshold``: a finished run's decisions at another eps or target, from its
stored scores, equal to a fresh run at that threshold, without touching the source."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.collection import generation_url
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.rethreshold import rethreshold_config

from .conftest import RunResults, raw_config, single_thread, unit_rows, write_embeddings
from .test_cli import cli

SOURCE_EPS = 0.05


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Two shards: unit vectors, near copies at a spread of similarities, exact copies and
    rows that fail (NaN, zero norm)."""
    root = tmp_path_factory.mktemp("rethreshold")
    rng = np.random.default_rng(7)
    base = unit_rows(rng, 500, 12)
    noise = rng.uniform(0.005, 0.4, (150, 1)).astype(np.float32)
    near = _unit(base[:150] + noise * rng.standard_normal((150, 12)).astype(np.float32))
    bad = np.zeros((4, 12), np.float32)
    bad[:2] = np.nan
    vectors = np.concatenate([base, near, base[200:230], bad])
    ids = [f"v{i}" for i in range(len(vectors))]
    order = rng.permutation(len(vectors))
    half = len(order) // 2
    for name, part in (("a", order[:half]), ("b", order[half:])):
        write_embeddings(root / "in" / f"{name}.parquet", [ids[i] for i in part], vectors[part])
    return {"root": root, "glob": str(root / "in" / "*.parquet"), "ids": ids}


def _run(cfg: RunConfig) -> RunResults:
    with single_thread():
        run_pipeline(cfg)
    return RunResults(cfg.output)


def _fresh(data: dict, out: Path, **threshold) -> RunResults:
    return _run(RunConfig(input=[data["glob"]], output=str(out), buckets=3, **threshold))


@pytest.fixture(scope="module")
def source(data) -> str:
    out = data["root"] / "source"
    _fresh(data, out, eps=SOURCE_EPS)
    return str(out)


def _snapshot(folder: str) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content digest and mtime."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def _same_decisions(a: RunResults, b: RunResults) -> None:
    """kept / removed (dup_of, kept_id, reason, source, max_sim bits) / failed, and the scores."""
    assert a.decisions() == b.decisions()
    assert a.removed == b.removed and a.failed == b.failed
    assert sorted(r["id"] for r in a.kept) == sorted(r["id"] for r in b.kept)
    for key in ("n_input", "n_judged", "n_kept", "n_removed", "n_exact", "n_failed", "eps", "kept_fraction", "target_keep",
                "tuning", "sampled_eps", "predicted_kept_fraction", "per_source", "clusters", "buckets"):
        assert a.summary[key] == b.summary[key], key


def test_at_the_runs_own_eps_it_reproduces_the_run(data, source, tmp_path):
    before = _snapshot(source)
    again = _run(rethreshold_config(source, str(tmp_path / "again"), eps=SOURCE_EPS))
    original = RunResults(source)
    _same_decisions(original, again)
    again.check_accounting(data["ids"])
    assert original.failed and original.removed  # the data exercises every outcome
    assert _snapshot(source) == before


@pytest.mark.parametrize("threshold", [{"eps": 0.002}, {"eps": 0.3}, {"target_keep": 0.7}], ids=["eps=0.002", "eps=0.3", "target_keep=0.7"])
def test_another_threshold_equals_a_fresh_run_at_it(data, source, tmp_path, threshold):
    before = _snapshot(source)
    fresh = _fresh(data, tmp_path / "fresh", **threshold)
    derived = _run(rethreshold_config(source, str(tmp_path / "derived"), **threshold))
    _same_decisions(fresh, derived)
    derived.check_accounting(data["ids"])
    assert _snapshot(source) == before
    record = json.loads((tmp_path / "derived" / "run.json").read_text())
    assert record["parent_run"] == source
    # Nothing recomputed: the derived run holds no embeddings, centroids or partitions of its own;
    # of clustering/ only the recall estimate, which depends on eps.
    assert not any((tmp_path / "derived" / d).exists() for d in ("embeddings", "partitions", "scan", "exact"))
    assert sorted(p.name for p in (tmp_path / "derived" / "clustering").iterdir()) == ["recall.json"]
    recall = json.loads((tmp_path / "derived" / "clustering" / "recall.json").read_text())
    assert recall["eta"] is None and source in recall["skipped"]  # not searched again: the source holds it


def test_a_target_with_sample_tuning_equals_a_fresh_run(data, tmp_path):
    source = str(tmp_path / "source")
    _fresh(data, source, target_keep=0.9, tuning="sample")
    fresh = _fresh(data, tmp_path / "fresh", target_keep=0.6, tuning="sample")
    derived = _run(rethreshold_config(source, str(tmp_path / "derived"), target_keep=0.6))
    assert derived.summary["tuning"] == "sample"
    _same_decisions(fresh, derived)


def test_a_rethreshold_of_a_rethreshold_reads_the_origin(data, source, tmp_path):
    first = str(tmp_path / "first")
    _run(rethreshold_config(source, first, eps=0.2))
    second = rethreshold_config(first, str(tmp_path / "second"), eps=0.01)
    assert second.rethreshold_of == source
    _same_decisions(_fresh(data, tmp_path / "fresh", eps=0.01), _run(second))


def _boundary_eps(source: str) -> list[float]:
    """eps with float32(1 - eps) equal to a stored max_sim exactly (those items must be kept)."""
    sims = np.concatenate([pq.read_table(p, columns=["max_sim"]).column("max_sim").drop_null().to_numpy() for p in sorted(Path(source, "scores").glob("*.parquet"))])
    sims = np.unique(sims[(sims >= 0.5) & (sims < 1)])  # 1 - (1 - m) is exact in float64 for m in [0.5, 1]
    return [1.0 - float(m) for m in sims[:: max(1, len(sims) // 15)]]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.data())
def test_any_eps_keeps_exactly_the_items_at_or_below_the_threshold(data, source, tmp_path_factory, pick):
    eps = pick.draw(st.one_of(st.floats(1e-7, 0.999, allow_nan=False), st.sampled_from(_boundary_eps(source))))
    out = tmp_path_factory.mktemp("eps")
    derived = _run(rethreshold_config(source, str(out / "derived"), eps=eps))
    derived.check_accounting(data["ids"])
    threshold = np.float32(1.0 - eps)
    scored = {r["id"]: r["max_sim"] for r in RunResults(source).scores}
    want_removed = {i for i, m in scored.items() if m is not None and np.float32(m) > threshold}
    exact = {r["id"] for r in RunResults(source).removed if r["reason"] == "exact"}
    assert {r["id"] for r in derived.removed} == want_removed | exact
    assert {r["id"] for r in derived.kept} == set(scored) - want_removed
    if float(1.0 - eps) in {float(m) for m in scored.values() if m is not None}:
        assert any(np.float32(m) == threshold for i, m in scored.items() if i in {r["id"] for r in derived.kept} and m is not None)


def test_an_interrupted_rethreshold_resumes_to_the_same_result(source, tmp_path):
    out = str(tmp_path / "derived")
    cfg = rethreshold_config(source, out, target_keep=0.75)
    complete = _run(cfg).decisions()
    # A crash after the first bucket: later markers and the result gone, a half-written temp file left.
    for marker in ("scores/bucket-00001.json", "scores/bucket-00002.json", "tuning/result.json", "result/summary.json"):
        os.remove(Path(out, marker))
    Path(out, "scores", "bucket-00002.parquet.semdedup-tmp-" + "0" * 32).write_bytes(b"partial")
    assert _run(cfg).decisions() == complete
    assert not list(Path(out, "scores").glob("*semdedup-tmp*"))


def test_raw_text_rethreshold_equals_a_fresh_run(tiny_bert, tmp_path):
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(60)]
    docs = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(40)]
    docs += [docs[i] + " w1" for i in range(8)] + [docs[3], docs[5].upper()]  # near copies, exact copies
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(docs)] + [json.dumps({"id": "empty", "text": ""})]
    (data / "docs.jsonl").write_text("\n".join(lines) + "\n")
    source = tmp_path / "source"
    _run(raw_config([data], source, model=str(tiny_bert), eps=0.02, clusters=3))
    fresh = _run(raw_config([data], tmp_path / "fresh", model=str(tiny_bert), eps=0.2, clusters=3, write_dataset=True))
    derived = _run(rethreshold_config(str(source), str(tmp_path / "derived"), eps=0.2, write_dataset=True))
    _same_decisions(fresh, derived)
    assert {r["reason"] for r in derived.removed} == {"semantic", "exact"} and derived.failed
    assert (tmp_path / "derived" / "dataset" / "docs.jsonl").read_bytes() == (tmp_path / "fresh" / "dataset" / "docs.jsonl").read_bytes()


# ---------------------------------------------------------------- the command line


def test_cli_rethreshold_writes_the_dataset_and_a_finished_one_is_reused(data, source, tmp_path):
    before = _snapshot(source)
    out = tmp_path / "cli"
    done = cli(["rethreshold", source, "--eps", "0.3", "--to", str(out), "--write-dataset"], tmp_path)
    assert done.returncode == 0, done.stderr
    derived = RunResults(out)
    expected = _run(rethreshold_config(source, str(tmp_path / "inproc"), eps=0.3))
    _same_decisions(expected, derived)
    written = {i for name in ("a", "b") for i in pq.read_table(out / "dataset" / f"{name}.parquet").column("id").to_pylist()}
    assert written == {r["id"] for r in derived.kept}
    assert _snapshot(source) == before
    again = cli(["rethreshold", source, "--eps", "0.3", "--to", str(out)], tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr


@pytest.fixture(scope="module")
def unfinished(source, tmp_path_factory) -> str:
    """A copy of the source whose finalize never ran."""
    copy = tmp_path_factory.mktemp("unfinished") / "run"
    shutil.copytree(source, copy)
    (copy / "result" / "summary.json").unlink()
    return str(copy)


@pytest.fixture(scope="module")
def collection(data, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("collection") / "c"
    with single_thread():
        run_pipeline(RunConfig(input=[data["glob"]], output=str(root), collection=True, eps=SOURCE_EPS))
    return str(root)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("both", "exactly one of --eps or --target-keep"),
        ("neither", "exactly one of --eps or --target-keep"),
        ("eps out of range", "eps"),
        ("target out of range", "target_keep"),
        ("not a run", "holds no semdedup run"),
        ("to is the source", "overlaps the source run"),
        ("to inside the source", "overlaps the source run"),
        ("to holds the source", "overlaps the source run"),
        ("to inside the input", "overlaps the input"),
        ("to holds other files", "holds no semdedup run"),
        ("unfinished source", "has not finished"),
        ("collection", "holds no semdedup run"),
        ("generation", "collection"),
        ("to holds another rethreshold", "holds another run"),
    ],
)
def test_refusals_exit_2_in_one_line_writing_nothing(data, source, unfinished, collection, tmp_path, case, fragment):
    to = tmp_path / "new"
    args = {
        "both": [source, "--eps", "0.1", "--target-keep", "0.5"],
        "neither": [source],
        "eps out of range": [source, "--eps", "1.5"],
        "target out of range": [source, "--target-keep", "0"],
        "not a run": [str(data["root"] / "in"), "--eps", "0.1"],
        "unfinished source": [unfinished, "--eps", "0.1"],
        "collection": [collection, "--eps", "0.1"],
        "generation": [generation_url(collection, 0), "--eps", "0.1"],
    }.get(case, [source, "--eps", "0.1"])
    if case == "to is the source":
        to = Path(source)
    elif case == "to inside the source":
        to = Path(source) / "derived"
    elif case == "to holds the source":
        to = Path(source).parent
    elif case == "to inside the input":
        to = data["root"] / "in" / "derived.parquet"  # a folder the input glob would match
    elif case == "to holds other files":
        to.mkdir()
        (to / "notes.txt").write_text("mine")
    elif case == "to holds another rethreshold":
        _run(rethreshold_config(source, str(to), eps=0.2))
    watched = {p: _snapshot(str(p)) for p in (Path(source), data["root"] / "in", Path(unfinished), Path(collection))}
    to_before = _snapshot(str(to)) if to.exists() else None
    done = cli(["rethreshold", *args, "--to", str(to)], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semdedup: error:") and fragment in lines[0], done.stderr
    assert {p: _snapshot(str(p)) for p in watched} == watched
    assert (_snapshot(str(to)) if to.exists() else None) == to_before


def test_the_library_refuses_a_rethreshold_of_a_collection_in_the_config():
    with pytest.raises(ConfigError):
        RunConfig.load(None, input=["x"], output="y", collection=True, rethreshold_of="z")
