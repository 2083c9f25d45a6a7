"""The report of a run with millions of items stays within bounded memory: finalize's pair
sampler fed bucket by bucket, then the page rendered from the stored aggregates, reading the
sampled items' text from multi-million-row scan files, never the whole of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_core.run.layout import RunLayout
from semdedup_core.run.stage_results import FitResult, RunSummary, SimilarityHistogram, SourceCounts
from semdedup_core.storage import write_json, write_npy

N_ITEMS, N_SHARDS, N_BUCKETS, CLUSTERS = 3_000_000, 3, 30, 2000
EPS = 0.05
N_FAILED = 300_000

# Runs in a fresh interpreter: the peak RSS (Linux's VmHWM, reset through clear_refs after
# the imports and one warm-up figure, matplotlib's own fixed cost) over the RSS then, while
# the report is built as the pipeline builds it; then the same for a full read of one scan
# file, which shows the measure sees what a full read would take.
_MEASURE = r"""
import json, re, sys
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from semdedup_core.results.report import PairSampler, render_report, _figure, _svg
from semdedup_core.run.layout import RunLayout
from semdedup_core.storage import read_parquet, write_parquet

out, n_buckets, per_shard, eps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status("VmRSS")

fig, ax = _figure(); ax.plot([0, 1], [0, 1]); _svg(fig)
base = reset_peak()
layout = RunLayout(out)
sampler = PairSampler(eps, seed=0)
for bucket in range(n_buckets):
    scores = read_parquet(layout.scores(bucket))
    rows = pc.cast(pc.utf8_slice_codeunits(scores.column("id"), 3), pa.int64())
    sampler.add(scores, pc.cast(pc.divide(rows, per_shard), pa.int32()))
    del scores, rows
