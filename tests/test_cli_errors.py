"""Hostile input at the command line: every failure is one line on stderr and an exit code
(2 refused, 3 nothing usable, 1 failed while running), never a traceback; the details go
to a log file that the line names. Each test runs the real ``semdedup`` as a subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import RunResults, unit_rows, write_embeddings
from .test_cli import cli, make_data


@pytest.fixture(autouse=True)
def log_dir(tmp_path, monkeypatch) -> Path:
    """Each test's CLI logs in its own folder (the CLI reads SEMDEDUP_LOG_DIR)."""
    folder = tmp_path / "logs"
    monkeypatch.setenv("SEMDEDUP_LOG_DIR", str(folder))
    return folder


def one_error_line(proc, code: int, *fragments: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("semdedup: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def named_log(line: str) -> Path:
    match = re.search(r"\(details: (\S+\.log)\)$", line)
    assert match, f"no log file named in: {line}"
    return Path(match.group(1))


def small_embeddings(folder: Path, n: int = 40, dim: int = 8) -> str:
    write_embeddings(folder / "a.parquet", [f"a{i}" for i in range(n)], unit_rows(np.random.default_rng(1), n, dim))
    return str(folder / "*.parquet")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- refused before anything runs (fast)


CONFIG_FILES = {
    "binary": b"\x00\x01\x02\xff\xfe\x89PNG\r\n\x1a\n\x00\x00",
    "latin-1": "eps: 0.1\nmodel: caf\u00e9\n".encode("latin-1"),
    "utf-16": "eps: 0.1\n".encode("utf-16"),
    "a list": b"- eps\n- 0.1\n",
    "a scalar": b"just text\n",
    "empty": b"",
    "bad syntax": b"eps: [0.1\nclusters: {\n",
    "impossible date": b"eps: 0.1\nwhen: 2024-13-45\n",
    "python tag": b"eps: !!python/object/apply:os.system ['true']\n",
    "number keys": b"1: 2\n",
    "deep nesting": b"a: " + b"[" * 20000 + b"]" * 20000 + b"\n",
}


@pytest.mark.parametrize("kind", sorted(CONFIG_FILES))
def test_a_config_file_that_is_not_a_yaml_mapping_is_refused_in_one_line(tmp_path, kind):
    config = tmp_path / "semdedup.yaml"
    config.write_bytes(CONFIG_FILES[kind])
    out = tmp_path / "out"
    one_error_line(cli(["run", small_embeddings(tmp_path / "data"), "--output", str(out), "--config", str(config)], tmp_path), 2, str(config))
    assert not out.exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_any_bytes_as_config_file_load_or_are_a_config_error(tmp_path, content):
    """In process, the class behind the one line: whatever the file holds, loading it gives a
    RunConfig or a ConfigError (which the CLI prints as one line), nothing else."""
    from semdedup_core.config import ConfigError, RunConfig

    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    try:
        RunConfig.load(config, input=["x.parquet"], output="out")
    except ConfigError as exc:
        assert str(exc) and "\n" not in " ".join(str(exc).split())


@pytest.mark.parametrize("seed", ["-1", "-2147483648", "2147483648", str(2**64)])
def test_seeds_faiss_cannot_take_are_refused(tmp_path, seed):
    out = tmp_path / "out"
    one_error_line(cli(["run", small_embeddings(tmp_path / "data"), "--output", str(out), "--seed", seed], tmp_path), 2, "seed")
    assert not out.exists()
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: {seed}\n")
    one_error_line(cli(["run", small_embeddings(tmp_path / "data"), "--output", str(out), "--config", str(config)], tmp_path), 2, "seed")
    assert not out.exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "x.parquet", "--output", "out", "--seed", "abc"], "--seed"),
        (["run", "x.parquet", "--output", "out", "--clusters", "1e3"], "--clusters"),
        (["run", "x.parquet", "--output", "out", "--no-such-option"], "--no-such-option"),
        (["run"], "INPUT"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, args, fragment):
    one_error_line(cli(args, tmp_path), 2, fragment)
    assert not (tmp_path / "out").exists()


