"""The flow's Prefect artifacts, read back through the REST API of a real Prefect server (the
session's test harness): the markdown summary, the eps-curve table, the tuning table and the
progress of the embedding and dedup stages."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core.config import RunConfig
from semdedup_core.demo import make_demo_embeddings
from semdedup_core.run.stage_results import RecallEstimate, RunSummary, SimilarityHistogram

from .conftest import raw_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _flow(cfg: RunConfig) -> tuple[RunSummary, str]:
    """Run the flow; its summary and flow run id."""
    from flows.dedup_flow import semdedup_flow

    state = semdedup_flow(config=cfg, return_state=True)
    return state.result(), str(state.state_details.flow_run_id)


def _artifact(output: str, kind: str, flow_run_id: str) -> dict:
    """The artifact of this kind and output that the flow run made, from the server's REST API."""
    from prefect.settings import PREFECT_API_URL

    from flows.dedup_flow import artifact_key

    body = {"artifacts": {"key": {"any_": [artifact_key(output, kind)]}, "flow_run_id": {"any_": [flow_run_id]}}}
    request = urllib.request.Request(f"{PREFECT_API_URL.value()}/artifacts/filter", data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as r:
        found = json.load(r)
    assert len(found) == 1, (kind, found)
    return found[0]


def _table(artifact: dict) -> list[dict]:
    assert artifact["type"] == "table"
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


@pytest.fixture(scope="module")
def eps_run(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("artifacts")
    data = make_demo_embeddings(folder / "data", n_base=2500, n_planted=600, shards=3)
    cfg = RunConfig(input=[str(folder / "data" / "embeddings-*.parquet")], output=str(folder / "run"), eps=0.04, buckets=3, clusters=12, seed=3)
    summary, run_id = _flow(cfg)
    return {"cfg": cfg, "summary": summary, "run_id": run_id, "data": data}


def test_markdown_summary_formats_counts_shares_and_names_the_report(eps_run):
    summary, out = eps_run["summary"], eps_run["cfg"].output
    assert summary.n_input > 1000 and summary.n_removed > 0  # large enough for thousands separators
    artifact = _artifact(out, "summary", eps_run["run_id"])
    assert artifact["type"] == "markdown"
    text = artifact["data"]
    heading = f"### semdedup: {summary.n_kept:,} kept, {summary.n_removed:,} removed, {summary.n_failed:,} failed of {summary.n_input:,} items"
    assert text.splitlines()[0] == heading and "," in f"{summary.n_input:,}"
    assert f"| kept | {summary.n_kept:,} | {summary.n_kept / summary.n_judged:.2%} of judged |" in text
    assert f"| failed | {summary.n_failed:,} | {summary.n_failed / summary.n_input:.2%} of input |" in text
    assert f"**eps** {summary.eps:.6g}" in text and f"**achieved** {summary.kept_fraction:.2%} kept" in text
    assert f"Report: `{Path(out) / 'report' / 'index.html'}`" in text
    # The sources that lost the largest share, largest first.
    shares = sorted((s.removed / s.input, s.source) for s in summary.per_source if s.removed)[::-1]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in rows] == [source for _, source in shares[:5]]
    # The recall estimate, as clustering/recall.json holds it.
    recall = RecallEstimate.model_validate_json((Path(out) / "clustering" / "recall.json").read_text())
    assert recall.eta is not None and f"{recall.eta:.2%}" in text and f"{recall.pairs_in_nearest:,} duplicate pairs" in text
    assert "None" not in text


def test_eps_curve_table_follows_the_stored_max_sim_and_the_run(eps_run):
    summary, out = eps_run["summary"], Path(eps_run["cfg"].output)
    rows = _table(_artifact(str(out), "eps-curve", eps_run["run_id"]))
    similarity = SimilarityHistogram.model_validate_json((out / "result" / "similarity.json").read_text())
    eps = [r["eps"] for r in rows]
    assert eps == sorted(eps) and len(eps) >= 10 and summary.eps in eps
    own = [r for r in rows if r["this_run"]]
    assert own == [{"eps": summary.eps, "kept_fraction": summary.kept_fraction, "kept_items": summary.n_kept, "this_run": True}]
    others = [r for r in rows if not r["this_run"]]
    expected = similarity.kept_fraction_at([r["eps"] for r in others])
    assert [r["kept_fraction"] for r in others] == expected.tolist()
    assert [r["kept_items"] for r in others] == [round(f * summary.n_judged) for f in expected]
    # More eps removes more: the kept fraction never rises along the grid.
    assert all(a["kept_fraction"] >= b["kept_fraction"] for a, b in zip(rows, rows[1:]))
    # Against the stored scores: each grid row within one histogram bin of a direct count.
    scores = pa.concat_tables([pq.read_table(p) for p in sorted((out / "scores").glob("bucket-*[0-9].parquet"))])
    max_sim = scores.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32)
    for r in others:
        threshold = np.float32(1.0 - r["eps"])
        with np.errstate(invalid="ignore"):
            direct = int((~(max_sim > threshold)).sum())
            near = int((np.abs(max_sim.astype(np.float64) - (1.0 - r["eps"])) <= similarity.width).sum())
        assert abs(r["kept_items"] - direct) <= near, r


