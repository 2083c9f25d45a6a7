"""scoring._resolve_kept: a collection run's removed items resolve to the kept item their
dup_of chain ends at, in this run or in an earlier one, against a plain walk of the chains."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.dedup.scoring import _resolve_kept


@st.composite
def runs(draw):
    """An earlier run's (ids, kept_id) and this run's scored rows in keep order: each removed
    row's dup_of is an earlier row of this run or an earlier run's item."""
    n_before = draw(st.integers(0, 12))
    before_ids = [f"b{i}" for i in range(n_before)]
    before_kept = [draw(st.sampled_from(before_ids[: i + 1])) for i in range(n_before)]
    n = draw(st.integers(1, 40))
    ids = [draw(st.sampled_from(["x", "é", "\U0001f600", ""])) + f"-{i}" for i in range(n)]
    kept, dup_of = [], []
    for i in range(n):
        choices = [*ids[:i], *before_ids]
        is_kept = not choices or draw(st.booleans())
        kept.append(is_kept)
        dup_of.append(None if is_kept else draw(st.sampled_from(choices)))
    return before_ids, before_kept, ids, kept, dup_of


def walk(before_ids, before_kept, ids, kept, dup_of):
    resolved = dict(zip(before_ids, before_kept))
    for i, k, d in zip(ids, kept, dup_of):
        resolved[i] = i if k else resolved[d]
    return [resolved[i] for i in ids]


@settings(max_examples=60, deadline=None)
@given(runs())
def test_resolve_kept_follows_dup_of_chains(run):
    before_ids, before_kept, ids, kept, dup_of = run
    scores = pa.table({"id": pa.array(ids, pa.string()), "dup_of": pa.array(dup_of, pa.string()), "kept": pa.array(kept)})
    earlier_ids = [pa.array(before_ids, pa.string()), scores.column("id").combine_chunks()] if before_ids else [scores.column("id").combine_chunks()]
    earlier_kept = [pa.array(before_kept, pa.string())] if before_ids else []
    got = _resolve_kept(scores, earlier_ids, earlier_kept)
    assert got.type == pa.string()
    assert got.to_pylist() == walk(before_ids, before_kept, ids, kept, dup_of)


def test_resolve_kept_refuses_a_dup_of_in_no_run():
    scores = pa.table({"id": ["a", "b"], "dup_of": [None, "zz"], "kept": [True, False]})
    with pytest.raises(RuntimeError, match="damaged"):
        _resolve_kept(scores, [scores.column("id").combine_chunks()], [])
