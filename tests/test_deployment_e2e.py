"""End to end against a real `prefect server`: the README's deployment recipe, a worker, a run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from semdedup_core.demo import make_demo_embeddings

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("prefect server did not become healthy")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.e2e
def test_deployment_run_from_prefect_yaml_on_a_real_server(tmp_path):
    data = make_demo_embeddings(tmp_path / "data", n_base=2000, n_planted=300)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    prefect = str(BIN / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--port", str(port)], env=env, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        _wait_healthy(api, server)
        run = lambda *args: subprocess.run([prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)  # noqa: E731
        assert run("work-pool", "create", "semdedup", "--type", "process").returncode == 0
        deployed = run("--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr

        # The UI form: the options in groups, each a typed model with its real defaults.
        with urllib.request.urlopen(urllib.request.Request(f"{api}/deployments/filter", data=b"{}", headers={"content-type": "application/json"})) as r:
            deployments = {d["name"]: d for d in json.load(r)}
        assert set(deployments) == {"semdedup", "semdedup-nightly"}
        schema = deployments["semdedup"]["parameter_openapi_schema"]
        assert list(schema["properties"]) == ["input", "storage", "model", "dedup", "tuning", "collection"]
        assert set(schema["required"]) == {"input", "storage"}
        groups = schema["definitions"]
        assert {"urls", "format"} <= set(groups["InputOptions"]["properties"]) and "output" in groups["StorageOptions"]["properties"]
        assert groups["DedupOptions"]["properties"]["keep"]["enum"] == ["hard", "easy", "random", "metadata"]
        assert groups["FixedEps"]["properties"]["eps"]["default"] == 0.05

        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "semdedup"], env=env, cwd=REPO, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        output = tmp_path / "run"
        config = {"input": [str(tmp_path / "data" / "embeddings-*.parquet")], "output": str(output), "eps": 0.05}
        params = {"input": {"urls": config["input"]}, "storage": {"output": config["output"]}, "dedup": {"threshold": {"eps": config["eps"]}}}
        started = run("deployment", "run", "semdedup/semdedup", *(a for k, v in params.items() for a in ("--param", f"{k}={json.dumps(v)}")), "--watch")
        assert started.returncode == 0, started.stdout + started.stderr
        summary = json.loads((output / "result" / "summary.json").read_text())
        assert summary["n_input"] == data.n_items
        assert summary["n_kept"] + summary["n_removed"] + summary["n_failed"] == data.n_items
        assert summary["n_failed"] == data.n_broken and summary["n_removed"] > 0.9 * data.n_planted

        _check_cli_run_observed_by_the_server(api, env, tmp_path, config["input"])
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)


def _post(url: str, body: dict) -> list | dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.load(r)


def _check_cli_run_observed_by_the_server(api: str, env: dict, tmp_path: Path, inputs: list[str]) -> None:
    """`semdedup run` against the server: the terminal stays quiet and prints the run's UI URL;
    the server holds the run's INFO logs, its tags and one artifact key per output."""
    from flows.dedup_flow import artifact_key

    output = tmp_path / "cli-run"
    cli = subprocess.run(
        [str(BIN / "semdedup"), "run", *inputs, "--output", str(output), "--eps", "0.05", "--buckets", "3"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "INFO" not in cli.stderr and "Task run" not in cli.stdout + cli.stderr  # Prefect's lines went to the server and the log file
    urls = [line.split()[-1] for line in cli.stdout.splitlines() if line.startswith("Prefect flow run: ")]
    assert len(urls) == 1 and urls[0].startswith(api.removesuffix("/api")), cli.stdout
    run_id = urls[0].rstrip("/").rsplit("/", 1)[-1]

    with urllib.request.urlopen(f"{api}/flow_runs/{run_id}") as r:
        flow_run = json.load(r)
    assert flow_run["state"]["type"] == "COMPLETED"
    assert {"semdedup", f"output:{output}", f"input:{inputs[0]}"} <= set(flow_run["tags"])

    logs = _post(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    info = [entry["message"] for entry in logs if entry["level"] == 20]
    assert any("items in" in m and "clusters scored" in m for m in info), info  # the dedup units' own lines
    assert any(m.startswith("k-means") for m in info), info

    for kind in ("summary", "dedup"):  # the summary, and the dedup stage's progress (3 buckets)
        found = _post(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": [artifact_key(str(output), kind)]}}})
        assert [a["flow_run_id"] for a in found] == [run_id], (kind, found)
    progress = _post(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": [artifact_key(str(output), "dedup")]}}})[0]
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
