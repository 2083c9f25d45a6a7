"""Answers to "why": every removed row names the kept item its group resolves to (kept_id)
and where it lives (source); summary.json counts input / kept / removed / failed per file.

Runs go through the real pipeline (run_pipeline) on precomputed embeddings and on raw
jsonl, parquet and webdataset text with a tiny saved BERT; expectations are recomputed
here from the inputs and the run's own scores, never from the code under test.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.results.summary import _kept_ids

from .conftest import RunResults, raw_config, run_raw, unit_rows, write_embeddings, write_tar


def _rotated(angle: float, dim: int) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[0], v[1] = np.cos(angle), np.sin(angle)
    return v


def _resolve(removed: dict[str, dict], kept: set[str], item: str) -> str:
    """Brute force: follow dup_of until a kept item."""
    seen = set()
    while item not in kept:
        assert item not in seen, "a dup_of cycle"
        seen.add(item)
        item = removed[item]["dup_of"]
    return item


def _check_explanations(res: RunResults, source_of: dict[str, str], file_of: dict[str, str]) -> None:
    """kept_id is the brute-force resolution and is kept; every removed row has its source;
    per-source counts match a count over the result files and add up to the totals."""
    kept = {r["id"] for r in res.kept}
    removed = {r["id"]: r for r in res.removed}
    for rid, row in removed.items():
        assert row["kept_id"] == _resolve(removed, kept, rid)
        assert row["kept_id"] in kept
        assert row["source"] == source_of[rid]
    expected = {f: Counter() for f in dict.fromkeys(file_of.values())}
    for ids, what in ((kept, "kept"), (removed, "removed"), ({r["id"] for r in res.failed}, "failed")):
        for i in ids:
            expected[file_of[i]][what] += 1
    for i in file_of:
        expected[file_of[i]]["input"] += 1
    per_source = res.summary["per_source"]
    assert [p["source"] for p in per_source] == list(expected)
    for p in per_source:
        assert {k: p[k] for k in ("input", "kept", "removed", "failed")} == {k: expected[p["source"]][k] for k in ("input", "kept", "removed", "failed")}
    for k in ("kept", "removed", "failed"):
        assert sum(p[k] for p in per_source) == res.summary[f"n_{k}"]
    assert sum(p["input"] for p in per_source) == res.summary["n_input"]


def test_chain_resolves_to_the_kept_item_precomputed(tmp_path):
    """A kept <- B (dup_of A) <- C (dup_of B, not similar enough to A): kept_id A for both."""
    dim, step = 16, np.arccos(0.99)  # neighbours at cosine 0.99, A and C at cos(2 step) = 0.9602
    rng = np.random.default_rng(5)
    chain = np.stack([_rotated(0, dim), _rotated(step, dim), _rotated(2 * step, dim)])
    others = unit_rows(rng, 9, dim)
    others[:, :2] = 0  # orthogonal to the chain
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    # Shard 0: B, x0..x3; shard 1: x4, C, A, x5..x8 (ranks fix the keep order A, B, C first).
    shard0 = (["B", "x0", "x1", "x2", "x3"], np.vstack([chain[1:2], others[:4]]), [9.0, 1, 1, 1, 1])
    shard1 = (["x4", "C", "A", "x5", "x6", "x7", "x8"], np.vstack([others[4:5], chain[2:3], chain[0:1], others[5:]]), [1.0, 8, 10, 1, 1, 1, 1])
    paths = []
    source_of, file_of = {}, {}
    for s, (ids, vectors, rank) in enumerate((shard0, shard1)):
        path = write_embeddings(tmp_path / "emb" / f"part-{s}.parquet", ids, vectors, rank=rank)
        paths.append(path)
        for row, i in enumerate(ids):
            source_of[i], file_of[i] = f"{path} row {row}", str(path)
    cfg = raw_config(paths, tmp_path / "out", clusters=1, eps=0.02, keep="metadata", metadata_columns=["rank"])
    res = run_raw(cfg)
    removed = {r["id"]: r for r in res.removed}
    assert set(removed) == {"B", "C"}
    assert (removed["B"]["dup_of"], removed["C"]["dup_of"]) == ("A", "B")
    assert removed["B"]["kept_id"] == removed["C"]["kept_id"] == "A"
    assert removed["B"]["source"] == f"{paths[0]} row 0" and removed["C"]["source"] == f"{paths[1]} row 1"
    _check_explanations(res, source_of, file_of)
    assert res.summary["n_long_texts"] is None  # precomputed: nothing was tokenized


def test_exact_copy_of_a_semantically_removed_item_resolves_to_the_kept_one(tiny_bert, tmp_path):
    base = [f"w{i}" for i in range(1, 13)]
    docs = [
        {"id": "A", "text": " ".join(base), "rank": 10},
        {"id": "B", "text": " ".join(base[:-1] + ["w40"]), "rank": 9},  # one word changed: a near copy of A
        {"id": "B-copy", "text": "  " + " ".join(base[:-1] + ["W40"]).upper() + " ", "rank": 1},  # B up to case/space
        *({"id": f"o{i}", "text": f"a b c w{20 + i} w{30 + i} w{45 + i}", "rank": 2} for i in range(8)),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = raw_config([path], tmp_path / "out", model=str(tiny_bert), clusters=1, eps=0.1, keep="metadata", metadata_columns=["rank"])
    res = run_raw(cfg)
    removed = {r["id"]: r for r in res.removed}
    assert removed["B"]["reason"] == "semantic" and removed["B"]["dup_of"] == "A"
    assert removed["B-copy"]["reason"] == "exact" and removed["B-copy"]["dup_of"] == "B"
    assert removed["B-copy"]["kept_id"] == removed["B"]["kept_id"] == "A"
    assert removed["B-copy"]["source"] == f"{path} line 3"
    source_of = {d["id"]: f"{path} line {n}" for n, d in enumerate(docs, start=1)}
    _check_explanations(res, source_of, {d["id"]: str(path) for d in docs})


def _corpus(n: int, seed: int) -> list[dict]:
    """Texts with near copies (one word changed), exact copies (case/space) and an empty one."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = [f"w{w}" for w in rng.integers(0, 60, 10)]
        docs.append({"id": f"d{i}", "text": " ".join(words)})
        if i % 4 == 0:
            words[-1] = f"w{(int(words[-1][1:]) + 1) % 60}"
            docs.append({"id": f"d{i}-near", "text": " ".join(words)})
        if i % 5 == 0:
            docs.append({"id": f"d{i}-exact", "text": " " + docs[-1]["text"].upper()})
    docs.append({"id": "empty", "text": "  "})
    return docs


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "webdataset"])
def test_source_and_per_source_counts_raw(fmt, tiny_bert, tmp_path):
    docs = _corpus(24, seed=1)
    halves = [docs[: len(docs) // 2], docs[len(docs) // 2 :]]
    paths, source_of, file_of = [], {}, {}
    for s, part in enumerate(halves):
        if fmt == "jsonl":
            path = tmp_path / "in" / f"part-{s}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps(d) + "\n" for d in part))
            source_of.update({d["id"]: f"{path} line {n}" for n, d in enumerate(part, start=1)})
        elif fmt == "parquet":
            path = tmp_path / "in" / f"part-{s}.parquet"
            path.parent.mkdir(exist_ok=True)
            pq.write_table(pa.table({"id": [d["id"] for d in part], "text": [d["text"] for d in part]}), path)
            source_of.update({d["id"]: f"{path} row {n}" for n, d in enumerate(part)})
        else:
            path = write_tar(tmp_path / "in" / f"part-{s}.tar", [{"__key__": d["id"], "txt": d["text"]} for d in part])
            source_of.update({d["id"]: f"{path} member {d['id']}.txt" for d in part})
        paths.append(path)
        file_of.update({d["id"]: str(path) for d in part})
    extra = {"modality": "text", "text_column": "txt"} if fmt == "webdataset" else {}
    res = run_raw(raw_config(paths, tmp_path / "out", model=str(tiny_bert), clusters=3, eps=0.1, **extra))
    everything = [r["id"] for r in res.kept + res.removed + res.failed]
    assert sorted(everything) == sorted(d["id"] for d in docs)
    reasons = Counter(r["reason"] for r in res.removed)
    assert reasons["exact"] >= 1 and reasons["semantic"] >= 1  # both kinds are explained
    _check_explanations(res, source_of, file_of)
    assert res.summary["n_long_texts"] == 0 and res.summary["long_text"] == "chunk"


@st.composite
def _scored_cluster(draw):
    """A cluster in keep order: the first kept, every removed item's dup_of an earlier item."""
    n = draw(st.integers(1, 40))
    kept = [True] + [draw(st.booleans()) for _ in range(n - 1)]
    dup_of = [None] + [draw(st.integers(0, j - 1)) if not kept[j] else None for j in range(1, n)]
    return kept, dup_of


@settings(max_examples=60, deadline=None)
@given(clusters=st.lists(_scored_cluster(), min_size=1, max_size=4), ids=st.sampled_from(["plain", "unicode"]))
def test_kept_ids_equal_brute_force(clusters, ids):
    names, kept, dup_of = [], [], []
    for c, (k, d) in enumerate(clusters):
        local = [f"c{c}-{j}" if ids == "plain" else f"\u00e9\u4e2d{c}\U0001f600{j}" for j in range(len(k))]
        names += local
        kept += k
        dup_of += [None if x is None else local[x] for x in d]
    # Rows shuffled the same way a bucket's file may hold them: order must not matter.
    perm = np.random.default_rng(len(names)).permutation(len(names))
    schema = pa.schema([("id", pa.string()), ("dup_of", pa.string()), ("kept", pa.bool_())])
    table = pa.table({"id": [names[i] for i in perm], "dup_of": [dup_of[i] for i in perm], "kept": [kept[i] for i in perm]}, schema=schema)
    got = _kept_ids(table).to_pylist()
    removed = {n: {"dup_of": d} for n, d, k in zip(names, dup_of, kept) if not k}
    kept_set = {n for n, k in zip(names, kept) if k}
    assert got == [_resolve(removed, kept_set, names[i]) for i in perm]