def test_dedup_progress_reaches_the_end_with_every_bucket(eps_run):
    artifact = _artifact(eps_run["cfg"].output, "dedup", eps_run["run_id"])
    assert artifact["type"] == "progress" and float(artifact["data"]) == 100.0
    assert artifact["description"].endswith(": 3 of 3 buckets done")


def test_raw_run_with_a_target_shows_embedding_progress_and_tuning(tmp_path, tiny_bert):
    words = [f"w{i}" for i in range(60)]
    rng = np.random.default_rng(5)
    for part in range(2):
        texts = [" ".join(rng.choice(words, 10)) for _ in range(30)]
        texts += [t + " w7" for t in texts[:8]]
        (tmp_path / f"part-{part}.jsonl").write_text("".join(json.dumps({"id": f"{part}-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = raw_config([tmp_path / "part-0.jsonl", tmp_path / "part-1.jsonl"], tmp_path / "run", model=str(tiny_bert), target_keep=0.75)
    summary, run_id = _flow(cfg)
    progress = _artifact(cfg.output, "embedding", run_id)
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    assert progress["description"].endswith(": 2 of 2 shards done")
    text = _artifact(cfg.output, "summary", run_id)["data"]
    assert f"**target kept fraction** {0.75:.2%}" in text and f"**achieved** {summary.kept_fraction:.2%} kept" in text
    assert f"**sample predicted** {summary.predicted_kept_fraction:.2%}" in text
    tuning = _table(_artifact(cfg.output, "tuning", run_id))
    assert tuning == [{"target_keep": 0.75, "tuning": "exact", "eps": summary.eps, "sampled_eps": summary.sampled_eps,
                       "predicted_kept_fraction": summary.predicted_kept_fraction, "kept_fraction": summary.kept_fraction}]
    curve = _table(_artifact(cfg.output, "eps-curve", run_id))
    assert [r for r in curve if r["this_run"]] == [{"eps": summary.eps, "kept_fraction": summary.kept_fraction, "kept_items": summary.n_kept, "this_run": True}]


def test_markdown_lists_warnings_skipped_estimates_and_odd_source_names(eps_run):
    from flows.dedup_flow import summary_markdown
    from semdedup_core.run.layout import RunLayout

    summary = eps_run["summary"]
    odd = summary.per_source[0].model_copy(update={"source": "s3://b/a|b`c.parquet", "removed": summary.per_source[0].input})
    changed = summary.model_copy(update={"warnings": ["target missed by 12 items"], "per_source": [odd, *summary.per_source[1:]]})
    skipped = RecallEstimate(eps=0.04, seed=3, sample_items=0, nearest_clusters=5, pairs_in_cluster=0, pairs_in_nearest=0, eta=None, skipped="a collection generation")
    text = summary_markdown(changed, RunLayout(summary.output), skipped)
    assert "#### Warnings\n\n- target missed by 12 items" in text
    assert "(η)** not estimated: a collection generation." in text
    row = next(line for line in text.splitlines() if line.startswith("| `s3://"))
    assert row.startswith("| `s3://b/a\\|b'c.parquet` |") and row.endswith("| 100.00% |")