write_parquet(layout.pairs, sampler.table())
result = render_report(layout)
growth = status("VmHWM") - base
base = reset_peak()
whole = read_parquet(layout.scan(0))
full_read = status("VmHWM") - base
print(json.dumps({"growth": growth, "full_read": full_read, "one_scan_file": whole.nbytes, "n_pairs": result.n_pairs}))
"""


def _ids(lo: int, hi: int) -> pa.Array:
    return pc.binary_join_element_wise("id-", pa.array(np.arange(lo, hi)).cast(pa.string()), "")


def _synthetic_run(out: Path) -> int:
    """The artifacts a finished 3M-item text run leaves; returns the scan files' text and id
    bytes (what a full read would hold in memory)."""
    layout = RunLayout(str(out))
    rng = np.random.default_rng(0)
    vocabulary = [" ".join(f"word{w}" for w in rng.integers(0, 5000, 40)) for _ in range(2000)]
    per_shard = N_ITEMS // N_SHARDS
    full_bytes = 0
    sources = []
    for shard in range(N_SHARDS):
        lo = shard * per_shard
        ids = _ids(lo, lo + per_shard)
        text = pa.array(vocabulary).take(pa.array(rng.integers(0, len(vocabulary), per_shard)))
        url = str(out.parent / f"data/part-{shard}.jsonl")
        scan = pa.table(
            {
                "row": pa.array(np.arange(per_shard)), "id": ids, "source": pc.binary_join_element_wise(f"{url} line ", pa.array(np.arange(per_shard)).cast(pa.string()), ""),
                "error": pa.nulls(per_shard, pa.string()), "hash": pa.nulls(per_shard, pa.binary(16)), "offset": pa.nulls(per_shard, pa.int64()),
                "size": pa.nulls(per_shard, pa.int64()), "text": text,
            }
        )
        full_bytes += scan.nbytes
        os.makedirs(out / "scan", exist_ok=True)
        pq.write_table(scan, layout.scan(shard), row_group_size=50_000)
        sources.append({"index": shard, "kind": "jsonl", "url": url, "modality": "text", "id_column": "id", "content_column": "text"})
    write_json(layout.run_json, {"sources": sources})
    # Scores: every item in one of 30 buckets, its most similar earlier item the one before it.
    per_bucket = N_ITEMS // N_BUCKETS
    counts = np.zeros(20000, np.int64)
    os.makedirs(out / "scores", exist_ok=True)
    n_kept = 0
    for bucket in range(N_BUCKETS):
        lo = bucket * per_bucket
        max_sim = np.clip(1 - rng.exponential(0.06, per_bucket), -1, 1).astype(np.float32)
        max_sim[0] = np.nan
        kept = ~(max_sim > np.float32(1 - EPS))
        n_kept += int(kept.sum())
        ids = _ids(lo, lo + per_bucket)
        pq.write_table(
            pa.table(
                {
                    "id": ids, "cluster": pa.array(rng.integers(0, CLUSTERS, per_bucket).astype(np.int32)), "centroid_sim": pa.array(rng.random(per_bucket).astype(np.float32)),
                    "max_sim": pa.array(max_sim, mask=np.isnan(max_sim)), "dup_of": pa.concat_arrays([pa.nulls(1, pa.string()), ids.slice(0, per_bucket - 1)]), "kept": pa.array(kept),
                }
            ),
            layout.scores(bucket),
        )
        finite = max_sim[np.isfinite(max_sim)]
        counts += np.bincount(np.clip(((finite + 1.0) / 1e-4).astype(np.int64), 0, 19999), minlength=20000)
    os.makedirs(out / "result", exist_ok=True)
    write_json(layout.similarity, SimilarityHistogram(lower=-1.0, width=1e-4, counts=counts.tolist(), n_first=N_BUCKETS, n_exact=0).model_dump(mode="json"))
    reasons = pa.array(["text is empty", "text has 900 tokens, more than max_length 512 (truncation is off)", "unreadable line (UnicodeDecodeError: at 17)"])
    pq.write_table(pa.table({"id": _ids(N_ITEMS, N_ITEMS + N_FAILED), "source": pa.nulls(N_FAILED, pa.string()), "error": reasons.take(pa.array(rng.integers(0, 3, N_FAILED)))}), layout.failed)
    sizes = np.bincount(rng.integers(0, CLUSTERS, N_ITEMS), minlength=CLUSTERS)
    os.makedirs(out / "partitions", exist_ok=True)
    write_npy(layout.cluster_sizes, sizes)
    os.makedirs(out / "clustering", exist_ok=True)
    objective = list(np.linspace(1e6, 1.3e6, 20))
    write_json(layout.clustering_stats, FitResult(clusters=CLUSTERS, buckets=N_BUCKETS, sample_size=500_000, iterations=20, objective=objective, imbalance_factor=[1.2] * 20, gpu=False).model_dump(mode="json"))
    n_input = N_ITEMS + N_FAILED
    per_source = [SourceCounts(source=s["url"], input=per_shard, kept=n_kept // N_SHARDS, removed=per_shard - n_kept // N_SHARDS, failed=0) for s in sources]
    per_source.append(SourceCounts(source="lossy.jsonl", input=10_000, kept=1_000, removed=9_000, failed=0))  # lost far more than the rest
    summary = RunSummary(
        output=str(out), n_input=n_input, n_embedded=N_ITEMS, n_judged=N_ITEMS, n_kept=n_kept, n_removed=N_ITEMS - n_kept, n_exact=0, n_failed=N_FAILED,
        eps=EPS, kept_fraction=n_kept / N_ITEMS, clusters=CLUSTERS, buckets=N_BUCKETS, per_source=per_source, keep="hard", device="cpu",
        input_format="jsonl", stage_seconds={}, versions={}, n_long_texts=1234, long_text="chunk",
    )
    write_json(layout.summary, summary.model_dump(mode="json"))
    return full_bytes


def test_report_of_millions_of_items_in_bounded_memory(tmp_path):
    out = tmp_path / "run"
    full_bytes = _synthetic_run(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")] if p)}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(out), str(N_BUCKETS), str(N_ITEMS // N_SHARDS), str(EPS)], capture_output=True, text=True, timeout=1200, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    page = (out / "report/index.html").read_text()
    assert measured["n_pairs"] > 0 and "3,000,000" in page and "300,000 items failed" in page
    assert page.count('class="flag">unusual') == 1 and page.index("lossy.jsonl") < page.index("part-0.jsonl")
    # A full read of the scan files alone would hold full_bytes; the report holds a bucket,
    # a batch of a scan file and its samples.
    assert measured["full_read"] > measured["one_scan_file"] / 2, measured
    assert measured["growth"] < full_bytes / 5, (measured, full_bytes)
    print(f"peak RSS growth {measured['growth'] / 2**20:.0f} MiB; reading one of the {N_SHARDS} scan files whole: {measured['full_read'] / 2**20:.0f} MiB; "
          f"all scan files in memory {full_bytes / 2**20:.0f} MiB")


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=60),
    eps=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**16),
)
def test_the_pair_sampler_holds_a_bounded_sample_bucket_after_bucket(sizes, eps, seed):
    """Fed bucket after bucket, the sampler's held tables stay one chunk and a bounded number
    of rows (a run has thousands of buckets), and it keeps exactly what it promises: per band
    the removed items with the smallest keys, the removed items nearest above the threshold and
    the kept ones nearest below."""
    from semdedup_core.results.report import BORDERLINE_PAIRS, PAIR_BANDS, PAIRS_PER_BAND, PairSampler

    rng = np.random.default_rng(seed)
    sampler = PairSampler(eps, seed)
    threshold = np.float32(1 - eps)
    fed = []
    for bucket, n in enumerate(sizes):
        max_sim = rng.uniform(-0.2, 1.0, n).astype(np.float32)
        max_sim[rng.random(n) < 0.1] = np.nan  # first in its cluster: no earlier item
        ids = [f"b{bucket}-{i}" for i in range(n)]
        scores = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "dup_of": pa.array([ids[i - 1] if i else None for i in range(n)], pa.string()),
                "max_sim": pa.array(max_sim, pa.float32(), from_pandas=True),
                "cluster": pa.array(np.full(n, bucket), pa.int32()),
                "kept": pa.array(~(max_sim > threshold)),
            }
        )
        sampler.add(scores, pa.chunked_array([pa.array(np.full(n, bucket % 3), pa.int32())]))
        fed.extend(r for r in scores.to_pylist() if r["max_sim"] is not None and not np.isnan(r["max_sim"]))
        for held in (sampler.sample, sampler.above, sampler.below):
            assert held is None or all(column.num_chunks <= 1 for column in held.columns)
    table = sampler.table().to_pylist()
    assert len(table) <= PAIR_BANDS * PAIRS_PER_BAND + 2 * BORDERLINE_PAIRS
    removed = sorted(r["max_sim"] for r in fed if not r["kept"])
    kept = sorted((r["max_sim"] for r in fed if r["kept"]), reverse=True)
    above = sorted(r["max_sim"] for r in table if r["kind"] == "above")
    below = sorted((r["max_sim"] for r in table if r["kind"] == "below"), reverse=True)
    assert above == removed[:BORDERLINE_PAIRS] and below == kept[:BORDERLINE_PAIRS]
    assert all(r["max_sim"] > threshold and not r["kept"] for r in table if r["kind"] == "sample")
    bands = np.clip(np.floor((np.array(removed, np.float64) - (1.0 - eps)) / eps * PAIR_BANDS).astype(int), 0, PAIR_BANDS - 1)
    expected = sum(min(PAIRS_PER_BAND, int((bands == b).sum())) for b in range(PAIR_BANDS))
    assert len([r for r in table if r["kind"] == "sample"]) == expected  # every band filled as far as it can be
