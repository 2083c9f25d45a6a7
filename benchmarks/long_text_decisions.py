"""Which long-text mode decides better on real text: truncate vs chunk at the default eps.

Corpus: text this project did not write, installed with its dependencies: every LICENSE /
COPYING / NOTICE / AUTHORS file under site-packages and the long descriptions (READMEs) in
``*.dist-info/METADATA``, 300 characters to 400 kB each. It holds true near-copies (the same
licence in many packages with another copyright line) and genuinely different long
documents sharing a preamble (licence bundles starting with Apache-2.0, GPL-2 vs GPL-3).

Both modes run the real pipeline (``run_pipeline``, bundled all-MiniLM-L6-v2, default eps
and k) on the same jsonl. Each semantically removed item is judged against the item it
was removed as a copy of by comparing the WHOLE texts: Jaccard similarity of their
5-word shingle sets (normalised text). Same body: J >= 0.8; different bodies: J < 0.5
(between: printed for reading). True copies: pairs of non-identical documents with
J >= 0.8; caught when one of the two was removed.

    .venv/bin/python benchmarks/long_text_decisions.py --out /tmp/long_text.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import glob
import hashlib
import json
import re
import sys
import tempfile
from email.parser import BytesHeaderParser
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from semdedup_core.config import RunConfig
from semdedup_core.embedding.stage import normalise_text
from semdedup_core.run.dag import run_pipeline

NAMES = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)([.\-_].*)?$", re.IGNORECASE)


def corpus(site_packages: str, min_chars: int, max_chars: int) -> list[dict]:
    docs = []
    for path in sorted(Path(site_packages).rglob("*")):
        if not path.is_file() or path.suffix in (".py", ".pyc", ".so", ".json") or not NAMES.match(path.name):
            continue
        docs.append((str(path.relative_to(site_packages)), path.read_bytes()))
    for meta in sorted(glob.glob(f"{site_packages}/*.dist-info/METADATA")):
        raw = Path(meta).read_bytes()
        head = BytesHeaderParser().parsebytes(raw)
        body = raw.split(b"\n\n", 1)[1] if b"\n\n" in raw else b""
        if head.get("Description") and not body.strip():
            body = head["Description"].encode()
        docs.append((str(Path(meta).relative_to(site_packages)) + ":description", body))
    out = []
    for name, data in docs:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if min_chars <= len(text.strip()) <= max_chars:
            out.append({"id": name, "text": text})
    return out


def shingles(docs: list[dict], width: int = 5) -> sp.csr_matrix:
    """Binary doc x hashed-shingle matrix of the normalised texts."""
    rows, cols = [], []
    for i, d in enumerate(docs):
        words = normalise_text(d["text"]).split()
        grams = {hash(" ".join(words[j : j + width])) % (1 << 31) for j in range(max(1, len(words) - width + 1))}
        rows += [i] * len(grams)
        cols += list(grams)
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(docs), 1 << 31))
    m.sum_duplicates()
    m.data[:] = 1
    return m


def jaccard_all(m: sp.csr_matrix) -> np.ndarray:
    inter = (m @ m.T).toarray()
    size = np.asarray(m.sum(1)).ravel()
    return inter / np.maximum(size[:, None] + size[None, :] - inter, 1)


def run(mode: str, data: Path, work: Path, reuse: bool) -> dict:
    out = work / f"run-{mode}"
    cfg = RunConfig(input=[str(data)], output=str(out), long_text=mode, on_existing="reuse-embeddings" if reuse else "fresh", device="cpu")
    summary = run_pipeline(cfg)
    removed = pq.read_table(out / "result" / "removed.parquet").to_pylist()
    return {"summary": summary, "removed": removed}


def all_pairs(work: Path, docs: list[dict], index: dict[str, int], jac: np.ndarray, digest: list[bytes], eps: float = 0.05) -> dict:
    """Clustering aside: every pair of embedded documents above 1 - eps, judged the same way,
    and the share of true near-copy pairs above it, for each mode."""
    out = {}
    for mode in ("truncate", "chunk"):
        table = pq.read_table(work / f"run-{mode}" / "embeddings" / "shard-00000.parquet")
        ids = table.column("id").to_pylist()
        x = np.asarray(table.column("embedding").combine_chunks().values, np.float32).reshape(len(ids), -1).astype(np.float64)
        sims = x @ x.T
        at = np.array([index[i] for i in ids])
        iu = np.triu_indices(len(ids), 1)
        j = jac[at[iu[0]], at[iu[1]]]
        above = sims[iu] > np.float32(1 - eps)
        true = j >= 0.8
        row = {
            "pairs_above": int(above.sum()),
            "above_same_body": int((above & true).sum()),
            "above_partly": int((above & (j >= 0.5) & ~true).sum()),
            "above_different_bodies": int((above & (j < 0.5)).sum()),
            "above_at_1.000_different_bodies": int(((sims[iu] > 0.9995) & (j < 0.5)).sum()),
            "true_pairs": int(true.sum()),
            "true_pairs_above": int((above & true).sum()),
        }
        out[mode] = row
        print(f"all pairs, {mode}: {json.dumps(row)}")
        for a, b in sorted(zip(iu[0][above & (j < 0.5)], iu[1][above & (j < 0.5)]), key=lambda p: -sims[p])[:15]:
            print(f"    sim {sims[a, b]:.4f} J {jac[at[a], at[b]]:.2f}: {ids[a]}  ~  {ids[b]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site-packages", default=sorted(glob.glob(f"{sys.prefix}/lib/python3*/site-packages"))[0])
    p.add_argument("--min-chars", type=int, default=300)
    p.add_argument("--max-chars", type=int, default=400_000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--show", type=int, default=40, help="pairs printed per class for reading")
    p.add_argument("--reuse", action="store_true", help="keep the embeddings of earlier runs in --workdir (redo the rest)")
    p.add_argument("--out", default="/tmp/long_text_decisions.json")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="long-text-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = corpus(args.site_packages, args.min_chars, args.max_chars)
    data = work / "corpus.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    index = {d["id"]: i for i, d in enumerate(docs)}
    digest = [hashlib.blake2b(normalise_text(d["text"]).encode(), digest_size=16).digest() for d in docs]
    jac = jaccard_all(shingles(docs))
    iu = np.triu_indices(len(docs), 1)
    identical = np.array([digest[a] == digest[b] for a, b in zip(*iu)])
    true_pairs = [(int(a), int(b)) for a, b, same in zip(*iu, identical) if not same and jac[a, b] >= 0.8]
    print(f"{len(docs)} documents, {len(true_pairs)} true near-copy pairs (J >= 0.8, not identical), work {work}")

    report = {"n_docs": len(docs), "n_true_pairs": len(true_pairs), "modes": {}}
    for mode in ("truncate", "chunk"):
        res = run(mode, data, work, args.reuse)
        s = res["summary"]
        semantic = [r for r in res["removed"] if r["reason"] == "semantic"]
        judged = [(r["id"], r["dup_of"], float(r["max_sim"]), float(jac[index[r["id"]], index[r["dup_of"]]])) for r in semantic]
        different = [j for j in judged if j[3] < 0.5]
        same = [j for j in judged if j[3] >= 0.8]
        middle = [j for j in judged if 0.5 <= j[3] < 0.8]
        removed_ids = {r["id"] for r in res["removed"]}
        caught = sum(1 for a, b in true_pairs if docs[a]["id"] in removed_ids or docs[b]["id"] in removed_ids)
        report["modes"][mode] = {
            "n_long_texts": s.get("n_long_texts"),
            "n_removed_semantic": len(semantic),
            "n_exact": s["n_exact"],
            "removed_same_body": len(same),
            "removed_partly_same": len(middle),
            "removed_different_bodies": len(different),
            "true_pairs_caught": caught,
            "embed_seconds": s["stage_seconds"].get("embed"),
            "different": different,
            "partly": middle,
        }
        print(f"\n== {mode}: n_long_texts {s.get('n_long_texts')}, semantic removals {len(semantic)} "
              f"(same body {len(same)}, partly {len(middle)}, different bodies {len(different)}), exact {s['n_exact']}, "
              f"true near-copy pairs caught {caught} of {len(true_pairs)}, embed {s['stage_seconds'].get('embed', 0):.0f} s")
        for label, rows in (("different bodies", different), ("partly the same", middle)):
            for rid, dup, sim, j in sorted(rows, key=lambda r: r[3])[: args.show]:
                print(f"  [{label}] sim {sim:.4f} J {j:.2f} tokens~{len(docs[index[rid]]['text']) // 4}/{len(docs[index[dup]]['text']) // 4}: {rid}  <-  {dup}")
    report["all_pairs"] = all_pairs(work, docs, index, jac, digest)
    trunc_only = {(r[0], r[1]) for r in report["modes"]["truncate"]["different"]} - {(r[0], r[1]) for r in report["modes"]["chunk"]["different"]}
    print(f"\nremoved with different bodies under truncate but not chunk: {len(trunc_only)}")
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
