"""The ``semdedup`` command line as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import unit_rows, write_embeddings

# A guard against a hung child only; nothing is asserted about time.
HANG_GUARD_S = 300


def _semdedup_cmd() -> list[str]:
    script = shutil.which("semdedup", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "flows.cli"]


def cli(args: list[str], tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("COLUMNS", "LINES")}
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [*_semdedup_cmd(), *args], cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False
    )


def make_data(folder: Path, seed: int = 0) -> tuple[str, int]:
    """Three shards of unit vectors with planted exact and near copies."""
    rng = np.random.default_rng(seed)
    base = unit_rows(rng, 1500, 16)
    near = base[:150] + 0.01 * rng.standard_normal((150, 16)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    vectors = np.concatenate([base, base[150:250], near])
    ids = [f"c{i}" for i in range(len(vectors))]
    order = rng.permutation(len(vectors))
    for s, part in enumerate(np.array_split(order, 3)):
        write_embeddings(folder / f"part-{s}.parquet", [ids[i] for i in part], vectors[part])
    return str(folder / "part-*.parquet"), len(vectors)


def printed_count(stdout: str, label: str) -> int:
    match = re.search(rf"^\W*{label}\W+([\d,]+)\W*$", stdout, re.MULTILINE)
    assert match, f"no '{label}' row in:\n{stdout}"
    return int(match.group(1).replace(",", ""))


def printed_value(stdout: str, label: str) -> str:
    match = re.search(rf"^\W*{label}\s*\W\s*(\S+)", stdout, re.MULTILINE)
    assert match, f"no '{label}' row in:\n{stdout}"
    return match.group(1)


def collapsed(text: str) -> str:
    """The text without whitespace and table borders (a long cell may wrap over lines)."""
    return re.sub(r"[\s│┃║|]+", "", text)


def assert_summary_matches_stdout(stdout: str, summary: dict) -> None:
    assert printed_count(stdout, "input items") == summary["n_input"]
    assert printed_count(stdout, "kept") == summary["n_kept"]
    assert printed_count(stdout, "removed") == summary["n_removed"]
    assert printed_count(stdout, "failed") == summary["n_failed"]
    assert float(printed_value(stdout, "eps")) == pytest.approx(summary["eps"], rel=1e-5)


def assert_output_printed(stdout: str, out: Path) -> None:
    """The run folder is printed whole (a script or a user must be able to use it)."""
    assert re.search(r"^\W*output\b", stdout, re.MULTILINE), stdout
    assert collapsed(str(out)) in collapsed(stdout), f"output folder {out} not printed in full:\n{stdout}"


# ---------------------------------------------------------------- successful runs (slow)


@pytest.mark.e2e
def test_run_prints_the_summary_and_writes_the_layout(tmp_path):
    glob, n = make_data(tmp_path / "data")
    out = tmp_path / "out"
    proc = cli(["run", glob, "--output", str(out), "--eps", "0.1", "--clusters", "8"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "result" / "summary.json").read_text())
    assert summary["n_input"] == n and summary["eps"] == 0.1 and summary["clusters"] == 8
    assert summary["n_kept"] + summary["n_removed"] + summary["n_failed"] == n
    assert summary["n_removed"] >= 100  # the 100 exact copies at least
    assert_summary_matches_stdout(proc.stdout, summary)
    for part in ("run.json", "clustering/centroids.npy", "result/kept.parquet", "result/removed.parquet", "result/failed.parquet", "report/index.html"):
        assert (out / part).is_file(), part
    assert_output_printed(proc.stdout, out)


@pytest.mark.e2e
def test_config_file_with_a_cli_override(tmp_path):
    glob, n = make_data(tmp_path / "data", seed=1)
    out = tmp_path / "out"
    config = tmp_path / "semdedup.yaml"
    config.write_text(f"input: ['{tmp_path}/nowhere/*.parquet']\neps: 0.3\nclusters: 4\nseed: 3\nkeep: easy\ntile-size: 128\n")
    proc = cli(["run", glob, "--output", str(out), "--config", str(config), "--eps", "0.05"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "result" / "summary.json").read_text())
    assert summary["eps"] == 0.05  # the flag wins over the file
    assert summary["clusters"] == 4 and summary["keep"] == "easy"  # the rest comes from the file
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["seed"] == 3 and run["config"]["input"] == [glob]
    assert run["execution"]["tile_size"] == 128
    assert_summary_matches_stdout(proc.stdout, summary)
    assert_output_printed(proc.stdout, out)


@pytest.mark.e2e
def test_demo(tmp_path):
    """README command 1: the bundled corpus through the real all-MiniLM-L6-v2 (offline)."""
    proc = cli(["demo", "--output", str(tmp_path / "demo" / "run")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "demo" / "run"
    summary = json.loads((run / "result" / "summary.json").read_text())
    assert summary["n_kept"] + summary["n_removed"] + summary["n_failed"] == summary["n_input"]
    assert summary["embedder"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (run / "report" / "index.html").is_file()
    assert_summary_matches_stdout(proc.stdout, summary)
    docs = [json.loads(line) for p in sorted((tmp_path / "demo" / "data").glob("corpus-*.jsonl")) for line in p.read_text().splitlines()]
    assert summary["n_input"] == len(docs)
    removed = {r["id"]: r for r in pq.read_table(run / "result" / "removed.parquet").to_pylist()}
    # every exact copy is removed as exact; the real model finds most planted semantic copies
    exact = [d for d in docs if d["kind"] == "exact"]
    assert all(removed.get(d["id"], {}).get("reason") == "exact" or d["source"] in removed for d in exact)
    for kind in ("templated", "paraphrase"):
        caught = re.search(rf"Planted {kind} copies caught[^:]*:\s*([\d,]+) of ([\d,]+)", proc.stdout)
        assert caught, proc.stdout
        hit, total = (int(g.replace(",", "")) for g in caught.groups())
        planted = [d for d in docs if d["kind"] == kind]
        assert total == len(planted) and hit == sum(d["id"] in removed or d["source"] in removed for d in planted)
        assert hit >= 0.85 * total, (kind, hit, total)
    kind_of = {d["id"]: d["kind"] for d in docs}
    originals = [d for d in docs if d["kind"] == "original"]
    wrongly = [d for d in originals if d["id"] in removed and kind_of[removed[d["id"]]["dup_of"]] == "original"]
    assert len(wrongly) <= 0.02 * len(originals)
    assert re.search(rf"Distinct originals removed as a duplicate of another original: {len(wrongly)} of {len(originals):,}", proc.stdout)
    assert "Examples of what was removed and why" in proc.stdout and "cosine" in proc.stdout
    # the deduplicated corpus, line for line
    kept = set(pq.read_table(run / "result" / "kept.parquet").column("id").to_pylist())
    written = [json.loads(line)["id"] for p in sorted((run / "dataset").glob("corpus-*.jsonl")) for line in p.read_text().splitlines()]
    assert written == [d["id"] for d in docs if d["id"] in kept]
    assert not (tmp_path / "semdedup-demo").exists()  # nothing written outside --output's folder
    assert_output_printed(proc.stdout, run)


# ---------------------------------------------------------------- misconfigurations (fast, no Prefect)


def assert_fails_cleanly(proc: subprocess.CompletedProcess, out: Path, *fragments: str, code: int = 2) -> str:
    """One line on stderr naming ``fragments``, exit ``code`` (2: refused; 1: a failure while
    running, such as storage that cannot be reached), and no output folder."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line reason, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("semdedup: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "no output folder on a misconfiguration"
    return line


