"""The SemDeDup kernel: for each item of an ordered cluster, its most similar earlier item.

For rows ``j`` of an ordered cluster ``Y`` (unit-norm float32), computes

    max_sim[j] = max_{i<j} Y_i . Y_j      dup_of[j] = earliest argmax

tile by tile, so memory is bounded by ``tile_size**2`` and never by the square of
the cluster.

Exactness. BLAS results depend on matrix shapes (MKL's sgemm rounds a 1-row product
differently from a 128-row one), so a plain tiled fp32 max would change in the last
bit with the tile size, the device or the thread count, and could flip ties. Instead
the fp32 GEMM only *screens*: its error against the exact dot product is bounded by
``DELTA = gamma_d + u`` for unit vectors, so every index that can still be the true
argmax lies within ``2*DELTA`` of the tile's maximum (or within ``DELTA`` of the best
value found so far). Those few candidates are rescored canonically: products of
float32 are exact in float64, summed in float64 and rounded once to float32. The
canonical value is what ``max_sim`` holds, so results are identical for every tile
size, on CPU and CUDA, and equal to a float64 brute force rounded to float32.

Bitwise-identical vectors give identical canonical values, so only the first copy of
each can be an argmax; later copies are masked out of the candidates, which keeps
clusters full of exact duplicates from turning into a quadratic rescoring.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

# Rescore candidate pairs in chunks so a dense band (many near-identical vectors)
# cannot allocate pairs x d float64 at once.
_RESCORE_CHUNK = 8192
_UNIT_ROUNDOFF = 2.0**-24
_HASH_BLOCK = 4096


@dataclass(frozen=True)
class ClusterScores:
    """Per-row result for one ordered cluster. ``dup_of`` is -1 and ``max_sim`` NaN for row 0."""

    max_sim: np.ndarray  # float32 (n,)
    dup_of: np.ndarray  # int64 (n,), index into the ordered cluster


def screening_band(dim: int) -> float:
    """Bound on |fp32 GEMM dot - canonical dot| for vectors of norm <= 1 (+1e-5).

    Worst-case recursive-summation bound gamma_d = d*u / (1 - d*u), valid for any
    summation order, plus u for the canonical rounding, with 1 % headroom for norms a
    few ulps above one.
    """
    du = dim * _UNIT_ROUNDOFF
    return 1.01 * (du / (1.0 - du) + _UNIT_ROUNDOFF)


def first_copy_mask(y: np.ndarray) -> np.ndarray:
    """True where a row is the first (in order) of its group of bitwise-identical rows.

    Rows are hashed in blocks (a seeded multiply-add over their 32-bit words), so memory
    stays O(n) beyond the input; rows with equal hashes are compared byte for byte.
    """
    n = y.shape[0]
    mask = np.ones(n, dtype=bool)
    if n < 2:
        return mask
    words = np.ascontiguousarray(y).view(np.uint32)
    multipliers = np.random.default_rng(0x5E3D).integers(1, 2**32, size=words.shape[1], dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    hashes = np.empty(n, dtype=np.uint64)
    for start in range(0, n, _HASH_BLOCK):
        # Products wrap mod 2**32 (odd multipliers: a changed word always changes its product),
        # summed in 64 bits: no 64-bit copy of the block.
        hashes[start : start + _HASH_BLOCK] = (words[start : start + _HASH_BLOCK] * multipliers).sum(axis=1, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in row order
    sorted_hashes = hashes[order]
    run_starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
    run_stops = np.r_[run_starts[1:], n]
    for lo, hi in zip(run_starts[run_stops - run_starts > 1], run_stops[run_stops - run_starts > 1]):
        firsts: list[int] = []
        for row in order[lo:hi]:
            if any(np.array_equal(words[row], words[f]) for f in firsts):
                mask[row] = False
            else:
                firsts.append(int(row))
    return mask


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is a configuration error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


@contextlib.contextmanager
def ieee_fp32_matmul():
    # TF32 on CUDA or bf16 on oneDNN would break the screening bound.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _rescore(y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Canonical similarity of pairs (rows[k], cols[k]): exact products, float64 sum, one rounding."""
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=y.device)
    for start in range(0, rows.shape[0], _RESCORE_CHUNK):
        stop = start + _RESCORE_CHUNK
        a = y.index_select(0, rows[start:stop]).double()
        b = y.index_select(0, cols[start:stop]).double()
        out[start:stop] = (a * b).sum(dim=1).float()
    return out


