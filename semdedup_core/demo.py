"""A small generated dataset with planted near-duplicates, for the README demo and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class DemoDataset:
    shards: list[Path]
    truth: Path  # parquet: id, duplicate_of (the base item each planted copy was made from)
    n_items: int
    n_planted: int
    n_broken: int


def make_demo_embeddings(
    folder: str | Path,
    n_base: int = 16000,
    n_planted: int = 4000,
    dim: int = 64,
    topics: int = 40,
    shards: int = 4,
    noise: float = 0.01,
    seed: int = 0,
) -> DemoDataset:
    """Base items spread around topics (pairwise cosine ~0.8), plus near-copies of random base
    items (cosine ~0.997 to their source), shuffled into parquet shards with an ``id`` and an
    ``embedding`` column. Two rows are deliberately broken (NaN, zero vector) and must end in
    ``failed``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    centers = rng.standard_normal((topics, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    base = centers[rng.integers(0, topics, n_base)] + 0.5 * rng.standard_normal((n_base, dim)) / np.sqrt(dim)
    sources = rng.integers(0, n_base, n_planted)
    copies = base[sources] + noise * rng.standard_normal((n_planted, dim))
    vectors = np.concatenate([base, copies]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.array([f"item-{i:07d}" for i in range(len(vectors))])
    broken = [len(vectors) - 2, len(vectors) - 1]  # two planted copies become unusable
    vectors[broken[0], 0] = np.nan
    vectors[broken[1]] = 0.0
    order = rng.permutation(len(vectors))
    paths = []
    for s, part in enumerate(np.array_split(order, shards)):
        path = folder / f"embeddings-{s:03d}.parquet"
        table = pa.table(
            {"id": ids[part], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[part].reshape(-1)), dim)}
        )
        pq.write_table(table, path)
        paths.append(path)
    truth = folder / "planted.parquet"
    pq.write_table(pa.table({"id": ids[n_base:], "duplicate_of": ids[sources]}), truth)
    return DemoDataset(paths, truth, len(vectors), n_planted, len(broken))


# ---------------------------------------------------------------- the README demo: a small text corpus

DEMO_CORPUS = Path(__file__).parent / "demo_data"
# Cosine above 1 - DEMO_EPS counts as a duplicate under all-MiniLM-L6-v2 (measured on this corpus).
DEMO_EPS = 0.09


def copy_demo_corpus(folder: str | Path) -> list[Path]:
    """The bundled jsonl shards (id, text, kind, source), copied where the user can look at them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for shard in sorted(DEMO_CORPUS.glob("corpus-*.jsonl")):
        target = folder / shard.name
        data = shard.read_bytes()
        if not (target.is_file() and target.read_bytes() == data):  # rewriting would count as a changed input
            target.write_bytes(data)
        copies.append(target)
    return copies


@dataclass(frozen=True)
class DemoOutcome:
    """How the run did on the corpus's planted duplicates (its ``kind`` / ``source`` fields)."""

    caught: dict[str, tuple[int, int]]  # kind -> (pairs with one side removed, pairs)
    originals_removed: tuple[int, int]  # originals removed as a duplicate of another original, originals
    examples: list[dict]  # removed text, the text it duplicates, cosine, kind


def demo_outcome(shards: list[Path], removed: pa.Table, n_examples: int = 4) -> DemoOutcome:
    import json

    docs = {}
    for shard in shards:
        for line in shard.read_text().splitlines():
            if line.strip():
                doc = json.loads(line)
                docs[doc["id"]] = doc
    gone = dict(zip(removed.column("id").to_pylist(), removed.to_pylist()))
    caught: dict[str, list[int]] = {}
    for doc in docs.values():
        if doc["source"] is not None:
            hit = caught.setdefault(doc["kind"], [0, 0])
            hit[0] += doc["id"] in gone or doc["source"] in gone
            hit[1] += 1
    originals = [d for d in docs.values() if d["kind"] == "original"]
    # an original counts as wrongly removed only when it duplicates another original
    wrong = sum(1 for d in originals if d["id"] in gone and docs[gone[d["id"]]["dup_of"]]["kind"] == "original")
    examples, per_kind = [], {}
    # the least similar removed pairs of each planted kind: the interesting, borderline ones
    for row in sorted(gone.values(), key=lambda r: (r["max_sim"] is None, r["max_sim"] or 0)):
        kind = docs[row["id"]]["kind"]
        if row["reason"] == "semantic" and kind != "original" and per_kind.get(kind, 0) < 2:
            per_kind[kind] = per_kind.get(kind, 0) + 1
            examples.append({"removed": docs[row["id"]]["text"], "dup_of": docs[row["dup_of"]]["text"], "cosine": row["max_sim"], "kind": kind})
        if len(examples) == n_examples:
            break
    return DemoOutcome({k: (v[0], v[1]) for k, v in sorted(caught.items())}, (wrong, len(originals)), examples)
