"""The nightly deployment of infra/prefect.yaml against a real `prefect server` and process
worker: its grouped parameter form, the server refusing eps with target_keep when a run is
created, and scheduled runs that each add the next generation to a collection."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.deployments import (
    RENAMED,
    CollectionOptions,
    DedupOptions,
    FixedEps,
    InputOptions,
    ModelOptions,
    StorageOptions,
    TargetKeep,
    TuningOptions,
    build_config,
)
from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.demo import make_demo_embeddings
from tests.test_deployment_e2e import BIN, REPO, _free_port, _post, _stop, _wait_healthy


def test_every_run_option_is_in_exactly_one_group():
    """The grouped form reaches every RunConfig option, once, and builds the same config."""
    groups = [InputOptions, StorageOptions, ModelOptions, DedupOptions, TuningOptions, CollectionOptions, FixedEps, TargetKeep]
    names = [RENAMED.get(n, n) for g in groups for n in g.model_fields if n != "threshold"]
    # rethreshold_of is set by `semdedup rethreshold` from a finished run, never by a form.
    assert sorted(names) == sorted(set(RunConfig.model_fields) - {"rethreshold_of"})

    config = build_config(
        InputOptions(urls=["in/*.parquet"]), StorageOptions(output="out"), DedupOptions(threshold={"target_keep": 0.7}, seed=7),
        CollectionOptions(enabled=True, against="all"),
    )
    assert config == RunConfig(input=["in/*.parquet"], output="out", target_keep=0.7, seed=7, collection=True, against="all")
    assert build_config(InputOptions(urls=["x"]), StorageOptions(output="o"), DedupOptions()).effective_eps == 0.05
    with pytest.raises(ConfigError, match="options of a collection"):
        build_config(InputOptions(urls=["x"]), StorageOptions(output="o"), CollectionOptions(refit=True))


def _request(method: str, url: str, body: dict | list | None = None) -> tuple[int, object]:
    """The API's status and JSON answer; 503 (the server's SQLite busy) is retried."""
    data = None if body is None else json.dumps(body).encode()
    for _ in range(20):
        request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request) as r:
                text = r.read()
                return r.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                return exc.code, json.loads(exc.read() or b"null")
        time.sleep(1)
    raise TimeoutError(f"{method} {url}: the server stayed unavailable")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A prefect server with infra/prefect.yaml deployed; the scheduler and the worker's
    polling are made frequent so a 5-second schedule is seen promptly."""
    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(home / "home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    prefect = str(BIN / "prefect")
    proc = subprocess.Popen([prefect, "server", "start", "--port", str(port)], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(api, proc)
        run = lambda *args: subprocess.run([prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)  # noqa: E731
        assert run("work-pool", "create", "semdedup", "--type", "process").returncode == 0
        deployed = run("--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deployments = {d["name"]: d for d in _post(f"{api}/deployments/filter", {})}
        yield {"api": api, "env": env, "prefect": prefect, "nightly": deployments["semdedup-nightly"]}
    finally:
        _stop(proc)


@pytest.mark.e2e
def test_nightly_form_is_grouped_and_the_server_refuses_eps_with_target_keep(server):
    api, nightly = server["api"], server["nightly"]
    schema = nightly["parameter_openapi_schema"]
    definitions = schema["definitions"]
    groups = {name: definitions[prop["$ref"].rsplit("/", 1)[-1]] for name, prop in schema["properties"].items()}
    assert set(groups) == {"input", "storage", "model", "dedup", "tuning", "collection"}
    assert "urls" in groups["input"]["properties"] and "output" in groups["storage"]["properties"]
    assert {"workers", "tile_size", "device"} <= set(groups["tuning"]["properties"])
    # Real defaults: the threshold defaults to a fixed eps of 0.05, not to "None".
    assert schema["properties"]["dedup"]["default"]["threshold"] == {"eps": 0.05}
    assert groups["dedup"]["properties"]["threshold"]["default"] == {"eps": 0.05}
    assert schema["properties"]["tuning"]["default"]["workers"] == 1
    assert schema["properties"]["dedup"]["default"]["seed"] == 42
    # The deployment's own parameters make it a collection run.
    assert nightly["parameters"]["collection"] == {"enabled": True}
    assert nightly["enforce_parameter_schema"] is True
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert [s["active"] for s in nightly["schedules"]] == [False]

    create = f"{api}/deployments/{nightly['id']}/create_flow_run"
    status, body = _request("POST", create, {"parameters": {"dedup": {"threshold": {"eps": 0.05, "target_keep": 0.8}}}})
    assert status == 409, (status, body)
    assert "threshold" in json.dumps(body), body
    runs = _post(f"{api}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}}})
    assert runs == []  # nothing was created

    # Either one alone is accepted (the refusal is about the pair, not the fields).
    for threshold in ({"target_keep": 0.8}, {"eps": 0.1}):
        status, body = _request("POST", create, {"parameters": {"dedup": {"threshold": threshold}}, "state": {"type": "CANCELLED"}})
        assert status == 201, (status, body)
        assert body["parameters"]["dedup"] == {"threshold": threshold}
        assert _request("DELETE", f"{api}/flow_runs/{body['id']}")[0] == 204


def _wait_for(predicate, what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()) is not None:
            return value
        time.sleep(1)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def _generations(collection: Path) -> list[dict] | None:
    path = collection / "collection.json"
    return json.loads(path.read_text())["generations"] if path.exists() else None


@pytest.mark.e2e
def test_scheduled_runs_add_generations_to_the_collection(server, tmp_path):
    api, env, nightly = server["api"], server["env"], server["nightly"]
    source = make_demo_embeddings(tmp_path / "source", n_base=600, n_planted=150, dim=32, topics=8, shards=2)
    first, later = source.shards
    incoming, collection = tmp_path / "incoming", tmp_path / "collection"
    incoming.mkdir()
    os.replace(first, incoming / first.name)

    # What a user edits in the UI: the two paths; the yaml's collection setting stays.
    parameters = {**nightly["parameters"], "input": {"urls": [str(incoming / "*.parquet")]}, "storage": {"output": str(collection)}}
    assert _request("PATCH", f"{api}/deployments/{nightly['id']}", {"parameters": parameters})[0] == 204
    status, created = _request("POST", f"{api}/deployments/{nightly['id']}/schedules", [{"schedule": {"interval": 5}, "active": True}])
    assert status == 201, created

    worker = subprocess.Popen([server["prefect"], "worker", "start", "--pool", "semdedup"], env=env, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = _wait_for(lambda: _generations(collection), "the base generation")
        assert [g["kind"] for g in base] == ["base"]
        base_kept = {r["id"] for r in pq.read_table(collection / base[0]["run"] / "result" / "kept.parquet").to_pylist()}
        # A scheduled run after the base, with nothing new yet, succeeds and adds nothing.
        _wait_for(lambda: True if len(_completed(api, nightly["id"])) >= 2 else None, "a run after the base")
        assert len(_generations(collection)) == 1

        os.replace(later, incoming / later.name)  # atomic: a run sees the whole shard or none of it
        generations = _wait_for(lambda: g if (g := _generations(collection)) and len(g) >= 2 else None, "the second generation")
    finally:
        for schedule in created:
            _request("PATCH", f"{api}/deployments/{nightly['id']}/schedules/{schedule['id']}", {"active": False})
        _stop(worker)

    assert [g["kind"] for g in generations] == ["base", "generation"]
    assert [Path(url).name for url in generations[0]["inputs"]] == [first.name]
    assert [Path(url).name for url in generations[1]["inputs"]] == [later.name]  # only the new shard

    # The generation decided every new item exactly once, and no earlier one.
    new_ids = pq.read_table(incoming / later.name, columns=["id"]).column("id").to_pylist()
    g1 = {kind: pq.read_table(collection / generations[1]["run"] / "result" / f"{kind}.parquet").to_pylist() for kind in ("kept", "removed", "failed")}
    decided = [r["id"] for rows in g1.values() for r in rows]
    assert sorted(decided) == sorted(new_ids)
    assert (generations[1]["n_kept"], generations[1]["n_removed"], generations[1]["n_failed"]) == tuple(len(g1[k]) for k in ("kept", "removed", "failed"))
    # New items were judged against the earlier kept items: some duplicate one of them.
    assert {r["kept_id"] for r in g1["removed"]} & base_kept
    # Earlier decisions stand: the base's kept items are still kept.
    assert {r["id"] for r in pq.read_table(collection / generations[0]["run"] / "result" / "kept.parquet").to_pylist()} == base_kept

    runs = _post(f"{api}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}}, "limit": 200})
    started = sorted((r for r in runs if r["start_time"] is not None), key=lambda r: datetime.fromisoformat(r["start_time"]))
    assert len(started) >= 3 and all(r["auto_scheduled"] for r in started)
    # Every run that started has succeeded (or is the one still going when the worker stopped).
    assert [r["state"]["type"] for r in started[:-1]] == ["COMPLETED"] * (len(started) - 1)
    # The deployment's concurrency limit: a run starts only after the previous one ended.
    when = datetime.fromisoformat
    assert all(when(a["end_time"]) <= when(b["start_time"]) for a, b in zip(started, started[1:]))


def _completed(api: str, deployment_id: str) -> list[dict]:
    return _post(f"{api}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["COMPLETED"]}}}})
