"""`semdedup explain OUTPUT ID` against the stored scores of real runs: the dup_of chain of a
removed item ends at a kept item, the flip eps agrees with the stored max_sim, unknown ids
and unfinished runs exit 2 with one line; ids of every odd kind."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from semdedup_core.config import RunConfig
from semdedup_core.dedup.kernel import removed_mask
from semdedup_core.results.items import UnknownItem, explain
from semdedup_core.run.layout import RunLayout
from tests.conftest import raw_config, run_raw, unit_rows, write_embeddings

ODD = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Ids of the kinds that break lookups: numbers as text, quotes, unicode, spaces, filter syntax.
ODD_IDS = [
    "0", "00", "007", "1e3", "-1", "1.0", "NaN", "None", "null", "true", "'", '"', "a'b\"c", "x = 1", "id in ('a')",
    "naïve", "日本語", "🙂", "Ünïcödé", " leading", "trailing ", "tab\there", "new\nline", "back\\slash", "%s", "{}", "[1]",
    "Ω≈ç√", "ﬁ", "e\u0301", "é",
]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """A run on precomputed embeddings: near-copy groups (so dup_of chains form) under odd ids."""
    tmp = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(11)
    ids = ODD_IDS + [str(i) for i in range(100, 160)]
    centres = unit_rows(rng, 12, 16)
    vectors = centres[np.arange(len(ids)) % 12] + 0.04 * rng.standard_normal((len(ids), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(ids))
    write_embeddings(tmp / "data/emb.parquet", [ids[i] for i in order], vectors[order])
    out = tmp / "out"
    run_raw(RunConfig(input=[str(tmp / "data/emb.parquet")], output=str(out), eps=0.01, clusters=3))
    return out, ids


def _decisions(out) -> dict[str, str]:
    decided = {}
    for kind in ("kept", "removed", "failed"):
        decided.update(dict.fromkeys(pq.read_table(out / f"result/{kind}.parquet", columns=["id"]).column("id").to_pylist(), kind))
    return decided


def test_every_removed_item_chains_to_a_kept_item_and_flips_where_its_max_sim_says(odd_run):
    out, ids = odd_run
    decided = _decisions(out)
    removed = {r["id"]: r for r in pq.read_table(out / "result/removed.parquet").to_pylist()}
    eps = json.loads((out / "result/summary.json").read_text())["eps"]
    longest = 0
    for item in ids:
        ex = explain(RunLayout(str(out)), item)
        assert ex.decision == decided[item]
        if ex.score is None or ex.score.max_sim is None:
            assert ex.decision == "kept" and ex.flip_eps is None
            continue
        m = np.float32(ex.score.max_sim)
        assert removed_mask(np.array([m]), eps)[0] == (ex.decision == "removed")
        # At flip_eps the item is kept; any eps beyond it (past float32 rounding) removes it.
        assert not removed_mask(np.array([m]), ex.flip_eps)[0] and removed_mask(np.array([m]), ex.flip_eps + 1e-6)[0]
        assert ex.flip == ("kept" if ex.decision == "removed" else "removed")
        if ex.decision == "removed":
            assert ex.chain[0][0] == ex.score.dup_of and ex.kept_id == ex.chain[-1][0] == removed[item]["kept_id"]
            assert decided[ex.kept_id] == "kept" and all(decided[hop] == "removed" for hop, _ in ex.chain[:-1])
            longest = max(longest, len(ex.chain))
        assert ex.representative in decided
        assert all(c.note and "precomputed" in c.note for c in ex.contents.values())
    assert longest >= 2  # some chain passes through another removed item


_absent = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=12),
    st.integers().map(str),
    st.floats(allow_nan=True).map(repr),
    st.sampled_from(ODD_IDS).map(lambda s: s + "\u200b"),
)


@ODD
@given(item=_absent)
def test_unknown_ids_exit_2_with_one_line(odd_run, item):
    out, ids = odd_run
    if item in ids:
        return
    with pytest.raises(UnknownItem):
        explain(RunLayout(str(out)), item)
    from flows.cli import app

    result = CliRunner().invoke(app, ["explain", str(out), "--", item])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@ODD
@given(item=st.sampled_from(ODD_IDS))
def test_cli_explains_odd_ids(odd_run, item):
    out, _ = odd_run
    from flows.cli import app

    result = CliRunner().invoke(app, ["explain", str(out), "--", item])
    assert result.exit_code == 0, result.output
    decided = _decisions(out)[item]
    assert decided in result.output.split("\n")[0]


def test_explain_shows_both_texts_and_refuses_an_unfinished_run(tiny_bert, tmp_path):
    rng = np.random.default_rng(2)
    base = [" ".join(f"w{w}" for w in rng.integers(0, 60, 20)) for _ in range(3)]
    texts = [" ".join(w if rng.random() > 0.1 else "w7" for w in base[i % 3].split()) for i in range(24)]
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(texts)] + [json.dumps({"id": "blank", "text": "   "}), json.dumps({"id": "copy", "text": texts[5]})]
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_raw(raw_config([data], out, model=str(tiny_bert), eps=0.01))
    removed = pq.read_table(out / "result/removed.parquet").to_pylist()
    semantic = next(r for r in removed if r["reason"] == "semantic")
    env = {**__import__("os").environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "explain", str(out), semantic["id"]], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    by_id = {f"t{i}": t for i, t in enumerate(texts)}
    assert "removed" in said and by_id[semantic["id"]][:40] in said and by_id[semantic["dup_of"]][:40] in said
    assert f"kept at eps <= {1 - semantic['max_sim']:.6g}" in said
    failed = subprocess.run([sys.executable, "-m", "flows.cli", "explain", str(out), "blank"], capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode == 0 and "'blank': failed - text is only whitespace" in " ".join(failed.stdout.split()), failed.stdout + failed.stderr
    copy = explain(RunLayout(str(out)), "copy")
    stored = next(r for r in removed if r["id"] == "copy")
    assert copy.decision == "removed" and "identical content" in copy.reason and copy.flip_eps is None
    assert copy.chain == [(stored["dup_of"], None)] and copy.kept_id == stored["kept_id"] and copy.contents["copy"].text == texts[5]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    refused = subprocess.run([sys.executable, "-m", "flows.cli", "explain", str(unfinished), "t1"], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and "no finished semdedup run" in refused.stderr
