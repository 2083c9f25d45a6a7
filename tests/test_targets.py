"""--target-keep F keeps F of the judged items (input minus failed; exact copies count as
removed): met on all items by default, or the paper's sampled eps with --tuning sample."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.dedup import scoring as dedup
from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.dedup.kernel import removed_mask
from semdedup_core.run.dag import run_pipeline
from semdedup_core.dedup.tuning import choose_eps, sample_clusters, threshold_keeping

from .conftest import RunResults, fast_embeddings, raw_config, run_raw, single_thread
from .test_cli import assert_fails_cleanly, cli

DIM = 32
TOPICS = 40
TARGET = 0.7


def nearest_reachable_kept(max_sims: list, target: float, judged: int) -> tuple[int, set[int]]:
    """(round(target x judged), the kept counts a threshold on max_sim can reach that are nearest
    to it): items with a null max_sim are always kept, tied values go together."""
    wanted = math.floor(target * judged + 0.5)
    finite = np.sort(np.array([v for v in max_sims if v is not None], np.float32))
    n_first = len(max_sims) - len(finite)
    reachable = [n_first] + [n_first + int(np.searchsorted(finite, v, side="right")) for v in np.unique(finite)]
    best = min(abs(c - wanted) for c in reachable)
    return wanted, {c for c in reachable if abs(c - wanted) == best}


def check_kept_column(res: RunResults) -> None:
    """scores.kept is the decision at the run's eps, and the result files agree with it."""
    max_sim = np.array([np.nan if r["max_sim"] is None else r["max_sim"] for r in res.scores], np.float32)
    kept = np.array([r["kept"] for r in res.scores])
    assert np.array_equal(kept, ~removed_mask(max_sim, res.summary["eps"]))
    assert {r["id"] for r in res.scores if r["kept"]} == {r["id"] for r in res.kept}


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """Well separated topics whose share of near copies runs from none to most: a sample of a
    few clusters predicts the kept fraction of the whole poorly."""
    rng = np.random.default_rng(4)
    centers = rng.standard_normal((TOPICS, DIM)) * 3
    parts = []
    for t in range(TOPICS):
        base = centers[t] + rng.standard_normal((60, DIM))
        n_copies = int(60 * t / TOPICS)
        copies = base[rng.integers(0, 60, n_copies)] + 0.03 * rng.standard_normal((n_copies, DIM))
        parts += [base, copies]
    vectors = np.concatenate(parts)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    vectors = vectors[rng.permutation(len(vectors))]
    ids = [f"u{i}" for i in range(len(vectors))]
    folder = tmp_path_factory.mktemp("uneven")
    for s, part in enumerate(np.array_split(np.arange(len(ids)), 2)):
        fast_embeddings(folder / f"part-{s}.parquet", [ids[i] for i in part], vectors[part])
    return str(folder / "part-*.parquet"), ids


def _target_run(glob: str, out, **kw) -> tuple[RunResults, list[logging.LogRecord]]:
    """An in-process run and the warnings it logged (caplog is function-scoped; fixtures here are not)."""
    cfg = RunConfig(input=[glob], output=str(out), clusters=TOPICS, target_keep=TARGET, seed=2, tuning_min_items=1, **kw)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("semdedup_core")
    logger.addHandler(handler)
    try:
        with single_thread():
            run_pipeline(cfg)
    finally:
        logger.removeHandler(handler)
    return RunResults(out), records


@pytest.fixture(scope="module")
def exact_run(uneven_data, tmp_path_factory) -> tuple[RunResults, list[logging.LogRecord]]:
    return _target_run(uneven_data[0], tmp_path_factory.mktemp("exact") / "run")


@pytest.fixture(scope="module")
def sample_run(uneven_data, tmp_path_factory) -> tuple[RunResults, list[logging.LogRecord]]:
    return _target_run(uneven_data[0], tmp_path_factory.mktemp("sample") / "run", tuning="sample")


