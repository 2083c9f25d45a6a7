"""Keep strategies: the order in which a cluster's items are judged (docs/architecture.md §"What semdedup decides").

Every function takes the items of ONE cluster in input order (shard order, then row
order) and returns a permutation of ``range(n)``; the item placed first is never
removed, later items are removed when too similar to any earlier one.

``centroid_sim`` is the canonical dot of an item with its centroid (see
:class:`semdedup_core.dedup.clustering.CentroidIndex`): a function of the two vectors only, so
bit-identical items get equal keys and keep their input order wherever they were read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

KEEP_STRATEGIES = ("hard", "easy", "random", "metadata")


def distance_key(centroid_sim: np.ndarray) -> np.ndarray:
    """``1 - float32(x . c)`` computed in float32, exactly as the design specifies."""
    return np.float32(1.0) - np.asarray(centroid_sim, dtype=np.float32)


def hard_order(centroid_sim: np.ndarray) -> np.ndarray:
    """Least similar to the centroid first; equal keys in input order."""
    key = distance_key(centroid_sim)
    return np.argsort(-key, kind="stable")


def easy_order(centroid_sim: np.ndarray) -> np.ndarray:
    """Exactly the reverse of the hard order."""
    return hard_order(centroid_sim)[::-1].copy()


def random_order(n: int, seed: int, cluster: int) -> np.ndarray:
    """A permutation that depends only on (seed, cluster): reproducible per cluster."""
    return np.random.default_rng([seed, cluster]).permutation(n)


def metadata_order(
    centroid_sim: np.ndarray,
    metadata: Mapping[str, np.ndarray],
    columns: Sequence[str],
) -> np.ndarray:
    """By the named columns, each ``name`` (descending: larger is kept first) or
    ``name:asc``; NaN sorts last; remaining ties as in the hard order."""
    # np.lexsort uses the LAST key as primary, so build keys from least to most significant.
    keys: list[np.ndarray] = [-distance_key(centroid_sim)]
    for spec in reversed(list(columns)):
        name, _, direction = spec.partition(":")
        values = np.asarray(metadata[name], dtype=np.float64)
        ranked = values if direction == "asc" else -values
        keys.append(np.where(np.isnan(ranked), np.inf, ranked))
    # lexsort is stable, so full ties stay in input order.
    return np.lexsort(keys)


def cluster_order(
    strategy: str,
    centroid_sim: np.ndarray,
    *,
    seed: int,
    cluster: int,
    metadata: Mapping[str, np.ndarray] | None = None,
    metadata_columns: Sequence[str] = (),
) -> np.ndarray:
    if strategy == "hard":
        return hard_order(centroid_sim)
    if strategy == "easy":
        return easy_order(centroid_sim)
    if strategy == "random":
        return random_order(len(centroid_sim), seed, cluster)
    if strategy == "metadata":
        if metadata is None:
            raise ValueError("keep='metadata' needs the metadata columns")
        return metadata_order(centroid_sim, metadata, metadata_columns)
    raise ValueError(f"unknown keep strategy {strategy!r}; expected one of {KEEP_STRATEGIES}")
