"""The Prefect flow on object storage: s3:// input and output on a real HTTP S3 endpoint
(moto's server on 127.0.0.1) gives the run layout of docs/architecture.md in the bucket and exactly the
decisions of the same run on local disk."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from semdedup_core.config import RunConfig
from semdedup_core.run.stage_results import RunSummary

from .conftest import RunResults, unit_rows, write_embeddings

DIM = 24
SHARDS = 3
CFG = dict(eps=0.1, clusters=12, buckets=4, workers=2, seed=11, kmeans_iterations=10)


def make_data(folder: Path) -> dict:
    """~2.5k seeded unit vectors in 3 parquet shards (list<float32>): topic clusters, planted
    exact and near copies, one NaN and one zero row."""
    rng = np.random.default_rng(2024)
    centers = unit_rows(rng, 8, DIM)
    base = centers[rng.integers(0, 8, 2000)] + 0.5 * rng.standard_normal((2000, DIM)).astype(np.float32) / np.sqrt(DIM)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[:250] + 0.01 * rng.standard_normal((250, DIM)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    vectors = np.concatenate([base, base[300:400], near, np.zeros((2, DIM), np.float32)]).astype(np.float32)
    vectors[-2, 5] = np.nan
    ids = [f"obj-{i:05d}" for i in range(len(vectors))]
    perm = rng.permutation(len(vectors))
    files = []
    for s, part in enumerate(np.array_split(perm, SHARDS)):
        files.append(write_embeddings(folder / f"part-{s}.parquet", [ids[i] for i in part], vectors[part]))
    return {"files": files, "glob": str(folder / "part-*.parquet"), "ids": ids, "broken": {ids[-2], ids[-1]}}


def run_flow(**kw) -> RunSummary:
    from flows.dedup_flow import semdedup_flow

    return semdedup_flow(config=RunConfig(**kw))


@pytest.fixture(scope="module")
def runs(prefect_harness, moto_s3, tmp_path_factory) -> dict:
    """The same flow run twice: s3:// in and out, and local in and out."""
    data = make_data(tmp_path_factory.mktemp("s3-data"))
    bucket = moto_s3.new_bucket("flow")
    for f in data["files"]:
        moto_s3.upload(f, bucket, f"datasets/emb/{f.name}")
    s3_out = f"s3://{bucket}/runs/first"
    s3_summary = run_flow(input=[f"s3://{bucket}/datasets/emb/part-*.parquet"], output=s3_out, **CFG)
    local_out = tmp_path_factory.mktemp("local-run") / "run"
    local_summary = run_flow(input=[data["glob"]], output=str(local_out), **CFG)
    return {
        "data": data,
        "bucket": bucket,
        "s3": RunResults(s3_out, moto_s3),
        "s3_summary": s3_summary,
        "local": RunResults(local_out),
        "local_out": local_out,
        "local_summary": local_summary,
    }


@pytest.mark.e2e
def test_flow_writes_the_run_layout_into_the_bucket(runs, moto_s3):
    keys = [k.removeprefix("runs/first/") for k in moto_s3.keys(runs["bucket"], "runs/first/")]
    expected = {
        "run.json",
        "clustering/centroids.npy",
        "clustering/fit.json",
        "partitions/index.json",
        "result/kept.parquet",
        "result/removed.parquet",
        "result/failed.parquet",
        "result/summary.json",
        "report/index.html",
        *(f"scores/bucket-{b:05d}.parquet" for b in range(CFG["buckets"])),
        *(f"partitions/shard-{s:05d}.json" for s in range(SHARDS)),
    }
    assert expected <= set(keys), sorted(expected - set(keys))
    assert "lease.json" not in keys and not [k for k in keys if ".semdedup-tmp-" in k]
    # exactly the files the local run wrote: same layout, whatever the store (a stored plan is
    # named by its content, which holds the output URL)
    def named(paths) -> list[str]:
        return sorted(re.sub(r"^plans/[0-9a-f]{32}\.json$", "plans/DIGEST.json", p) for p in paths)

    local = named(str(p.relative_to(runs["local_out"])) for p in runs["local_out"].rglob("*") if p.is_file())
    assert named(keys) == local and "plans/DIGEST.json" in local
    # run.json: the config as given (s3 URLs, no credentials), every stage done
    run = json.loads(moto_s3.get(runs["bucket"], "runs/first/run.json"))
    assert run["config"]["input"] == [f"s3://{runs['bucket']}/datasets/emb/part-*.parquet"]
    assert run["config"]["output"] == f"s3://{runs['bucket']}/runs/first"
    assert [s["url"] for s in run["shards"]] == [f"s3://{runs['bucket']}/datasets/emb/part-{s}.parquet" for s in range(SHARDS)]
    for stage in ("plan", "fit", "assign", "collect", "dedup", "finalize"):
        assert run["stages"][stage]["status"] == "done", run["stages"]
    html = moto_s3.get(runs["bucket"], "runs/first/report/index.html").decode()
    assert html.lstrip().lower().startswith("<!doctype html") and f"{len(runs['data']['ids']):,}" in html


