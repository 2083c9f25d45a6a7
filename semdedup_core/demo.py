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