def test_exact_tuning_keeps_the_target_to_the_item(exact_run, uneven_data):
    (res, warnings), ids = exact_run, uneven_data[1]
    res.check_accounting(ids)
    s = res.summary
    assert s["tuning"] == "exact" and s["n_failed"] == 0 and s["n_judged"] == len(ids)
    wanted, nearest = nearest_reachable_kept([r["max_sim"] for r in res.scores], TARGET, len(ids))
    assert s["n_kept"] in nearest, (s["n_kept"], wanted, nearest)
    assert s["kept_fraction"] == s["n_kept"] / len(ids)
    check_kept_column(res)
    tuned = json.loads((Path(res.root) / "tuning" / "result.json").read_text())
    assert tuned["eps"] == s["eps"] and tuned["sampled_eps"] == s["sampled_eps"] != s["eps"]
    assert tuned["n_kept"] == s["n_kept"] and tuned["target_n_kept"] == wanted
    assert warnings == []


def test_sampled_tuning_is_the_papers_eps_and_warns_when_it_misses(sample_run, exact_run, uneven_data):
    (res, warnings), ids = sample_run, uneven_data[1]
    res.check_accounting(ids)
    s = res.summary
    assert s["tuning"] == "sample" and s["eps"] == s["sampled_eps"] == exact_run[0].summary["sampled_eps"]
    # The paper's recipe on the same seeded sample of clusters, recomputed from the scores.
    sizes = np.bincount([r["cluster"] for r in res.scores], minlength=TOPICS)
    chosen = set(sample_clusters(sizes, 0.1, seed=2, min_items=1).tolist())
    sample = np.array([np.nan if r["max_sim"] is None else r["max_sim"] for r in res.scores if r["cluster"] in chosen], np.float32)
    eps, predicted, _, _ = choose_eps(sample, TARGET)
    assert s["eps"] == eps and s["predicted_kept_fraction"] == pytest.approx(predicted)
    check_kept_column(res)
    assert abs(s["kept_fraction"] - TARGET) > 0.01  # this data is chosen so that the sample misses
    assert len(warnings) == 1 and "missed" in warnings[0].getMessage() and f"{s['kept_fraction']:.4f}" in warnings[0].getMessage()
    # Same scores either way: only the threshold differs.
    same = {r["id"]: (r["cluster"], r["max_sim"], r["dup_of"]) for r in exact_run[0].scores}
    assert {r["id"]: (r["cluster"], r["max_sim"], r["dup_of"]) for r in res.scores} == same


def test_sampled_clusters_are_scored_once(uneven_data, tmp_path, monkeypatch):
    scored: list[int] = []
    real = dedup.cluster_max_sim

    def counting(y, *args, **kwargs):
        scored.append(len(y))
        return real(y, *args, **kwargs)

    monkeypatch.setattr(dedup, "cluster_max_sim", counting)
    res, _ = _target_run(uneven_data[0], tmp_path / "run", tuning_cluster_fraction=0.3)
    sizes = np.bincount([r["cluster"] for r in res.scores], minlength=TOPICS)
    assert sorted(scored) == sorted(sizes[sizes > 0].tolist())  # every cluster once, sampled ones included
    assert len(list((tmp_path / "run" / "tuning").glob("sample-bucket-*.parquet"))) >= 1


def test_sample_is_sized_by_items_too():
    sizes = np.array([1000, 2, 3, 2, 1, 0, 2, 3, 1, 2, 3, 4])
    for seed in range(20):
        chosen = sample_clusters(sizes, 0.1, seed, min_items=500)
        assert sizes[chosen].sum() >= 500 and np.all(sizes[chosen] > 0)
    few = sample_clusters(sizes, 0.1, 3, min_items=1)
    assert sizes[few].sum() >= math.ceil(0.1 * sizes.sum())
    assert sample_clusters(sizes, 0.1, 3, min_items=10**6).tolist() == np.flatnonzero(sizes).tolist()


# max_sim values of every class: ties, both zeros, negatives, exact copies at 1.0 and just above
# (float32 rounding of a unit vector's self-similarity), tiny values, neighbours in float32.
_SPECIAL = [0.0, -0.0, -0.5, 1.0, 1.0000001, 0.99999994, 2.0**-30, 2.0**-24, 0.5, np.nextafter(np.float32(0.5), np.float32(1))]
max_sim_values = st.lists(st.one_of(st.sampled_from(_SPECIAL), st.floats(-1, float(np.float32(1.0000002)), width=32)), max_size=200)


