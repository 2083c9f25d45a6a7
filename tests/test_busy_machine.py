"""README command 1 on a machine whose cores are all busy: Prefect's embedded API server
starts slowly there, and the demo must still finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .test_cli import _semdedup_cmd, assert_summary_matches_stdout

# A guard against a hung child only; nothing is asserted about time.
HANG_GUARD_S = 3600


@pytest.mark.e2e
def test_demo_finishes_while_every_core_is_busy(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("COLUMNS", "LINES")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", SEMDEDUP_LOG_DIR=str(tmp_path / "logs"))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(2, os.cpu_count() or 2))]
    try:
        proc = subprocess.run(
            [*_semdedup_cmd(), "demo", "--output", str(tmp_path / "demo" / "run")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
        )
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    summary = json.loads((tmp_path / "demo" / "run" / "result" / "summary.json").read_text())
    assert summary["n_kept"] + summary["n_removed"] + summary["n_failed"] == summary["n_input"] > 0
    assert_summary_matches_stdout(proc.stdout, summary)