@pytest.fixture(scope="module")
def small_glob(tmp_path_factory) -> str:
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("cli-small")
    write_embeddings(folder / "a.parquet", [f"a{i}" for i in range(50)], unit_rows(rng, 50, 8))
    return str(folder / "*.parquet")


def test_eps_out_of_range(tmp_path, small_glob):
    out = tmp_path / "out"
    assert_fails_cleanly(cli(["run", small_glob, "--output", str(out), "--eps", "1.5"], tmp_path), out, "eps")


def test_eps_and_target_keep_together(tmp_path, small_glob):
    out = tmp_path / "out"
    proc = cli(["run", small_glob, "--output", str(out), "--eps", "0.1", "--target-keep", "0.5"], tmp_path)
    assert_fails_cleanly(proc, out, "eps", "target_keep")


def test_missing_input_glob(tmp_path):
    out = tmp_path / "out"
    pattern = str(tmp_path / "no-such-folder" / "*.parquet")
    assert_fails_cleanly(cli(["run", pattern, "--output", str(out), "--eps", "0.1"], tmp_path), out, pattern, "no input files")


def test_keep_metadata_without_columns(tmp_path, small_glob):
    out = tmp_path / "out"
    assert_fails_cleanly(cli(["run", small_glob, "--output", str(out), "--keep", "metadata"], tmp_path), out, "metadata")


def test_bad_input_and_bad_config_file(tmp_path, small_glob):
    out = tmp_path / "out"
    # more clusters than items: found before any work
    assert_fails_cleanly(cli(["run", small_glob, "--output", str(out), "--clusters", "51"], tmp_path), out, "clusters=51", "50")
    # a config file that cannot be read
    assert_fails_cleanly(cli(["run", small_glob, "--output", str(out), "--config", "missing.yaml"], tmp_path), out, "missing.yaml")


def test_raw_input_misconfigurations(tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "docs.jsonl"
    data.write_text('{"id": "a", "text": "hello"}\n')
    # a text model that is not there: found while planning, before anything is written
    missing = str(tmp_path / "no-model")
    assert_fails_cleanly(cli(["run", str(data), "--output", str(out), "--model", missing], tmp_path), out, missing, "cannot be loaded")
    # an open_clip name without weights would embed with random weights
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG")
    assert_fails_cleanly(cli(["run", str(folder), "--output", str(out), "--model", "ViT-B-16"], tmp_path), out, "ViT-B-16", "--pretrained")
    assert_fails_cleanly(cli(["run", str(data), "--output", str(out), "--fresh", "--reuse-embeddings"], tmp_path), out, "--fresh", "--reuse-embeddings")
