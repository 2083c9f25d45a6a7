"""Readers and vector hygiene at the core level (no Prefect): parquet embeddings,
clip-retrieval folders, batch-by-batch reading, ``read_rows`` and ``prepare_vectors``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.config import RunConfig
from semdedup_core.inputs.precomputed import InputError, check_unique_ids, discover_shards, iter_batches, read_ids, read_rows
from semdedup_core.inputs.vectors import prepare_vectors

from .conftest import unit_rows, write_embeddings


def _cfg(inputs, tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(input=[str(i) for i in inputs], output=str(tmp_path / "out"), **kw)


def _read_all(shard, batch_rows: int, metadata_columns=None):
    ids, vecs, starts, bad = [], [], [], {}
    for b in iter_batches(shard, batch_rows, metadata_columns):
        starts.append(b.start)
        ids.extend(b.ids.to_pylist())
        vecs.append(np.asarray(b.vectors))
        bad.update({b.start + r: why for r, why in b.bad_rows.items()})
        assert len(b.ids) == len(b.vectors)
    return ids, np.concatenate(vecs) if vecs else np.zeros((0, shard.dim)), starts, bad


def _write_clip(root: Path, parts: list[tuple[str, np.ndarray, dict]]) -> Path:
    """clip-retrieval layout: img_emb/img_emb_{N}.npy (float16) + metadata/metadata_{N}.parquet."""
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for number, vectors, columns in parts:
        np.save(root / "img_emb" / f"img_emb_{number}.npy", vectors.astype(np.float16))
        table = pa.table(columns) if columns else pa.table({"caption": [f"c{i}" for i in range(len(vectors))]})
        pq.write_table(table, root / "metadata" / f"metadata_{number}.parquet")
    return root


# ---------------------------------------------------------------- parquet embeddings


def test_parquet_list_float32_shards_in_sorted_order(tmp_path):
    rng = np.random.default_rng(1)
    a, b = unit_rows(rng, 30, 12), unit_rows(rng, 20, 12)
    write_embeddings(tmp_path / "data" / "part-1.parquet", [f"b{i}" for i in range(20)], b)
    write_embeddings(tmp_path / "data" / "part-0.parquet", [f"a{i}" for i in range(30)], a)
    shards = discover_shards(_cfg([tmp_path / "data" / "*.parquet"], tmp_path))
    assert [Path(s.url).name for s in shards] == ["part-0.parquet", "part-1.parquet"]
    assert [s.index for s in shards] == [0, 1]
    assert [(s.kind, s.n_rows, s.dim, s.id_column) for s in shards] == [("parquet", 30, 12, "id"), ("parquet", 20, 12, "id")]
    ids, vecs, _, bad = _read_all(shards[0], 1000)
    assert ids == [f"a{i}" for i in range(30)]
    np.testing.assert_array_equal(vecs, a)
    assert bad == {}


def test_parquet_fixed_size_list(tmp_path):
    rng = np.random.default_rng(2)
    x = unit_rows(rng, 25, 8)
    path = tmp_path / "fixed.parquet"
    pq.write_table(pa.table({"id": [f"f{i}" for i in range(25)], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8)}), path)
    (shard,) = discover_shards(_cfg([path], tmp_path))
    assert (shard.n_rows, shard.dim) == (25, 8)
    ids, vecs, _, bad = _read_all(shard, 7)
    assert ids == [f"f{i}" for i in range(25)]
    np.testing.assert_array_equal(vecs, x)
    assert bad == {}


@pytest.mark.parametrize("value_type", [pa.float16(), pa.float64()], ids=["float16", "float64"])
def test_parquet_float16_and_float64_lists_are_accepted(tmp_path, value_type):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 6)).astype(value_type.to_pandas_dtype())
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(40)], "embedding": pa.array(list(x), pa.list_(value_type))}), path)
    (shard,) = discover_shards(_cfg([path], tmp_path))
    assert shard.dim == 6
    ids, vecs, _, bad = _read_all(shard, 16)
    assert len(ids) == 40 and bad == {}
    np.testing.assert_array_equal(vecs.astype(np.float64), x.astype(np.float64))
    prepared = prepare_vectors(vecs)
    assert prepared.vectors.dtype == np.float32 and prepared.valid.all()
    np.testing.assert_allclose(np.linalg.norm(prepared.vectors.astype(np.float64), axis=1), 1.0, atol=1e-6)
    # read_rows (the k-means sample reader) normalises the same way
    rows = np.array([0, 9, 39])
    got, valid = read_rows(shard, rows, batch_rows=8)
    assert valid.all()
    np.testing.assert_array_equal(got, prepared.vectors[rows])


def test_custom_id_and_embedding_columns(tmp_path):
    rng = np.random.default_rng(4)
    x = unit_rows(rng, 10, 5)
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"uid": pa.array(range(100, 110), pa.int64()), "vec": pa.array(list(x), pa.list_(pa.float32())), "other": list(range(10))}), path)
    cfg = _cfg([path], tmp_path, id_column="uid", embedding_column="vec")
    (shard,) = discover_shards(cfg)
    assert (shard.id_column, shard.embedding_column, shard.dim) == ("uid", "vec", 5)
    ids, vecs, _, _ = _read_all(shard, 4)
    assert ids == [str(i) for i in range(100, 110)]  # integer ids become strings
    assert read_ids(shard).to_pylist() == ids
    np.testing.assert_array_equal(vecs, x)
    # the default column names do not exist in this shard: a clear error names the file
    with pytest.raises(InputError, match=r"custom\.parquet.*missing column"):
        discover_shards(_cfg([path], tmp_path))


def test_iter_batches_small_batches_equal_one_big_batch_parquet(tmp_path):
    rng = np.random.default_rng(5)
    x = unit_rows(rng, 103, 9)
    path = tmp_path / "s.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(103)], "embedding": pa.array(list(x), pa.list_(pa.float32()))})
    pq.write_table(table, path, row_group_size=40)  # batches also cross row-group boundaries
    (shard,) = discover_shards(_cfg([path], tmp_path))
    ids_big, vec_big, starts_big, _ = _read_all(shard, 10_000)
    ids_small, vec_small, starts_small, _ = _read_all(shard, 7)
    assert starts_big == [0, 40, 80] or starts_big == [0]
    assert ids_small == ids_big == [f"r{i}" for i in range(103)]
    np.testing.assert_array_equal(vec_small, vec_big)
    # starts are increasing and cover the shard without gaps
    assert starts_small[0] == 0 and all(b > a for a, b in zip(starts_small, starts_small[1:]))
    assert len(starts_small) >= 103 // 7


def test_null_and_wrong_length_rows_are_reported_per_row(tmp_path):
    rng = np.random.default_rng(6)
    x = unit_rows(rng, 12, 4)
    values = [list(map(float, v)) for v in x]
    values[3] = None
    values[8] = [0.5, 0.5, 0.5]
    path = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"id": [f"h{i}" for i in range(12)], "embedding": pa.array(values, pa.list_(pa.float32()))}), path)
    (shard,) = discover_shards(_cfg([path], tmp_path))
    assert shard.dim == 4
    for batch_rows in (5, 100):
        ids, vecs, _, bad = _read_all(shard, batch_rows)
        assert set(bad) == {3, 8}
        assert "null" in bad[3]
        assert "3" in bad[8] and "4" in bad[8]
        good = [i for i in range(12) if i not in (3, 8)]
        np.testing.assert_array_equal(vecs[good], x[good])
        assert len(ids) == 12


# ---------------------------------------------------------------- clip-retrieval


def test_clip_retrieval_folder_with_key_column(tmp_path):
    rng = np.random.default_rng(7)
    a, b = unit_rows(rng, 11, 16), unit_rows(rng, 6, 16)
    root = _write_clip(
        tmp_path / "clip",
        [
            ("000", a, {"key": [f"k0_{i}" for i in range(11)], "caption": ["x"] * 11}),
            ("001", b, {"key": [f"k1_{i}" for i in range(6)], "caption": ["y"] * 6}),
        ],
    )
    shards = discover_shards(_cfg([root], tmp_path))
    assert [s.kind for s in shards] == ["clip-retrieval"] * 2
    assert [Path(s.url).name for s in shards] == ["img_emb_000.npy", "img_emb_001.npy"]
    assert [Path(s.metadata_url).name for s in shards] == ["metadata_000.parquet", "metadata_001.parquet"]
    assert [(s.n_rows, s.dim, s.id_column) for s in shards] == [(11, 16, "key"), (6, 16, "key")]
    ids, vecs, _, _ = _read_all(shards[0], 4)
    assert ids == [f"k0_{i}" for i in range(11)]
    np.testing.assert_array_equal(vecs, a.astype(np.float16))  # float16 as stored, row-aligned
    assert read_ids(shards[1]).to_pylist() == [f"k1_{i}" for i in range(6)]
    # the explicit format works as well as auto
    assert [s.url for s in discover_shards(_cfg([root], tmp_path, format="clip-retrieval"))] == [s.url for s in shards]


def test_clip_retrieval_image_path_ids_and_numeric_shard_order(tmp_path):
    rng = np.random.default_rng(8)
    parts = [(n, unit_rows(rng, 3, 8), {"image_path": [f"img/{n}/{i}.jpg" for i in range(3)]}) for n in ("2", "10", "1")]
    root = _write_clip(tmp_path / "clip", parts)
    shards = discover_shards(_cfg([root], tmp_path))
    assert [Path(s.url).name for s in shards] == ["img_emb_1.npy", "img_emb_2.npy", "img_emb_10.npy"]
    assert all(s.id_column == "image_path" for s in shards)
    assert read_ids(shards[2]).to_pylist() == [f"img/10/{i}.jpg" for i in range(3)]


def test_clip_retrieval_synthesised_ids_without_id_column(tmp_path):
    rng = np.random.default_rng(9)
    x = unit_rows(rng, 9, 8)
    root = _write_clip(tmp_path / "clip", [("000", x, {"caption": [f"c{i}" for i in range(9)]})])
    (shard,) = discover_shards(_cfg([root], tmp_path))
    assert shard.id_column is None
    ids, vecs, _, _ = _read_all(shard, 4)
    assert len(set(ids)) == 9
    assert all("img_emb_000" in i for i in ids)
    assert read_ids(shard).to_pylist() == ids
    np.testing.assert_array_equal(vecs, x.astype(np.float16))
    check_unique_ids([shard])


def test_clip_retrieval_synthesised_ids_are_unique_across_two_folders(tmp_path):
    """Two clip-retrieval outputs without id columns are legitimate input together."""
    rng = np.random.default_rng(10)
    roots = [_write_clip(tmp_path / f"clip{j}", [("000", unit_rows(rng, 5, 8), {"caption": ["c"] * 5})]) for j in range(2)]
    shards = discover_shards(_cfg(roots, tmp_path))
    assert len(shards) == 2
    ids = [i for s in shards for i in read_ids(s).to_pylist()]
    assert len(set(ids)) == 10, "synthesised ids must be unique across the whole input"
    check_unique_ids(shards)


def test_clip_retrieval_explicit_id_column_and_batches(tmp_path):
    rng = np.random.default_rng(11)
    x = unit_rows(rng, 50, 8)
    root = _write_clip(tmp_path / "clip", [("00", x, {"key": [f"k{i}" for i in range(50)], "uid": [f"u{i}" for i in range(50)]})])
    (shard,) = discover_shards(_cfg([root], tmp_path, id_column="uid"))
    assert shard.id_column == "uid"
    big = _read_all(shard, 1000)
    small = _read_all(shard, 3)
    assert small[0] == big[0] == [f"u{i}" for i in range(50)]
    np.testing.assert_array_equal(small[1], big[1])
    assert small[2] == list(range(0, 50, 3))
    with pytest.raises(InputError, match=r"metadata_00\.parquet.*'nope'"):
        discover_shards(_cfg([root], tmp_path, id_column="nope"))


def test_clip_retrieval_read_rows_and_metadata(tmp_path):
    rng = np.random.default_rng(12)
    x = unit_rows(rng, 30, 8)
    root = _write_clip(tmp_path / "clip", [("000", x, {"key": [f"k{i}" for i in range(30)], "score": np.arange(30, dtype=np.float64)})])
    (shard,) = discover_shards(_cfg([root], tmp_path, keep="metadata", metadata_columns=["score"]))
    seen = []
    for b in iter_batches(shard, 8, ["score"]):
        np.testing.assert_array_equal(b.metadata["score"], np.arange(b.start, b.start + len(b.ids), dtype=np.float64))
        seen.append(b.start)
    assert seen == [0, 8, 16, 24]
    rows = np.array([1, 7, 8, 29])
    got, valid = read_rows(shard, rows, batch_rows=8)
    assert valid.all() and got.dtype == np.float32
    expected = prepare_vectors(x.astype(np.float16)[rows]).vectors
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=1e-6)


# ---------------------------------------------------------------- read_rows


def test_read_rows_picks_rows_across_batches_and_marks_invalid(tmp_path):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((40, 6)).astype(np.float32) * 3.0  # not unit norm
    x[5, 2] = np.nan
    x[22] = 0.0
    values = [list(map(float, v)) for v in x]
    values[31] = None
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(40)], "embedding": pa.array(values, pa.list_(pa.float32()))}), path)
    (shard,) = discover_shards(_cfg([path], tmp_path))
    rows = np.array([0, 5, 6, 13, 22, 31, 39])
    got, valid = read_rows(shard, rows, batch_rows=6)
    assert valid.tolist() == [True, False, True, True, False, False, True]
    for k, r in enumerate(rows):
        if valid[k]:
            np.testing.assert_allclose(got[k], x[r] / np.linalg.norm(x[r].astype(np.float64)), rtol=1e-6, atol=1e-7)
    assert np.isfinite(got).all()


# ---------------------------------------------------------------- prepare_vectors


def test_prepare_vectors_reports_bad_rows_with_reasons():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    x[1, 0] = np.nan
    x[4, 3] = np.inf
    x[5, 1] = -np.inf
    x[6] = 0.0
    original = x.copy()
    p = prepare_vectors(x)
    assert p.valid.tolist() == [True, False, True, True, False, False, False, True]
    assert set(p.errors) == {1, 4, 5, 6}
    for r in (1, 4, 5):
        assert "NaN" in p.errors[r] or "Inf" in p.errors[r]
    assert "zero" in p.errors[6]
    assert p.vectors.shape == (4, 5) and p.vectors.dtype == np.float32
    assert np.isfinite(p.vectors).all()
    np.testing.assert_array_equal(x, original)  # the input is never modified in place


def test_prepare_vectors_normalises_non_unit_vectors_in_float32():
    rng = np.random.default_rng(15)
    x = (rng.standard_normal((50, 16)) * rng.uniform(0.1, 10, (50, 1))).astype(np.float32)
    original = x.copy()
    p = prepare_vectors(x)
    assert p.valid.all() and p.errors == {}
    assert p.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p.vectors.astype(np.float64), axis=1), 1.0, atol=2e-7 * 16)
    np.testing.assert_allclose(p.vectors, x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(x, original)


def test_prepare_vectors_leaves_unit_float32_bit_for_bit():
    rng = np.random.default_rng(16)
    x = unit_rows(rng, 200, 32)
    sq = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))
    assert np.abs(sq - 1).max() < 1e-5  # precondition: unit within float32 rounding
    p = prepare_vectors(x)
    assert p.valid.all()
    assert p.vectors.dtype == np.float32
    assert p.vectors.tobytes() == x.tobytes()
    # also with an invalid row mixed in: the valid rows are still untouched
    y = x.copy()
    y[7] = np.nan
    q = prepare_vectors(y)
    assert q.errors.keys() == {7}
    assert q.vectors.tobytes() == np.delete(x, 7, axis=0).tobytes()


def test_prepare_vectors_float16_and_float64_input():
    rng = np.random.default_rng(17)
    x64 = rng.standard_normal((10, 8))
    for x in (x64, x64.astype(np.float16)):
        p = prepare_vectors(x)
        assert p.vectors.dtype == np.float32 and p.valid.all()
        np.testing.assert_allclose(np.linalg.norm(p.vectors.astype(np.float64), axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        prepare_vectors(np.ones(5, np.float32))


def _prepared_whole_batch(x: np.ndarray):
    """prepare_vectors' rule written over the whole batch at once: float64 squared norms,
    bad rows out, rows off unit norm divided by their float32 norm."""
    finite = np.isfinite(x).all(axis=1)
    sq = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))
    valid = finite & (sq > 0)
    vectors = x[valid].copy()
    off = np.abs(sq[valid] - 1.0) > 1e-5
    vectors[off] /= np.sqrt(sq[valid][off]).astype(np.float32)[:, None]
    return valid, vectors


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 4200), dim=st.integers(1, 48), seed=st.integers(0, 2**16), bad=st.integers(0, 5))
def test_prepare_vectors_blockwise_equals_the_whole_batch_rule(n, dim, seed, bad):
    """Norms are summed a block of rows at a time (blocks of 2,048): across block boundaries
    the result is the whole-batch rule's, bit for bit, for unit, scaled and broken rows."""
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, n, dim) if n else np.zeros((0, dim), np.float32)
    if n:
        scaled = rng.random(n) < 0.5
        x[scaled] *= rng.uniform(0.01, 100, (int(scaled.sum()), 1)).astype(np.float32)
        for r in rng.integers(0, n, bad):
            x[r] = rng.choice([0.0, np.nan, np.inf])
    valid, vectors = _prepared_whole_batch(x)
    p = prepare_vectors(x)
    assert p.valid.tolist() == valid.tolist()
    assert p.vectors.tobytes() == vectors.tobytes()
