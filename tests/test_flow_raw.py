"""The Prefect flow from raw data: images in webdataset tars to kept/removed/failed, the
dataset written back, and a re-run that skips every embedded shard. Plus the CLI on a
jsonl text corpus, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from semdedup_core.config import RunConfig
from tests.conftest import png_bytes, write_tar

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _images(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    # Smooth random gradients: distinct images whose tiny-model embeddings still differ.
    base = np.linspace(0, 1, 40)[None, :, None] * rng.uniform(0, 255, (n, 1, 1, 3))
    return [np.clip(b + rng.integers(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8) for b in base]


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict:
    """Two img2dataset-style tars: 2 x 12 samples, one exact copy across tars, one corrupt image,
    one caption without an image."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("tars")
    images = _images(rng, 24)
    samples = []
    for i, pixels in enumerate(images):
        samples.append({"__key__": f"{i // 12:04d}{i % 12:05d}", "png": png_bytes(pixels), "txt": f"caption {i}", "json": json.dumps({"width": 40 + i})})
    samples[15]["png"] = samples[2]["png"]  # exact copy of an item in the first tar
    samples[20]["png"] = b"\x89PNG\r\n\x1a\nnot really a png"
    del samples[7]["png"]
    paths = [write_tar(folder / f"{s:05d}.tar", samples[12 * s : 12 * (s + 1)]) for s in range(2)]
    keys = [s["__key__"] for s in samples]
    return {"paths": paths, "keys": keys, "exact": (keys[15], keys[2]), "corrupt": keys[20], "no_image": keys[7]}


def _run(cfg: RunConfig) -> dict:
    from flows.dedup_flow import semdedup_flow

    return semdedup_flow(config=cfg)


def test_flow_from_tars_to_kept_removed_failed_and_dataset(tars, tiny_clip, tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(input=[str(tars["paths"][0].parent)], output=str(out), model=tiny_clip, clusters=3, eps=0.02, write_dataset=True)
    summary = _run(cfg)

    kept = pq.read_table(out / "result" / "kept.parquet").column("id").to_pylist()
    removed = pq.read_table(out / "result" / "removed.parquet").to_pylist()
    failed = pq.read_table(out / "result" / "failed.parquet").to_pylist()
    assert sorted(kept + [r["id"] for r in removed] + [f["id"] for f in failed]) == sorted(tars["keys"])
    assert (summary.n_input, summary.n_failed, summary.n_exact) == (24, 2, 1)
    assert summary.n_kept + summary.n_removed + summary.n_failed == 24

    copy, original = tars["exact"]
    exact = [r for r in removed if r["reason"] == "exact"]
    assert [{k: r[k] for k in ("id", "dup_of", "max_sim", "cluster", "reason")} for r in exact] == [
        {"id": copy, "dup_of": original, "max_sim": None, "cluster": None, "reason": "exact"}
    ]
    assert exact[0]["source"] == f"{tars['paths'][1]} member {copy}.png" and exact[0]["kept_id"] in kept
    by_id = {f["id"]: f for f in failed}
    assert "cannot decode image" in by_id[tars["corrupt"]]["error"] and str(tars["paths"][1]) in by_id[tars["corrupt"]]["source"]
    assert "no image" in by_id[tars["no_image"]]["error"] and str(tars["paths"][0]) in by_id[tars["no_image"]]["source"]
    embedded = pq.read_table(out / "embeddings" / "shard-00001.parquet").column("id").to_pylist()
    assert copy not in embedded and tars["corrupt"] not in embedded and len(embedded) == 10

    # the dataset written back: exactly the kept samples, every member byte for byte
    written: dict[str, bytes] = {}
    for path in sorted((out / "dataset").glob("*.tar")):
        with tarfile.open(path) as tf:
            written.update({m.name: tf.extractfile(m).read() for m in tf.getmembers()})
    expected: dict[str, bytes] = {}
    for path in tars["paths"]:
        with tarfile.open(path) as tf:
            expected.update({m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.split(".")[0] in set(kept)})
    assert written == expected and {n.split(".")[0] for n in written} == set(kept)

    run_json = json.loads((out / "run.json").read_text())
    assert {"scan", "exact", "embed", "fit", "dedup", "finalize", "write"} <= set(run_json["stages"])
    assert run_json["embedder"]["model"] == tiny_clip and run_json["clusters"] == 3


def test_rerun_skips_every_embedded_shard(tars, tiny_clip, tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(input=[str(p) for p in tars["paths"]], output=str(out), model=tiny_clip, clusters=3, eps=0.02)
    first = _run(cfg)
    markers = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "embeddings").glob("*")}
    second = _run(cfg)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "embeddings").glob("*")} == markers
    for key in ("n_input", "n_kept", "n_removed", "n_exact", "n_failed", "eps"):
        assert getattr(second, key) == getattr(first, key), key


def test_cli_on_a_jsonl_corpus_writes_the_filtered_corpus(tiny_bert, tmp_path):
    data = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": f"w{i} w{i + 1} a b"}) for i in range(30)]
    lines.append(json.dumps({"id": "d-copy", "text": "  W3 w4 A b "}))  # d3 up to case and spaces
    lines.append(json.dumps({"id": "d-empty", "text": "   "}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(data), "--output", str(out), "--model", str(tiny_bert), "--clusters", "2", "--eps", "0.001", "--write-dataset"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "result" / "summary.json").read_text())
    assert (summary["n_input"], summary["n_exact"], summary["n_failed"]) == (32, 1, 1)
    kept = set(pq.read_table(out / "result" / "kept.parquet").column("id").to_pylist())
    written = (out / "dataset" / "corpus.jsonl").read_text().splitlines()
    assert written == [line for line in lines if json.loads(line)["id"] in kept]
    failed = pq.read_table(out / "result" / "failed.parquet").to_pylist()
    assert failed == [{"id": "d-empty", "source": f"{data} line 32", "error": "text is only whitespace"}]