def test_an_unexpected_failure_is_one_line_naming_a_log_with_the_traceback(tmp_path):
    """run.json that is not JSON (not a state we ever write): not a known refusal."""
    glob = small_embeddings(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_bytes(b"\x00garbage{")
    (out / "result").mkdir()
    (out / "result" / "summary.json").write_text("{}")
    line = one_error_line(cli(["run", glob, "--output", str(out)], tmp_path), 1)
    kind = re.match(r"semdedup: error: unexpected (\w+): ", line)
    assert kind, line
    log = named_log(line)
    assert log.is_file() and log.parent == tmp_path / "logs"
    text = log.read_text()
    assert "Traceback" in text and f"{kind.group(1)}:" in text
    assert (out / "run.json").read_bytes() == b"\x00garbage{"  # nothing of the user's touched


# ---------------------------------------------------------------- refused or failing inside the flow (start Prefect)


@pytest.mark.e2e
def test_missing_storage_block_is_a_refusal(tmp_path):
    out = tmp_path / "out"
    proc = cli(["run", small_embeddings(tmp_path / "data"), "--output", str(out), "--storage-block", "no-such-block"], tmp_path)
    one_error_line(proc, 2, "no-such-block")
    assert not out.exists()


@pytest.mark.e2e
def test_output_under_a_file_is_refused_before_work_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    one_error_line(cli(["run", small_embeddings(tmp_path / "data"), "--output", str(out)], tmp_path), 2, str(out), "is a file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.e2e
def test_duplicate_ids_found_inside_the_flow_are_one_line(tmp_path, tiny_bert):
    data = tmp_path / "data"
    write_lines(data / "a.jsonl", [json.dumps({"id": f"d{i}", "text": f"w{i} w{i + 1}"}) for i in range(6)])
    write_lines(data / "b.jsonl", [json.dumps({"id": "d3", "text": "w9 w8"}), json.dumps({"id": "e1", "text": "w7"})])
    out = tmp_path / "out"
    line = one_error_line(cli(["run", str(data), "--output", str(out), "--model", str(tiny_bert), "--clusters", "2"], tmp_path), 2, "duplicate id 'd3'")
    assert "ERROR" not in line
    # the refusal is recorded, so a corrected re-run (another id field) is not "a different configuration"
    assert "duplicate id" in json.loads((out / "run.json").read_text())["refused"]["reason"]


@pytest.mark.e2e
def test_all_invalid_raw_input_is_accounted_and_reported_by_reason(tmp_path, tiny_bert):
    data = tmp_path / "data"
    lines = [json.dumps({"id": f"e{i}", "body": f"w{i} w{i + 2}", "text": ""}) for i in range(4)]
    lines += [json.dumps({"id": f"s{i}", "body": f"w{i + 5} w{i}", "text": "   "}) for i in range(3)]
    lines += ["not json", "not json"]
    write_lines(data / "docs.jsonl", lines)
    out = tmp_path / "out"
    args = ["run", str(data), "--output", str(out), "--model", str(tiny_bert), "--clusters", "2"]
    line = one_error_line(cli(args, tmp_path), 3, "no usable items: 9 of 9 failed", "4 text is empty", "3 text is only whitespace", "2 line is not valid JSON")
    assert str(out / "result" / "failed.parquet") in line
    bad_lines = [f"{data / 'docs.jsonl'}:{n}" for n in (8, 9)]
    expected = [f"e{i}" for i in range(4)] + [f"s{i}" for i in range(3)]
    failed = pq.read_table(out / "result" / "failed.parquet").to_pylist()
    assert sorted(r["id"] for r in failed) == sorted(expected + bad_lines)
    assert all(r["error"] for r in failed)
    assert pq.read_table(out / "result" / "kept.parquet").num_rows == 0
    assert pq.read_table(out / "result" / "removed.parquet").num_rows == 0
    summary = json.loads((out / "result" / "summary.json").read_text())
    assert (summary["n_input"], summary["n_kept"], summary["n_removed"], summary["n_failed"]) == (9, 0, 0, 9)

    # the same command again says the same; the corrected one (the text is in 'body') runs on the same output
    one_error_line(cli(args, tmp_path), 3, "no usable items: 9 of 9 failed")
    proc = cli([*args, "--text-column", "body"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    results = RunResults(out)
    results.check_accounting(expected + bad_lines)
    assert sorted(r["id"] for r in results.failed) == sorted(bad_lines)


@pytest.mark.e2e
def test_more_clusters_than_embedded_items_then_the_corrected_rerun(tmp_path, tiny_bert):
    data = tmp_path / "data"
    lines = [json.dumps({"id": f"d{i}", "text": f"w{i} w{(i * 7) % 60}"}) for i in range(8)]
    lines += [json.dumps({"id": "copy", "text": "w0 w0"}), json.dumps({"id": "empty", "text": ""})]
    write_lines(data / "docs.jsonl", lines)
    out = tmp_path / "out"
    base = ["run", str(data), "--output", str(out), "--model", str(tiny_bert), "--eps", "0.2"]
    # 10 items: one exact copy and one empty text leave 8 to cluster; the plan cannot know that yet
    one_error_line(cli([*base, "--clusters", "9"], tmp_path), 2, "clusters=9", "only 8")
    embedded = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").glob("*.parquet")}
    proc = cli([*base, "--clusters", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = RunResults(out)
    decided = [r["id"] for r in results.kept + results.removed + results.failed]
    assert sorted(decided) == sorted([f"d{i}" for i in range(8)] + ["copy", "empty"])
    assert [r["id"] for r in results.failed] == ["empty"] and {"id": "copy", "reason": "exact"}.items() <= next(r for r in results.removed if r["id"] == "copy").items()
    assert results.summary["clusters"] == 3
    # the corrected run kept the embeddings (same input and model)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").glob("*.parquet")} == embedded


@pytest.mark.e2e
def test_more_clusters_than_valid_embeddings_then_the_corrected_rerun(tmp_path):
    rng = np.random.default_rng(3)
    vectors = unit_rows(rng, 30, 8)
    vectors[5:] = np.nan  # 25 of 30 unusable: only the k-means sample can tell
    write_embeddings(tmp_path / "data" / "a.parquet", [f"v{i}" for i in range(30)], vectors)
    out = tmp_path / "out"
    glob = str(tmp_path / "data" / "*.parquet")
    one_error_line(cli(["run", glob, "--output", str(out), "--clusters", "8"], tmp_path), 2, "clusters=8", "only 5")
    proc = cli(["run", glob, "--output", str(out), "--clusters", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = RunResults(out)
    results.check_accounting([f"v{i}" for i in range(30)])
    assert results.summary["n_failed"] == 25


@pytest.mark.e2e
def test_a_successful_run_keeps_stderr_clean_and_a_finished_rerun_skips_prefect(tmp_path, log_dir):
    glob, n = make_data(tmp_path / "data")
    out = tmp_path / "out"
    args = ["run", glob, "--output", str(out), "--eps", "0.1", "--clusters", "8"]
    first = cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    for noise in ("Error flushing events", "CancelledError", "Traceback"):
        assert noise not in first.stdout
    logs = sorted(log_dir.glob("*.log"))
    # Prefect's logs went to the log (the server may start before Prefect's logging is set up,
    # on the CLI's early-start thread: its stop is always logged)
    assert len(logs) == 1 and "temporary server on http" in logs[0].read_text()
    summary = (out / "result" / "summary.json").read_text()

    again = cli(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr == "" and "nothing to do" in again.stdout
    new_logs = sorted(set(log_dir.glob("*.log")) - set(logs))
    assert len(new_logs) == 1 and "temporary server" not in new_logs[0].read_text()
    assert (out / "result" / "summary.json").read_text() == summary
    # a changed result-defining option or input is not "finished": it is refused as before
    one_error_line(cli([*args[:-1], "9"], tmp_path), 2, "different configuration", "clusters")
    write_embeddings(tmp_path / "data" / "part-9.parquet", ["late"], unit_rows(np.random.default_rng(9), 1, 16))
    one_error_line(cli(args, tmp_path), 2, "different configuration", "input shards")