def _best_per_row(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int):
    """For candidate triples, the max value per row and its earliest column."""
    # Sort by column first, then stably by value descending, then stably by row: the first
    # entry of each row is its max with the smallest column among equal values.
    order = torch.argsort(cols, stable=True)
    order = order[torch.argsort(vals[order], descending=True, stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, vals = rows[order], cols[order], vals[order]
    is_first = torch.ones_like(rows, dtype=torch.bool)
    is_first[1:] = rows[1:] != rows[:-1]
    best_val = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=vals.device)
    best_col = torch.full((n_rows,), -1, dtype=torch.int64, device=vals.device)
    best_val[rows[is_first]] = vals[is_first]
    best_col[rows[is_first]] = cols[is_first]
    return best_val, best_col


# Per device, the largest diagonal-tile mask built so far (read-only; at most tile_size^2
# bools): clusters are scored one call each, and building the mask per call cost more than
# a small cluster's products.
_UPPER_MASKS: dict[torch.device, torch.Tensor] = {}


def _upper_mask(size: int, dev: torch.device) -> torch.Tensor:
    """mask[r, c] is True where key c is not before query r inside a diagonal tile (c >= r);
    use its [:rows, :rows] corner."""
    mask = _UPPER_MASKS.get(dev)
    if mask is None or mask.shape[0] < size:
        mask = torch.ones((size, size), dtype=torch.bool, device=dev).triu_()
        _UPPER_MASKS[dev] = mask
    return mask


def cluster_max_sim(
    y: np.ndarray | torch.Tensor,
    tile_size: int = 2048,
    device: str | torch.device = "cpu",
    first_query: int = 0,
) -> ClusterScores:
    """max_sim / dup_of of every row of an ordered cluster against all earlier rows.

    ``y`` must already be in keep order (see :mod:`semdedup_core.dedup.ordering`) and unit norm.
    Rows before ``first_query`` are only keys (already judged: an earlier generation of a
    collection): their own max_sim stays NaN and costs nothing. Each row's result does not
    depend on ``first_query``, as it does not on the tiling.
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
    if y_np.dtype != np.float32 or y_np.ndim != 2:
        raise ValueError(f"expected a 2-D float32 array, got {y_np.dtype} with shape {y_np.shape}")
    n, dim = y_np.shape
    max_sim = np.full(n, np.nan, dtype=np.float32)
    dup_of = np.full(n, -1, dtype=np.int64)
    if not 0 <= first_query <= n:
        raise ValueError(f"first_query must be in [0, {n}], got {first_query}")
    if n <= 1 or first_query == n:
        return ClusterScores(max_sim, dup_of)

    dev = torch.device(device) if isinstance(device, str) else device
    y_np = np.ascontiguousarray(y_np)
    yt = torch.from_numpy(y_np).to(dev)
    is_copy = ~first_copy_mask(y_np)
    copy_cols = torch.from_numpy(is_copy).to(dev)
    band = screening_band(dim)
    neg_inf = float("-inf")
    t = tile_size
    copies_before = np.concatenate([[0], np.cumsum(is_copy)])
    # The tile buffer is sized to the largest query and key tiles this call can have, not to
    # tile_size: a small cluster (or a generation's few new rows) pays only for its size.
    max_rq, max_keys = min(t, n - first_query), min(t, n)
    tile_buf = torch.empty((max_rq, max_keys), dtype=torch.float32, device=dev)
    upper = _upper_mask(max_rq, dev)

    with ieee_fp32_matmul():
        for q0 in range(first_query, n, t):
            q1 = min(q0 + t, n)
            rq = q1 - q0
            queries = yt[q0:q1]
            # Running fp32 (screening) max per row; candidates within 2*band of it.
            run_max = torch.full((rq,), neg_inf, dtype=torch.float32, device=dev)
            cand_rows, cand_cols, cand_sims = [], [], []
            # Key tiles before the query tile, then the diagonal tile (the query tile itself),
            # merged with the last key tile when both fit in one: a generation's few new rows
            # and their cluster's earlier rows then cost one product, not two.
            key_tiles = [(k0, min(k0 + t, q0)) for k0 in range(0, q0, t)]
            if key_tiles and q1 - key_tiles[-1][0] <= t:
                key_tiles[-1] = (key_tiles[-1][0], q1)
            else:
                key_tiles.append((q0, q1))
            for k0, k1 in key_tiles:
                sims = tile_buf[:rq, : k1 - k0]
                torch.mm(queries, yt[k0:k1].T, out=sims)
                if k1 == q1:  # holds the diagonal block: keys must come strictly before the query
                    sims[:, q0 - k0 :].masked_fill_(upper[:rq, :rq], neg_inf)
                if copies_before[k1] > copies_before[k0]:
                    sims.masked_fill_(copy_cols[k0:k1].unsqueeze(0), neg_inf)
                tile_max = sims.amax(dim=1)
                active = (tile_max > neg_inf) & (tile_max >= run_max - 2 * band)
                n_active = int(active.sum())
                if n_active == 0:
                    continue
                new_max = torch.maximum(run_max, tile_max)
                threshold = torch.where(active, new_max - 2 * band, float("inf"))
                if n_active * 4 >= rq:  # most rows: one compare over the tile beats a row gather
                    r_local, c_local = (sims >= threshold.unsqueeze(1)).nonzero(as_tuple=True)
                else:
                    act_rows = active.nonzero().squeeze(1)
                    r_sub, c_local = (sims.index_select(0, act_rows) >= threshold[act_rows].unsqueeze(1)).nonzero(as_tuple=True)
                    r_local = act_rows[r_sub]
                cand_rows.append(r_local)
                cand_cols.append(c_local + k0)
                cand_sims.append(sims[r_local, c_local])
                run_max = new_max
            if not cand_rows:
                continue
            rows, cols, approx = torch.cat(cand_rows), torch.cat(cand_cols), torch.cat(cand_sims)
            # The true argmax is within 2*band of the final screening max (see module docstring).
            live = approx >= run_max[rows] - 2 * band
            rows, cols = rows[live], cols[live]
            vals = _rescore(yt, rows + q0, cols)
            best_val, best_col = _best_per_row(rows, cols, vals, rq)
            max_sim[q0:q1] = best_val.cpu().numpy()
            dup_of[q0:q1] = best_col.cpu().numpy()
    max_sim[0] = np.nan
    dup_of[0] = -1
    return ClusterScores(max_sim, dup_of)


def removed_mask(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """Removed iff max_sim > float32(1 - eps), compared in float32; the first item (NaN) is kept."""
    threshold = np.float32(1.0 - eps)
    with np.errstate(invalid="ignore"):
        return np.asarray(max_sim, dtype=np.float32) > threshold
