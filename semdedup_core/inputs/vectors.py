"""Embedding hygiene: reject what cannot be compared, L2-normalise the rest in float32."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# float32 vectors normalised in float32 have |norm^2 - 1| of a few 1e-7; leaving them
# bit-for-bit as given keeps results equal to the reference code on unit-norm input.
UNIT_NORM_TOLERANCE = 1e-5
# Squared norms are summed in float64 this many rows at a time: float64 copies of a whole
# read batch (2 x 64 MiB at 16,384 x 512) lie above malloc's mmap threshold, so every batch
# paid fresh page faults for them (2-4x slower than blocks of 8 MiB, which malloc reuses).
_NORM_BLOCK_ROWS = 2048


@dataclass(frozen=True)
class PreparedVectors:
    vectors: np.ndarray  # float32 (n_valid, d), unit norm
    valid: np.ndarray  # bool (n,), which input rows are in ``vectors``
    errors: dict[int, str]  # input row -> reason, for every invalid row


def prepare_vectors(raw: np.ndarray) -> PreparedVectors:
    """Rows with NaN/Inf or zero norm are reported, never silently normalised."""
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {x.shape}")
    finite = np.isfinite(x).all(axis=1)
    sq_norm = _squared_norms(x)
    nonzero = sq_norm > 0
    valid = finite & nonzero
    errors = {int(r): "embedding has NaN or Inf values" for r in np.flatnonzero(~finite)}
    errors.update({int(r): "embedding has zero norm" for r in np.flatnonzero(finite & ~nonzero)})
    vectors = x[valid] if not valid.all() else x
    sq = sq_norm[valid]
    off_unit = np.abs(sq - 1.0) > UNIT_NORM_TOLERANCE
    if off_unit.any():
        vectors = vectors.copy() if vectors is x else vectors
        vectors[off_unit] /= np.sqrt(sq[off_unit]).astype(np.float32)[:, None]
    return PreparedVectors(np.ascontiguousarray(vectors, dtype=np.float32), valid, errors)


def _squared_norms(x: np.ndarray) -> np.ndarray:
    """Each row's squared norm, its float32 values multiplied and summed in float64."""
    out = np.empty(len(x), np.float64)
    for start in range(0, len(x), _NORM_BLOCK_ROWS):
        block = x[start : start + _NORM_BLOCK_ROWS].astype(np.float64)
        out[start : start + len(block)] = np.einsum("ij,ij->i", block, block)
    return out
