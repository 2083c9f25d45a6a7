"""The flow on other task runners with real engines: Dask worker processes (also losing one in
the middle of the dedup stage), a local Ray instance, and the CLI's ``--task-runner``; plus the
one rule every executor relies on, run_step's completion marker (docs/architecture.md
§"Executors")."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semdedup_core.config import RunConfig

from .conftest import RunResults, unit_rows, write_embeddings
from .test_cli import cli, make_data
from .test_cli_errors import one_error_line

DIM = 16
# Enough buckets that the dedup stage spans many units, so a worker can be lost half-way.
CLUSTERS, BUCKETS = 24, 12


# ---------------------------------------------------------------- data and runs


def make_precomputed(folder: Path) -> dict:
    """~1.2k unit vectors in 3 shards with planted near copies and two broken rows (NaN, zero)."""
    rng = np.random.default_rng(11)
    base = unit_rows(rng, 1000, DIM)
    near = base[:200] + 0.02 * rng.standard_normal((200, DIM)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    vectors = np.concatenate([base, near, np.zeros((2, DIM), np.float32)])
    vectors[-2, 5] = np.nan
    ids = [f"v{i:05d}" for i in range(len(vectors))]
    order = rng.permutation(len(vectors))
    for s, part in enumerate(np.array_split(order, 3)):
        write_embeddings(folder / f"part-{s}.parquet", [ids[i] for i in part], vectors[part])
    return {"glob": str(folder / "part-*.parquet"), "ids": ids, "broken": {ids[-2], ids[-1]}}


def precomputed_config(data: dict, out: Path) -> RunConfig:
    # target_keep with tuning='exact': the tune, threshold and apply units run as well.
    return RunConfig(
        input=[data["glob"]], output=str(out), clusters=CLUSTERS, buckets=BUCKETS, target_keep=0.8, tuning="exact", seed=5, workers=2
    )


def make_jsonl(folder: Path) -> dict:
    """Two jsonl shards: near and exact copies (up to case and spacing), an empty text."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for s in range(2):
        lines = []
        for i in range(25):
            doc_id = f"s{s}-d{i}"
            lines.append(json.dumps({"id": doc_id, "text": f"w{i} w{(i * 7) % 60} w{(i + s) % 60} a b c"}))
            ids.append(doc_id)
        lines.append(json.dumps({"id": f"s{s}-copy", "text": f"  W3 w21 w{3 + s}  A b c"}))
        lines.append(json.dumps({"id": f"s{s}-empty", "text": "  "}))
        ids += [f"s{s}-copy", f"s{s}-empty"]
        (folder / f"docs-{s}.jsonl").write_text("\n".join(lines) + "\n")
    return {"glob": str(folder / "docs-*.jsonl"), "ids": ids}


def jsonl_config(data: dict, model: Path, out: Path) -> RunConfig:
    return RunConfig(
        input=[data["glob"]], output=str(out), model=str(model), clusters=3, buckets=3, eps=0.02, decode_workers=0, write_dataset=True, workers=2
    )


def run_flow(cfg: RunConfig, task_runner=None):
    """The flow, on the default thread runner or ``task_runner``; its final state."""
    from flows.dedup_flow import semdedup_flow

    flow = semdedup_flow if task_runner is None else semdedup_flow.with_options(task_runner=task_runner)
    state = flow(config=cfg, return_state=True)
    assert state.is_completed(), state
    return state


def task_runs(state) -> list:
    """The Prefect task runs of a flow run, read back from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))


def unit_runs(state) -> list:
    """Task runs of the DAG's units (the plan is validated in the flow's own process)."""
    from tasks.stages import TASKS

    runs = [r for r in task_runs(state) if not r.name.startswith("plan-run")]
    assert runs and all(any(r.name.startswith(name) for name in TASKS) for r in runs), [r.name for r in runs]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs if not r.state.is_completed()]
    return runs


def every_id_once(results: RunResults, ids: list[str]) -> None:
    """kept + removed + failed are the input ids, each once (exact copies are removed before
    scoring, so RunResults.check_accounting's rule for scores does not apply to raw input)."""
    everything = [r["id"] for r in results.kept + results.removed + results.failed]
    assert sorted(everything) == sorted(ids)


def written_dataset(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "dataset").glob("*"))}


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory) -> dict:
    return make_precomputed(tmp_path_factory.mktemp("exec-emb"))


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> dict:
    return make_jsonl(tmp_path_factory.mktemp("exec-jsonl"))


@pytest.fixture(scope="module")
def reference_precomputed(prefect_harness, precomputed, tmp_path_factory) -> RunResults:
    out = tmp_path_factory.mktemp("exec-ref") / "run"
    run_flow(precomputed_config(precomputed, out))
    results = RunResults(out)
    results.check_accounting(precomputed["ids"])
    assert {r["id"] for r in results.failed} == precomputed["broken"]
    assert results.summary["tuning"] == "exact" and results.n_score_files == BUCKETS
    return results