@pytest.mark.e2e
def test_summary_counts_on_s3(runs):
    s3, data = runs["s3"], runs["data"]
    s3.check_accounting(data["ids"])
    summary = RunSummary.model_validate(s3.summary)  # summary.json holds what the flow returned
    assert summary == runs["s3_summary"]
    assert summary.output == f"s3://{runs['bucket']}/runs/first"
    assert summary.n_input == len(data["ids"]) and summary.n_failed == 2
    assert summary.n_embedded == summary.n_kept + summary.n_removed == len(data["ids"]) - 2
    assert summary.n_removed >= 300  # the planted exact and near copies
    assert {r["id"] for r in s3.failed} == data["broken"]
    assert s3.n_score_files == CFG["buckets"]


@pytest.mark.e2e
def test_s3_run_decides_exactly_like_the_local_run(runs, moto_s3):
    s3, local = runs["s3"], runs["local"]
    got, want = s3.decisions(), local.decisions()
    assert got["kept"] == want["kept"]
    assert got["removed"] == want["removed"]  # dup_of, max_sim bit for bit, cluster
    assert got["failed"] == want["failed"]
    assert got["scores"] == want["scores"]  # cluster, centroid_sim, max_sim, dup_of, kept per id
    for key in ("n_input", "n_embedded", "n_kept", "n_removed", "n_failed", "eps", "kept_fraction", "clusters", "buckets"):
        assert getattr(runs["s3_summary"], key) == getattr(runs["local_summary"], key), key
    # failures name their shard by the URL it was read from
    local_dir = str(Path(runs["data"]["glob"]).parent)
    s3_prefix = f"s3://{runs['bucket']}/datasets/emb"
    assert sorted((r["id"], r["source"].replace(s3_prefix, local_dir), r["error"]) for r in s3.failed) == sorted(
        (r["id"], r["source"], r["error"]) for r in local.failed
    )
    assert all(r["source"].startswith(s3_prefix) for r in s3.failed)
    # the centroids are the same bits
    s3_centroids = np.load(io.BytesIO(moto_s3.get(runs["bucket"], "runs/first/clustering/centroids.npy")))
    local_centroids = np.load(runs["local_out"] / "clustering" / "centroids.npy")
    assert s3_centroids.dtype == np.float32 and s3_centroids.shape == (CFG["clusters"], DIM)
    assert s3_centroids.tobytes() == local_centroids.tobytes()


def test_raw_tars_on_s3_give_the_same_result_and_dataset_as_on_disk(moto_s3, tiny_clip, tmp_path):
    """webdataset tars read from S3 (range reads of each image), every artifact and the
    deduplicated tars written to S3: identical to the same run on local disk."""
    import tarfile

    from semdedup_core.run.dag import run_pipeline

    from .conftest import png_bytes, write_tar

    rng = np.random.default_rng(5)
    tars = []
    for s in range(2):
        samples = [
            {"__key__": f"{s}{i:04d}", "png": png_bytes(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)), "txt": f"c{i}"} for i in range(10)
        ]
        samples[4]["png"] = samples[1]["png"]  # an exact copy
        tars.append(write_tar(tmp_path / "tars" / f"{s:05d}.tar", samples))
    bucket = moto_s3.new_bucket("raw")
    for t in tars:
        moto_s3.upload(t, bucket, f"wds/{t.name}")
    common = dict(model=tiny_clip, clusters=2, eps=0.01, decode_workers=0, write_dataset=True)
    s3_summary = run_pipeline(RunConfig(input=[f"s3://{bucket}/wds/*.tar"], output=f"s3://{bucket}/run", **common))
    local_summary = run_pipeline(RunConfig(input=[str(tmp_path / "tars")], output=str(tmp_path / "run"), **common))
    for key in ("n_input", "n_kept", "n_removed", "n_exact", "n_failed"):
        assert getattr(s3_summary, key) == getattr(local_summary, key), key
    assert s3_summary.n_exact == 2
    local, remote = RunResults(tmp_path / "run"), RunResults(f"s3://{bucket}/run", moto_s3)
    # Sources name where each item lives: the same members under the bucket's or the folder's URL.
    def rooted(rows: list[dict], root: str) -> list[str]:
        return sorted(json.dumps({**r, "source": r["source"].replace(root, "ROOT")} if r.get("source") else r) for r in rows)

    for name in ("kept", "removed", "failed"):
        remote_rows, local_rows = rooted(getattr(remote, name), f"s3://{bucket}/wds/"), rooted(getattr(local, name), f"{tmp_path}/tars/")
        assert remote_rows == local_rows, name
    assert all(r["source"].startswith(f"s3://{bucket}/wds/") for r in remote.removed)
    assert "run/embeddings/shard-00000.parquet" in moto_s3.keys(bucket, "run/embeddings/")
    for t in tars:
        with tarfile.open(fileobj=io.BytesIO(moto_s3.get(bucket, f"run/dataset/{t.name}"))) as remote, tarfile.open(tmp_path / "run" / "dataset" / t.name) as here:
            assert [(m.name, remote.extractfile(m).read()) for m in remote] == [(m.name, here.extractfile(m).read()) for m in here]