@settings(max_examples=60, deadline=None)
@given(values=max_sim_values, n_first=st.integers(0, 5), share=st.floats(0, 1), chunk=st.integers(1, 50))
def test_threshold_keeps_the_nearest_reachable_count(values, n_first, share, chunk):
    finite = np.array(values, np.float32)
    n_items = len(finite) + n_first
    wanted = math.floor(share * n_items + 0.5)
    calls = []

    def stream():
        calls.append(1)
        return (finite[i : i + chunk] for i in range(0, len(finite), chunk))

    threshold, kept = threshold_keeping(stream, n_items, wanted)
    eps = 1.0 - float(threshold)
    assert 0 < eps < 1 and np.float32(1.0 - eps) == threshold  # an eps a user can pass back
    assert kept == n_first + int((finite <= threshold).sum())
    # Every threshold such an eps reaches: each value, just below each value, and the two ends.
    low, high = np.float32(2.0**-24), np.float32(1 - 2.0**-24)
    candidates = {low, high} | {t for v in finite for t in (v, np.nextafter(v, np.float32(-np.inf))) if low <= t <= high}
    reachable = {n_first + int((finite <= t).sum()) for t in candidates}
    assert abs(kept - wanted) == min(abs(c - wanted) for c in reachable)
    assert len(calls) <= 3


def test_tuning_sample_without_a_target_is_a_misconfiguration(tmp_path):
    with pytest.raises(ConfigError, match="tuning"):
        RunConfig.load(input=["x"], output=str(tmp_path / "o"), eps=0.1, tuning="sample")
    with pytest.raises(ConfigError, match="tuning"):
        RunConfig.load(input=["x"], output=str(tmp_path / "o"), target_keep=0.5, tuning="best")


# ---------------------------------------------------------------- exact copies of raw inputs


WORDS = [f"w{i}" for i in range(60)]


def test_raw_text_exact_copies_count_as_removed(tiny_bert, tmp_path):
    rng = np.random.default_rng(9)
    docs = [" ".join(rng.choice(WORDS, size=8)) for _ in range(70)]
    docs += [docs[i] for i in rng.choice(70, 30)]  # 30 exact copies
    docs.append("")  # fails: nothing to embed
    order = rng.permutation(len(docs))
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"id": f"d{i}", "text": docs[i]}) for i in order]
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    res = run_raw(raw_config([data / "a.jsonl"], tmp_path / "out", model=str(tiny_bert), clusters=3, target_keep=0.5))
    s = res.summary
    judged = s["n_input"] - s["n_failed"]
    assert s["n_exact"] == 30 and judged == s["n_embedded"] + 30
    wanted, nearest = nearest_reachable_kept([r["max_sim"] for r in res.scores], 0.5, judged)
    assert s["n_kept"] in nearest, (s["n_kept"], wanted, nearest)
    assert wanted != math.floor(0.5 * s["n_embedded"] + 0.5)  # the denominator matters here
    assert s["kept_fraction"] == s["n_kept"] / judged and s["n_judged"] == judged
    check_kept_column(res)


# ---------------------------------------------------------------- the CLI


def test_cli_tuning_sample_prints_one_warning_line(uneven_data, sample_run, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text("tuning-min-items: 1\n")
    args = ["run", uneven_data[0], "--output", str(out), "--clusters", str(TOPICS), "--seed", "2", "--target-keep", str(TARGET), "--tuning", "sample", "--config", str(config)]
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "result" / "summary.json").read_text())
    expected = sample_run[0].summary  # the flow under Prefect decides as the in-process run
    assert (summary["tuning"], summary["eps"], summary["n_kept"]) == ("sample", expected["eps"], expected["n_kept"])
    missed = [line for line in proc.stderr.splitlines() if "missed" in line]
    assert len(missed) == 1, proc.stderr


def test_cli_tuning_value_is_checked(tmp_path, uneven_data):
    out = tmp_path / "out"
    assert_fails_cleanly(cli(["run", uneven_data[0], "--output", str(out), "--eps", "0.1", "--tuning", "sample"], tmp_path), out, "tuning")
