"""Every kind of bad input gets a clear error naming the shard/item and the reason, raised
before any artifact is written, or ends as a row of result/failed.parquet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.plan import plan_run
from semdedup_core.inputs.precomputed import InputError

from .conftest import unit_rows, write_embeddings


def _cfg(inputs, out: Path, **kw) -> RunConfig:
    return RunConfig(input=[str(i) for i in inputs], output=str(out), **kw)


def _no_artifacts(out: Path) -> None:
    for sub in ("partitions", "scores", "result", "clustering", "embeddings"):
        assert not (out / sub).exists(), f"{sub}/ was written before the error"


def expect_plan_error(cfg: RunConfig, exc_type, *fragments: str) -> str:
    """plan_run fails with ``exc_type``; the message holds every fragment; nothing was written."""
    with pytest.raises(exc_type) as info:
        plan_run(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message: {message}"
    assert "\n" not in message.strip(), "the reason should be one line"
    _no_artifacts(Path(cfg.output))
    return message


def _good_shard(path: Path, prefix: str, n: int = 20, dim: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_embeddings(path, [f"{prefix}{i}" for i in range(n)], unit_rows(rng, n, dim))


def _ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


# ---------------------------------------------------------------- columns


def test_missing_embedding_column(tmp_path):
    path = tmp_path / "data" / "noemb.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "vector": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32()))}), path)
    msg = expect_plan_error(_cfg([path], tmp_path / "out", clusters=1), InputError, str(path), "missing column", "embedding")
    assert "vector" in msg  # lists what the shard has


def test_missing_id_column(tmp_path):
    path = tmp_path / "data" / "noid.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "embedding": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32()))}), path)
    expect_plan_error(_cfg([path], tmp_path / "out", clusters=1), InputError, str(path), "missing column", "id")


def test_custom_column_names_that_do_not_exist(tmp_path):
    path = _good_shard(tmp_path / "data" / "a.parquet", "a")
    expect_plan_error(_cfg([path], tmp_path / "out", clusters=1, embedding_column="clip"), InputError, str(path), "clip")
    expect_plan_error(_cfg([path], tmp_path / "out", clusters=1, id_column="uid"), InputError, str(path), "uid")


def test_embedding_column_of_the_wrong_type(tmp_path):
    path = tmp_path / "data" / "strings.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "embedding": ["0.1,0.2", "0.3,0.4"]}), path)
    expect_plan_error(_cfg([path], tmp_path / "out", clusters=1), InputError, str(path), "embedding", "expected a list of floats")


# ---------------------------------------------------------------- dimensions, ids, emptiness


def test_different_dimensions_across_shards(tmp_path):
    a = _good_shard(tmp_path / "data" / "a.parquet", "a", dim=8)
    b = _good_shard(tmp_path / "data" / "b.parquet", "b", dim=12)
    msg = expect_plan_error(_cfg([tmp_path / "data" / "*.parquet"], tmp_path / "out", clusters=2), InputError, str(b), str(a))
    assert "12" in msg and "8" in msg and "dimension" in msg


def test_duplicate_id_across_shards_names_the_id_and_both_shards(tmp_path):
    rng = np.random.default_rng(1)
    a = write_embeddings(tmp_path / "data" / "a.parquet", ["x0", "x1", "shared-id", "x3"], unit_rows(rng, 4, 8))
    b = write_embeddings(tmp_path / "data" / "b.parquet", ["y0", "shared-id", "y2"], unit_rows(rng, 3, 8))
    msg = expect_plan_error(_cfg([tmp_path / "data" / "*.parquet"], tmp_path / "out", clusters=2), InputError, "shared-id", str(a), str(b), "duplicate")
    assert re.search(r"a\.parquet row 2", msg) and re.search(r"b\.parquet row 1", msg)


def test_duplicate_id_inside_one_shard(tmp_path):
    rng = np.random.default_rng(2)
    a = write_embeddings(tmp_path / "data" / "a.parquet", ["p", "q", "p"], unit_rows(rng, 3, 8))
    expect_plan_error(_cfg([a], tmp_path / "out", clusters=1), InputError, "'p'", str(a), "duplicate")


def test_null_id(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "data" / "nullid.parquet"
    path.parent.mkdir()
    x = unit_rows(rng, 3, 4)
    pq.write_table(pa.table({"id": pa.array(["a", None, "c"], pa.string()), "embedding": pa.array(list(x), pa.list_(pa.float32()))}), path)
    expect_plan_error(_cfg([path], tmp_path / "out", clusters=1), InputError, str(path), "row 1", "null id")


def test_no_files_match(tmp_path):
    pattern = tmp_path / "nothing-here" / "*.parquet"
    expect_plan_error(_cfg([pattern], tmp_path / "out"), InputError, str(pattern), "no input files")


def test_only_a_shard_with_zero_rows(tmp_path):
    path = tmp_path / "data" / "empty.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32()))}), path)
    expect_plan_error(_cfg([path], tmp_path / "out"), InputError, "no rows")


def test_an_empty_shard_next_to_real_ones_is_fine(tmp_path):
    _good_shard(tmp_path / "data" / "a.parquet", "a", n=10)
    empty = tmp_path / "data" / "b.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32()))}), empty)
    plan = plan_run(_cfg([tmp_path / "data" / "*.parquet"], tmp_path / "out", clusters=2))
    assert (plan.n_input, plan.dim, len(plan.shards)) == (10, 8, 2)


def test_the_same_file_twice(tmp_path):
    a = _good_shard(tmp_path / "data" / "a.parquet", "a")
    expect_plan_error(_cfg([a, tmp_path / "data" / "*.parquet"], tmp_path / "out", clusters=1), InputError, str(a), "twice")


def test_more_clusters_than_items(tmp_path):
    _good_shard(tmp_path / "data" / "a.parquet", "a", n=5)
    msg = expect_plan_error(_cfg([tmp_path / "data" / "a.parquet"], tmp_path / "out", clusters=6), ConfigError, "clusters=6")
    assert "5" in msg


def test_more_buckets_than_clusters(tmp_path):
    _good_shard(tmp_path / "data" / "a.parquet", "a", n=20)
    expect_plan_error(_cfg([tmp_path / "data" / "a.parquet"], tmp_path / "out", clusters=2, buckets=3), ConfigError, "buckets=3", "clusters=2")


# ---------------------------------------------------------------- unreadable shards


def test_garbage_bytes_named_parquet(tmp_path):
    _good_shard(tmp_path / "data" / "a.parquet", "a")
    bad = tmp_path / "data" / "b.parquet"
    bad.write_bytes(np.random.default_rng(4).bytes(3000))
    expect_plan_error(_cfg([tmp_path / "data" / "*.parquet"], tmp_path / "out", clusters=2), InputError, str(bad), "unreadable")


def _clip_folder(root: Path, n: int = 40, dim: int = 8, seed: int = 5) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    for shard in range(2):
        np.save(root / "img_emb" / f"img_emb_{shard:03d}.npy", unit_rows(rng, n, dim).astype(np.float16))
        pq.write_table(pa.table({"key": [f"k{shard}_{i}" for i in range(n)]}), root / "metadata" / f"metadata_{shard:03d}.parquet")
    return root


def test_truncated_npy_in_a_clip_retrieval_folder(tmp_path):
    """Either rejected up front naming the file, or its missing rows end in failed (never lost)."""
    root = _clip_folder(tmp_path / "clip")
    npy = root / "img_emb" / "img_emb_001.npy"
    data = npy.read_bytes()
    npy.write_bytes(data[: len(data) - 8 * 2 * 10 - 5])  # drop the last 10 rows and a bit more
    out = tmp_path / "out"
    cfg = _cfg([root], out, clusters=2, eps=0.1)
    try:
        plan_run(cfg)
    except InputError as exc:
        assert str(npy) in str(exc) and "truncated" in str(exc), str(exc)
        _no_artifacts(out)
        return
    summary = run_pipeline(cfg)
    assert summary.n_input == 80
    assert summary.n_failed >= 11
    failed = pq.read_table(out / "result" / "failed.parquet").to_pylist()
    assert all(str(npy) in f["source"] for f in failed)


def test_clip_retrieval_metadata_not_row_aligned(tmp_path):
    root = _clip_folder(tmp_path / "clip")
    meta = root / "metadata" / "metadata_001.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(39)]}), meta)
    expect_plan_error(_cfg([root], tmp_path / "out", clusters=2), InputError, "img_emb_001.npy", str(meta), "row-aligned")


def test_clip_retrieval_missing_metadata_file(tmp_path):
    root = _clip_folder(tmp_path / "clip")
    (root / "metadata" / "metadata_001.parquet").unlink()
    expect_plan_error(_cfg([root], tmp_path / "out", clusters=2), InputError, "img_emb_001.npy", "metadata")


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"eps": 1.5}, "eps"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"target_keep": 1.0}, "target_keep"),
        ({"target_keep": 0.0}, "target_keep"),
        ({"target_keep": 2}, "target_keep"),
    ],
)
def test_eps_and_target_keep_outside_the_open_unit_interval(tmp_path, kw, field):
    with pytest.raises(ValidationError) as info:
        RunConfig(input=["x.parquet"], output=str(tmp_path / "out"), **kw)
    assert field in str(info.value)
    with pytest.raises(ConfigError) as info2:
        RunConfig.load(None, input=["x.parquet"], output=str(tmp_path / "out"), **kw)
    message = str(info2.value)
    assert message.startswith(f"{field}:"), message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_eps_and_target_keep_together(tmp_path):
    with pytest.raises(ValidationError, match="either eps or target_keep"):
        RunConfig(input=["x.parquet"], output=str(tmp_path / "o"), eps=0.1, target_keep=0.5)
    with pytest.raises(ConfigError, match="either eps or target_keep, not both"):
        RunConfig.load(None, input=["x.parquet"], output=str(tmp_path / "o"), eps=0.1, target_keep=0.5)


def test_yaml_config_errors_are_readable(tmp_path):
    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("eps: 2.0\nclusters: 4\n")
    with pytest.raises(ConfigError, match=r"^eps: "):
        RunConfig.load(bad_value, input=["x.parquet"], output=str(tmp_path / "o"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epsilon: 0.1\n")
    with pytest.raises(ConfigError, match="epsilon"):
        RunConfig.load(unknown, input=["x.parquet"], output=str(tmp_path / "o"))
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("eps: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.load(not_yaml, input=["x.parquet"], output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        RunConfig.load(tmp_path / "missing.yaml", input=["x.parquet"], output=str(tmp_path / "o"))
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- eps\n- 0.1\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.load(a_list, input=["x.parquet"], output=str(tmp_path / "o"))


def test_keep_metadata_without_columns(tmp_path):
    with pytest.raises(ValidationError, match="metadata_columns"):
        RunConfig(input=["x.parquet"], output=str(tmp_path / "o"), keep="metadata")
    with pytest.raises(ConfigError, match="keep='metadata' needs metadata_columns"):
        RunConfig.load(None, input=["x.parquet"], output=str(tmp_path / "o"), keep="metadata")
    with pytest.raises(ConfigError, match="only used with keep='metadata'"):
        RunConfig.load(None, input=["x.parquet"], output=str(tmp_path / "o"), metadata_columns=["score"])


def test_metadata_column_missing_or_not_numeric(tmp_path):
    rng = np.random.default_rng(6)
    a = write_embeddings(tmp_path / "data" / "a.parquet", ["a", "b"], unit_rows(rng, 2, 4), caption=["x", "y"])
    out = tmp_path / "out"
    expect_plan_error(_cfg([a], out, clusters=1, keep="metadata", metadata_columns=["score"]), InputError, str(a), "score")
    expect_plan_error(_cfg([a], out, clusters=1, keep="metadata", metadata_columns=["caption"]), InputError, str(a), "caption", "numbers")


def test_unsupported_format_and_unknown_keep(tmp_path):
    with pytest.raises(ConfigError, match=r"^format: .*webdataset"):
        RunConfig.load(None, input=["x"], output=str(tmp_path / "o"), format="tfrecord")
    with pytest.raises(ConfigError, match="precomputed embeddings"):
        RunConfig.load(None, input=["x"], output=str(tmp_path / "o"), format="embeddings", model="ViT-B-16")
    with pytest.raises(ConfigError, match=r"^keep: "):
        RunConfig.load(None, input=["x"], output=str(tmp_path / "o"), keep="best")


def test_device_cuda_without_cuda(tmp_path):
    _good_shard(tmp_path / "data" / "a.parquet", "a")
    cfg = _cfg([tmp_path / "data" / "a.parquet"], tmp_path / "out", clusters=2, device="cuda")
    if torch.cuda.is_available():  # on a GPU machine the same config is valid
        assert plan_run(cfg).device.startswith("cuda")
    else:
        expect_plan_error(cfg, ConfigError, "cuda")


# ---------------------------------------------------------------- rows that fail, run completes


def _check_accounting(out: Path, all_ids: list[str]) -> tuple[dict, list[dict]]:
    summary = json.loads((out / "result" / "summary.json").read_text())
    assert summary["n_kept"] + summary["n_removed"] + summary["n_failed"] == summary["n_input"] == len(all_ids)
    kept = _ids(out / "result" / "kept.parquet")
    removed = _ids(out / "result" / "removed.parquet")
    failed_rows = pq.read_table(out / "result" / "failed.parquet").to_pylist()
    failed = [r["id"] for r in failed_rows]
    assert (len(kept), len(removed), len(failed)) == (summary["n_kept"], summary["n_removed"], summary["n_failed"])
    every = kept + removed + failed
    assert sorted(every) == sorted(all_ids), "every input id exactly once in kept/removed/failed"
    assert summary["n_embedded"] == len(kept) + len(removed)
    return summary, failed_rows


def test_bad_vectors_and_bad_rows_end_in_failed(tmp_path):
    rng = np.random.default_rng(7)
    data = tmp_path / "data"
    a_ids = [f"a{i}" for i in range(60)]
    b_ids = [f"b{i}" for i in range(50)]
    a = unit_rows(rng, 60, 8)
    a[4, 1] = np.nan
    a[17, 6] = np.inf
    a[33] = 0.0
    write_embeddings(data / "a.parquet", a_ids, a)
    b = unit_rows(rng, 50, 8)
    b_values = [list(map(float, v)) for v in b]
    b_values[9] = None
    b_values[21] = [0.1] * 7  # wrong length
    b_values[40] = [0.0] * 8
    path_b = data / "b.parquet"
    pq.write_table(pa.table({"id": b_ids, "embedding": pa.array(b_values, pa.list_(pa.float32()))}), path_b)
    out = tmp_path / "out"
    summary = run_pipeline(_cfg([data / "*.parquet"], out, clusters=4, eps=0.1))
    assert summary.n_failed == 6
    result, failed = _check_accounting(out, a_ids + b_ids)
    assert result == json.loads((out / "result" / "summary.json").read_text())
    by_id = {r["id"]: r for r in failed}
    assert set(by_id) == {"a4", "a17", "a33", "b9", "b21", "b40"}
    expected = {
        "a4": (data / "a.parquet", 4, ("NaN",)),
        "a17": (data / "a.parquet", 17, ("Inf",)),
        "a33": (data / "a.parquet", 33, ("zero",)),
        "b9": (path_b, 9, ("null",)),
        "b21": (path_b, 21, ("7", "8")),
        "b40": (path_b, 40, ("zero",)),
    }
    for item, (shard, row, words) in expected.items():
        source, error = by_id[item]["source"], by_id[item]["error"]
        assert str(shard) in source and re.search(rf"\brow {row}\b", source), source
        for w in words:
            assert w in error, (item, error)
    # failed items are not scored
    scored = {i for f in sorted((out / "scores").glob("*.parquet")) for i in _ids(f)}
    assert scored.isdisjoint(by_id) and len(scored) == 104


def test_clip_retrieval_bad_vectors_end_in_failed(tmp_path):
    root = _clip_folder(tmp_path / "clip", n=30)
    npy = root / "img_emb" / "img_emb_000.npy"
    x = np.load(npy)
    x[3] = 0
    x[12, 0] = np.inf
    np.save(npy, x)
    out = tmp_path / "out"
    summary = run_pipeline(_cfg([root], out, clusters=3, eps=0.1))
    assert summary.n_failed == 2
    _, failed = _check_accounting(out, [f"k{s}_{i}" for s in range(2) for i in range(30)])
    by_id = {r["id"]: r for r in failed}
    assert set(by_id) == {"k0_3", "k0_12"}
    assert str(npy) in by_id["k0_3"]["source"] and "row 3" in by_id["k0_3"]["source"]
    assert "zero" in by_id["k0_3"]["error"] and "Inf" in by_id["k0_12"]["error"]
