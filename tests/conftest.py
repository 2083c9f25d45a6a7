"""Shared test setup: offline, quiet, real Prefect (test harness), small generated data."""

from __future__ import annotations

import os

# Before prefect/transformers are imported anywhere in the session.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect backend for flow tests (started once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(path: Path, ids, vectors: np.ndarray, **extra) -> Path:
    """A parquet shard of precomputed embeddings: id + embedding (list<float32>) [+ extra columns]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"id": pa.array(list(ids), pa.string()), "embedding": pa.array(list(np.asarray(vectors, np.float32)), pa.list_(pa.float32()))}
    columns.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(columns), path)
    return path
