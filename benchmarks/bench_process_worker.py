"""The same run from the CLI and from a deployment on a Prefect process worker: stage times.

Issue 11 reported the dedup stage 5-10x slower under a process worker than from the CLI.
This starts a real ``prefect server``, a process work pool and worker, deploys
``infra/prefect.yaml`` from ``--repo``, generates one embeddings dataset, and runs it twice
against that server, one after the other, into separate outputs:

(a) ``cli``     ``semdedup run DATA --output A --workers W --buckets B --eps E``
(b) ``worker``  ``prefect deployment run semdedup/semdedup --param config=...`` (same config)

It prints each run's stage seconds (summary.json) and the ratio worker / cli per stage,
and checks that both kept the same ids. ``--repo`` may point at another checkout (e.g. an
older commit in a git worktree) to measure the same thing before a change; both use this
interpreter's environment.

    .venv/bin/python benchmarks/bench_process_worker.py --n 300000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
import pyarrow.parquet as pq
from _common import machine_info, write_json

from semdedup_core.demo import make_demo_embeddings

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(api: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("prefect server did not become healthy")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _post(url: str, body: dict) -> list:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.load(r)


def _dedup_task_times(api: str, output: str) -> dict:
    """How long the run's dedup-bucket task runs were shown Running (what the UI displays)."""
    flow_runs = [f for f in _post(f"{api}/flow_runs/filter", {}) if (f["parameters"].get("config") or {}).get("output") == output]
    tasks = _post(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [f["id"] for f in flow_runs]}}, "limit": 200})
    running = sorted(t["total_run_time"] for t in tasks if t["name"].startswith("dedup-bucket"))
    return {"n": len(running), "running_s_sum": round(sum(running), 1), "running_s_max": round(max(running, default=0.0), 1)}


def _kept(output: Path) -> set[str]:
    return set(pq.read_table(output / "result" / "kept.parquet").column("id").to_pylist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300_000, help="items (default 300,000; 20 %% planted near-copies)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--buckets", type=int, default=16, help="dedup tasks (default 16: more tasks than workers)")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout whose code runs (default: this one)")
    p.add_argument("--workdir", type=Path, help="data and outputs (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="semdedup-worker-bench-"))
    data = work / "data"
    if not data.exists():
        n_planted = args.n // 5
        make_demo_embeddings(data, n_base=args.n - n_planted, n_planted=n_planted, dim=args.dim, topics=max(40, args.n // 1000), shards=args.shards)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tempfile.mkdtemp(prefix="prefect-home-", dir=work)  # a fresh server database per invocation
    env = dict(os.environ, PREFECT_HOME=home, PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(args.repo))
    prefect = str(BIN / "prefect")
    run = lambda *a, **kw: subprocess.run(list(a), env=env, cwd=args.repo, capture_output=True, text=True, **kw)  # noqa: E731
    server = subprocess.Popen([prefect, "server", "start", "--port", str(port)], env=env, cwd=args.repo, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    results: dict[str, dict] = {}
    try:
        _wait_healthy(api, server)
        assert run(prefect, "work-pool", "create", "semdedup", "--type", "process").returncode == 0
        deployed = run(prefect, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "semdedup"], env=env, cwd=args.repo, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        inputs = [str(data / "embeddings-*.parquet")]
        for how in ("cli", "worker"):
            output = work / f"run-{how}"
            started = time.perf_counter()
            if how == "cli":
                done = run(str(BIN / "semdedup"), "run", *inputs, "--output", str(output), "--eps", str(args.eps), "--workers", str(args.workers),
                           "--buckets", str(args.buckets), "--fresh")
            else:
                config = {"input": inputs, "output": str(output), "eps": args.eps, "workers": args.workers, "buckets": args.buckets, "on_existing": "fresh"}
                done = run(prefect, "deployment", "run", "semdedup/semdedup", "--param", f"config={json.dumps(config)}", "--watch")
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            summary = json.loads((output / "result" / "summary.json").read_text())
            results[how] = {"wall_s": round(time.perf_counter() - started, 1), "stage_seconds": summary["stage_seconds"], "n_kept": summary["n_kept"]}
        same = _kept(work / "run-cli") == _kept(work / "run-worker")
        for how in results:
            results[how]["dedup_tasks"] = _dedup_task_times(api, str(work / f"run-{how}"))
    finally:
        _stop(worker)
        _stop(server)

    stages = [s for s in results["cli"]["stage_seconds"] if s in results["worker"]["stage_seconds"]]
    print(f"{'stage':<10} {'cli s':>8} {'worker s':>9} {'worker/cli':>10}")
    for s in stages:
        a, b = results["cli"]["stage_seconds"][s], results["worker"]["stage_seconds"][s]
        print(f"{s:<10} {a:>8.1f} {b:>9.1f} {b / a if a else float('nan'):>10.2f}")
    for how, r in results.items():
        d = r["dedup_tasks"]
        print(f"{how}: {d['n']} dedup-bucket task runs, shown Running {d['running_s_sum']} s in all (longest {d['running_s_max']} s) "
              f"for a dedup stage of {r['stage_seconds'].get('dedup', 0):.1f} s wall")
    print(f"wall: cli {results['cli']['wall_s']} s, worker {results['worker']['wall_s']} s; same kept ids: {same}")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "results": results, "same_kept": same})
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