@pytest.fixture(scope="module")
def dask_cluster():
    """Two single-threaded Dask worker processes (each behind a nanny that restarts it), and
    a client of the test's own to inspect them."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        yield cluster, client


def executed_on_workers(client) -> int:
    """Tasks the cluster's workers have executed so far (the workers' own counters)."""
    return sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())


# ---------------------------------------------------------------- 1. Dask worker processes: the same decisions


def test_dask_worker_processes_decide_bit_for_bit_as_the_thread_runner(dask_cluster, reference_precomputed, precomputed, tmp_path):
    from prefect_dask import DaskTaskRunner

    cluster, client = dask_cluster
    before = executed_on_workers(client)
    out = tmp_path / "run"
    state = run_flow(precomputed_config(precomputed, out), DaskTaskRunner(address=cluster.scheduler_address))
    results = RunResults(out)
    results.check_accounting(precomputed["ids"])
    assert results.decisions() == reference_precomputed.decisions()
    assert results.summary["eps"] == reference_precomputed.summary["eps"]
    # Every unit ran as a Prefect task executed by a worker process, none in this process.
    assert executed_on_workers(client) - before == len(unit_runs(state))


def test_dask_embeds_text_and_writes_the_dataset_as_the_thread_runner(dask_cluster, prefect_harness, jsonl, tiny_bert, tmp_path):
    from prefect_dask import DaskTaskRunner

    cluster, client = dask_cluster
    reference_out, out = tmp_path / "threads", tmp_path / "dask"
    run_flow(jsonl_config(jsonl, tiny_bert, reference_out))
    before = executed_on_workers(client)
    state = run_flow(jsonl_config(jsonl, tiny_bert, out), DaskTaskRunner(address=cluster.scheduler_address))
    reference, results = RunResults(reference_out), RunResults(out)
    every_id_once(results, jsonl["ids"])
    assert results.decisions() == reference.decisions()
    assert results.summary["n_exact"] == reference.summary["n_exact"] >= 1
    assert set(results.decisions()["failed"]) == {"s0-empty", "s1-empty"}
    assert written_dataset(out) == written_dataset(reference_out) and len(written_dataset(out)) == 2
    names = [r.name for r in unit_runs(state)]
    assert {"embed-shard-0", "embed-shard-1", "write-shard-0", "write-shard-1"} <= set(names)
    assert executed_on_workers(client) - before == len(names)


# ---------------------------------------------------------------- 2. a worker lost in the middle of the dedup stage


def test_a_dask_worker_killed_mid_dedup_is_replaced_and_the_run_decides_the_same(dask_cluster, reference_precomputed, precomputed, tmp_path):
    from prefect_dask import DaskTaskRunner

    cluster, client = dask_cluster
    out = tmp_path / "run"
    killed: dict = {}
    run_over = threading.Event()

    def kill_a_busy_worker_at_the_first_dedup_marker() -> None:
        while not run_over.is_set():
            markers = sorted(p.name for p in (out / "scores").glob("bucket-*.json"))
            if not markers:
                time.sleep(0.01)
                continue
            busy = [addr for addr, keys in client.processing().items() if keys]
            pids = client.run(os.getpid)
            victim = busy[0] if busy else next(iter(pids))
            os.kill(pids[victim], signal.SIGKILL)
            killed.update(pid=pids[victim], markers_then=markers)
            return

    watcher = threading.Thread(target=kill_a_busy_worker_at_the_first_dedup_marker, daemon=True)
    watcher.start()
    try:
        run_flow(precomputed_config(precomputed, out), DaskTaskRunner(address=cluster.scheduler_address))
    finally:
        run_over.set()
        watcher.join()
    assert "pid" in killed, "the run ended before a dedup marker was seen"
    # The kill came half-way through the dedup stage: some buckets were still unscored.
    assert 1 <= len(killed["markers_then"]) < BUCKETS, killed
    results = RunResults(out)
    results.check_accounting(precomputed["ids"])
    assert results.decisions() == reference_precomputed.decisions()
    # The nanny replaced the killed process; the cluster is whole again for later tests.
    client.wait_for_workers(2, timeout=120)
    assert killed["pid"] not in client.run(os.getpid).values()


# ---------------------------------------------------------------- 3. a local Ray instance


def test_ray_decides_bit_for_bit_as_the_thread_runner(reference_precomputed, precomputed, tmp_path, monkeypatch):
    from prefect_ray import RayTaskRunner

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's token auth, with the token in the environment rather than a new ~/.ray/auth_token.
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    # A short folder of our own for Ray's sockets and logs (not ~/.ray or /tmp/ray).
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-"))
    try:
        out = tmp_path / "run"
        runner = RayTaskRunner(init_kwargs={"num_cpus": 2, "include_dashboard": False, "_temp_dir": str(ray_dir), "log_to_driver": False})
        state = run_flow(precomputed_config(precomputed, out), runner)
        import ray

        assert not ray.is_initialized()  # the runner started Ray, so it shut it down
        results = RunResults(out)
        results.check_accounting(precomputed["ids"])
        assert results.decisions() == reference_precomputed.decisions()
        # Each unit's own log line was written by a Ray worker process, into its log file.
        worker_logs = "".join(p.read_text(errors="replace") for p in ray_dir.glob("session_*/logs/worker-*"))
        runs = unit_runs(state)
        missing = [r.name for r in runs if f"Task run '{r.name}'" not in worker_logs]
        assert not missing, missing
    finally:
        import shutil

        shutil.rmtree(ray_dir, ignore_errors=True)


# ---------------------------------------------------------------- 4. the CLI


def test_cli_on_a_local_dask_cluster_keeps_what_the_thread_runner_keeps(tmp_path, monkeypatch):
    glob, n = make_data(tmp_path / "data")
    kept = {}
    for runner in ("threads", "dask"):
        out, logs = tmp_path / runner, tmp_path / f"logs-{runner}"
        monkeypatch.setenv("SEMDEDUP_LOG_DIR", str(logs))
        proc = cli(["run", glob, "--output", str(out), "--eps", "0.05", "--buckets", "4", "--task-runner", runner, "--workers", "2"], tmp_path)
        assert proc.returncode == 0, (runner, proc.stdout, proc.stderr[-3000:])
        assert proc.stderr == "", proc.stderr
        results = RunResults(out)
        assert results.summary["n_input"] == n
        kept[runner] = results.decisions()["kept"]
        # Every log line and event of the run reached the API server before it stopped.
        (log,) = logs.glob("semdedup-*.log")
        assert "Error logging to API" not in log.read_text(errors="replace")
    assert kept["dask"] == kept["threads"] and 0 < len(kept["threads"]) < n


def test_cli_address_without_a_cluster_runner_is_refused_in_one_line(tmp_path):
    glob, _ = make_data(tmp_path / "data")
    out = tmp_path / "run"
    proc = cli(["run", glob, "--output", str(out), "--address", "tcp://127.0.0.1:8786"], tmp_path)
    one_error_line(proc, 2, "--address", "--task-runner dask or ray")
    assert not out.exists()


# ---------------------------------------------------------------- 5. one DAG, one marker rule


def test_every_step_of_the_dag_has_its_prefect_task():
    from semdedup_core.run.dag import STEPS
    from tasks.stages import TASKS

    assert [s.name for s in STEPS] == list(TASKS)
    assert len({s.name for s in STEPS}) == len(STEPS)


class Crash(Exception):
    """A unit's process dying after its artifacts were written, before its marker."""


