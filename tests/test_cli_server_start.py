"""The CLI starts Prefect's ephemeral API server on a thread while it plans (flows.cli.EphemeralServerStart):
the flow uses that one server, and no run, finished or refused, leaves a server behind."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .conftest import unit_rows, write_embeddings
from .test_cli import cli, make_data


def processes_using(home: Path) -> list[str]:
    """Command lines of live processes whose environment names this PREFECT_HOME (the CLI's
    API server inherits it)."""
    marker = b"PREFECT_HOME=" + str(home).encode() + b"\0"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def test_a_run_uses_the_one_server_the_cli_started_and_stops_it(tmp_path):
    pattern, _ = make_data(tmp_path / "data")
    proc = cli(["run", pattern, "--output", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    log = Path(re.search(r"^log: (.+)$", proc.stdout, re.MULTILINE).group(1))
    text = log.read_text()
    # One server, started and stopped once (its start line is not logged when the start
    # thread runs before Prefect's logging is set up; its stop always is).
    assert text.count("Starting temporary server") <= 1 and text.count("Stopping temporary server") == 1, text[-3000:]
    assert processes_using(tmp_path / "prefect-home") == []


def test_a_run_refused_while_the_server_starts_leaves_no_server(tmp_path):
    rng = np.random.default_rng(1)
    write_embeddings(tmp_path / "data" / "a.parquet", ["same", "other", "same"], unit_rows(rng, 3, 8))
    proc = cli(["run", str(tmp_path / "data" / "*.parquet"), "--output", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "duplicate id 'same'" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
    assert processes_using(tmp_path / "prefect-home") == []