@pytest.fixture(scope="module")
def scan_plan(tmp_path_factory, tiny_bert):
    """A planned raw-text run (nothing computed): the SCAN step's input."""
    from semdedup_core.run.plan import plan_run

    folder = tmp_path_factory.mktemp("marker-data")
    lines = [json.dumps({"id": f"d{i}", "text": f"w{i} a b"}) for i in range(6)] + [json.dumps({"id": "bad", "text": ""})]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = RunConfig(input=[str(folder / "docs.jsonl")], output=str(folder / "unused"), model=str(tiny_bert), clusters=1, decode_workers=0)
    return plan_run(cfg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.sampled_from(["compute", "crash", "rerun"]), min_size=1, max_size=6))
def test_run_step_computes_a_unit_until_its_marker_exists_and_never_after(scan_plan, actions):
    from semdedup_core.run.dag import SCAN, run_step

    computed: list[int] = []

    def scan_counted(plan, unit):
        computed.append(unit)
        return SCAN.compute(plan, unit)

    def scan_then_crash(plan, unit):
        scan_counted(plan, unit)
        raise Crash

    counted, crashing = dataclasses.replace(SCAN, compute=scan_counted), dataclasses.replace(SCAN, compute=scan_then_crash)
    with tempfile.TemporaryDirectory() as folder:
        reference_plan = scan_plan.model_copy(update={"config": scan_plan.config.model_copy(update={"output": f"{folder}/reference"})})
        reference = run_step(SCAN, reference_plan, 0)
        plan = scan_plan.model_copy(update={"config": scan_plan.config.model_copy(update={"output": f"{folder}/run"})})
        artifact, marker = Path(plan.layout.scan(0)), Path(plan.layout.scan_done(0))
        result, finished_at = None, None
        for action in [*actions, "rerun"]:  # the last re-run finishes the unit whatever came before
            had_marker, n_computed = marker.exists(), len(computed)
            try:
                result = run_step(crashing if action == "crash" else counted, plan, 0)
            except Crash:
                assert not had_marker and not marker.exists() and artifact.exists()
                continue
            if had_marker:  # finished before: the stored result, nothing recomputed or rewritten
                assert len(computed) == n_computed
                assert (artifact.stat().st_mtime_ns, marker.stat().st_mtime_ns) == finished_at
            else:
                assert computed[n_computed:] == [0]
                finished_at = (artifact.stat().st_mtime_ns, marker.stat().st_mtime_ns)
            assert result == reference
        assert marker.exists() and result == reference
        assert artifact.read_bytes() == Path(reference_plan.layout.scan(0)).read_bytes()
        assert json.loads(marker.read_text()) == json.loads(Path(reference_plan.layout.scan_done(0)).read_text())
        assert computed.count(0) == 1 + sum(1 for i, a in enumerate(actions) if a == "crash" and "compute" not in actions[:i] and "rerun" not in actions[:i])
