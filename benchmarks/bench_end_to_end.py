"""End to end on precomputed embeddings (default 1,000,000 x 512, k=1000, eps=0.05). Goal: <= 90 s on 2 cores.

Runs over the same cached input, each in a fresh Python subprocess, each into its own output
folder (removed first, so nothing is resumed):

(a) ``flow``    the Prefect flow ``flows.dedup_flow.semdedup_flow`` on ephemeral Prefect, with the
                CLI's Prefect environment defaults (flows.cli._prepare_environment); wall time of
                the call (Prefect's start-up included, imports not).
(b) ``direct``  ``semdedup_core.run.dag.run_pipeline(cfg)``: the same DAG in this process, no
                Prefect (thread counts set per unit by run_step, by the flow's rule).
(c) ``cli``     with --cli: what ``semdedup run`` does after parsing: flows.cli.execute (its own
                plan before the flow, Prefect's server started meanwhile), everything imported
                when the CLI would import it; compare its process wall with (b)'s.

Reports the wall times, Prefect's overhead share = (flow wall - direct wall) / flow wall (and by
process wall, imports included), the peak RSS of each run's process (VmHWM; for the flow also
Prefect's ephemeral API server subprocess), and checks that every run keeps exactly the same ids
and removes the same (id, dup_of) rows (exit code 1 if not).

Where the flow's extra time goes: each run's timeline, in seconds since its process started:
imports, start-up (the call to the first stage: the ephemeral API server's start, the flow run's
creation), the stages (run_dag's StageClock, marked), and after the last stage; at each mark the
CPU seconds of the process and of its child processes (the API server), and at the end the CPU
seconds of the process's live threads by name.

The input (seeded parquet shards: ``id`` string + ``embedding`` list<float32>, clustered data with
lognormal topic sizes, 5 % planted near-copies, 0.5 % exact copies) is generated once into --data
and reused when its parameters match; generating it is not timed.

    .venv/bin/python benchmarks/bench_end_to_end.py --n 200000 --clusters 200 --json /tmp/e2e.json
    .venv/bin/python benchmarks/bench_end_to_end.py --data /tmp/semdedup-1m --cli --json /tmp/e2e-1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import child_pids, emit_result, gib, machine_info, maxrss_bytes, print_table, proc_status_bytes, run_tagged_child, versions, write_json

GOAL_SECONDS = 90.0
RESULT_TAG = "BENCH_E2E_RESULT "


STAGES = ("plan", "fit", "assign", "collect", "tune", "dedup", "finalize")


def stage_order(name: str) -> tuple[int, str]:
    return (STAGES.index(name) if name in STAGES else len(STAGES), name)


def _emit(result: dict) -> None:
    emit_result(RESULT_TAG, result)


def data_params(args) -> dict:
    return {
        "n": args.n,
        "dim": args.dim,
        "shards": args.shards,
        "seed": args.seed,
        "topics": args.topics or args.clusters,
        "planted": 0.05,
        "exact": 0.005,
        "format": "id:string, embedding:list<float32>",
        "generator": "benchmarks/_common.py synth_embeddings v1",
    }


def data_dir(args) -> Path:
    if args.data:
        return Path(args.data)
    return Path(tempfile.gettempdir()) / f"semdedup-bench-e2e-data-{args.n}x{args.dim}-{args.shards}shards-seed{args.seed}"


# ---------------------------------------------------------------- subprocesses


def child_generate(args) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from _common import synth_embeddings

    params = data_params(args)
    folder = data_dir(args)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    y = synth_embeddings(args.n, args.dim, args.seed, topics=params["topics"], planted=params["planted"], exact=params["exact"])
    bounds = np.linspace(0, args.n, args.shards + 1).astype(int)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = pa.array([f"item-{i:08d}" for i in range(lo, hi)], pa.string())
        offsets = pa.array(np.arange(0, (hi - lo + 1) * args.dim, args.dim, dtype=np.int32))
        emb = pa.ListArray.from_arrays(offsets, pa.array(y[lo:hi].reshape(-1)))
        pq.write_table(pa.table({"id": ids, "embedding": emb}), folder / f"embeddings-{s:04d}.parquet")
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    _emit({"seconds": time.perf_counter() - start, "folder": str(folder)})


def _config(args, output: Path):
    from semdedup_core.config import RunConfig

    return RunConfig(
        input=[str(data_dir(args) / "embeddings-*.parquet")],
        output=str(output),
        clusters=args.clusters,
        eps=args.eps,
        tile_size=args.tile_size,
        device="cpu",
        seed=args.seed,
    )


def _peaks_and_children() -> dict:
    children = {}
    for pid in child_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        children[str(pid)] = {"cmdline": cmd[:200], "peak_rss": proc_status_bytes("VmHWM", pid)}
    return {"peak_rss": proc_status_bytes("VmHWM"), "ru_maxrss": maxrss_bytes(), "children": children}


class Timeline:
    """Wall-clock marks of one run and, at each, the CPU seconds of this process and of its
    child processes (Prefect's ephemeral API server): where the flow's extra time goes."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self.process_start = self._me.create_time()
        self.marks: list[dict] = []

    def cpu(self) -> tuple[float, float]:
        import psutil

        own = self._me.cpu_times()
        children = 0.0
        for child in self._me.children(recursive=True):
            try:
                t = child.cpu_times()
            except psutil.Error:  # exited meanwhile
                continue
            children += t.user + t.system
        return own.user + own.system, children

    @staticmethod
    def thread_cpu() -> dict[str, float]:
        """CPU seconds of this process's live threads by Python thread name; threads Python
        does not know (OpenMP and BLAS workers, Prefect's finished threads are gone) as one."""
        import threading

        names = {t.native_id: t.name for t in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = names.get(int(tid), "native threads (OpenMP, BLAS, ...)")
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    def mark(self, name: str) -> None:
        own, children = self.cpu()
        self.marks.append({"mark": name, "t": time.time() - self.process_start, "own_cpu": own, "children_cpu": children})

    def stage_clock(self):
        """run_dag's StageClock, also marking each stage's start and end on this timeline."""
        from contextlib import contextmanager

        from semdedup_core.run.plan import StageClock

        timeline = self

        class MarkedStageClock(StageClock):
            @contextmanager
            def stage(self, name: str):
                timeline.mark(f"{name} start")
                with super().stage(name):
                    yield
                timeline.mark(f"{name} end")

        return MarkedStageClock


def _mark_stages(timeline: Timeline) -> None:
    """run_dag's stages marked on the timeline. Must precede the first import of
    semdedup_core.run.dag (it takes StageClock from plan at import), so that each run imports
    torch and the rest when it would anyway."""
    from semdedup_core.run import plan

    assert "semdedup_core.run.dag" not in sys.modules
    plan.StageClock = timeline.stage_clock()


def _timed_run(run, cfg, timeline: Timeline) -> tuple[dict, dict]:
    """``run(cfg)`` on the timeline: (summary, timeline facts)."""
    timeline.mark("call")
    summary = run(cfg)
    timeline.mark("returned")
    return summary, {"process_start": timeline.process_start, "marks": timeline.marks, "thread_cpu": timeline.thread_cpu()}


def child_flow(args, output: Path) -> None:
    from flows.cli import _prepare_environment

    _prepare_environment(verbose=False)  # the CLI's Prefect defaults (users can override them)
    if args.prefect_home:
        os.environ["PREFECT_HOME"] = args.prefect_home
    timeline = Timeline()
    _mark_stages(timeline)
    t_import = time.perf_counter()
    from flows.dedup_flow import semdedup_flow
    from semdedup_core.storage import read_json

    import_seconds = time.perf_counter() - t_import
    shutil.rmtree(output, ignore_errors=True)
    cfg = _config(args, output)
    start = time.perf_counter()
    summary, timeline = _timed_run(lambda c: semdedup_flow(config=c), cfg, timeline)
    wall = time.perf_counter() - start
    stages = dict(read_json(str(output / "result" / "summary.json"))["stage_seconds"])
    try:
        recorded = read_json(str(output / "run.json")).get("stages", {})
        if "finalize" not in stages and "finalize" in recorded:
            stages["finalize"] = recorded["finalize"]["seconds"]
    except (OSError, KeyError, TypeError):
        pass
    _emit(
        {
            "run": "flow",
            "wall": wall,
            "import_seconds": import_seconds,
            "stage_seconds": stages,
            "timeline": timeline,
            "prefect_env": {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")},
            "n_kept": summary.n_kept,
            "n_removed": summary.n_removed,
            "n_failed": summary.n_failed,
            "clusters": summary.clusters,
            "buckets": summary.buckets,
            **_peaks_and_children(),
        }
    )


def child_direct(args, output: Path) -> None:
    """The same DAG without Prefect: semdedup_core.run.dag.run_pipeline (thread counts set per
    unit by run_step, by the same rule as the flow's tasks)."""
    timeline = Timeline()
    _mark_stages(timeline)
    t_import = time.perf_counter()
    from semdedup_core.run.dag import run_pipeline

    import_seconds = time.perf_counter() - t_import
    shutil.rmtree(output, ignore_errors=True)
    cfg = _config(args, output)
    start = time.perf_counter()
    summary, timeline = _timed_run(run_pipeline, cfg, timeline)
    wall = time.perf_counter() - start
    _emit(
        {
            "run": "direct",
            "wall": wall,
            "import_seconds": import_seconds,
            "stage_seconds": summary.stage_seconds | {"finalize": json.loads((output / "run.json").read_text())["stages"]["finalize"]["seconds"]},
            "timeline": timeline,
            "n_kept": summary.n_kept,
            "n_removed": summary.n_removed,
            "n_failed": summary.n_failed,
            "clusters": summary.clusters,
            "buckets": summary.buckets,
            **_peaks_and_children(),
        }
    )


def child_cli(args, output: Path) -> None:
    """What ``semdedup run`` does after parsing its options: flows.cli.execute (its finished-run
    check and plan, then the flow), everything imported when the CLI imports it."""
    os.environ["SEMDEDUP_LOG_DIR"] = str(output.parent / "cli-logs")
    if args.prefect_home:
        os.environ["PREFECT_HOME"] = args.prefect_home
    timeline = Timeline()
    _mark_stages(timeline)
    t_import = time.perf_counter()
    from flows.cli import RunLog, execute

    import_seconds = time.perf_counter() - t_import
    shutil.rmtree(output, ignore_errors=True)
    cfg = _config(args, output)
    start = time.perf_counter()
    summary, timeline = _timed_run(lambda c: execute(c, RunLog()), cfg, timeline)
    wall = time.perf_counter() - start
    _emit(
        {
            "run": "cli",
            "wall": wall,
            "import_seconds": import_seconds,
            "stage_seconds": summary.stage_seconds | {"finalize": json.loads((output / "run.json").read_text())["stages"]["finalize"]["seconds"]},
            "timeline": timeline,
            "n_kept": summary.n_kept,
            "n_removed": summary.n_removed,
            "n_failed": summary.n_failed,
            "clusters": summary.clusters,
            "buckets": summary.buckets,
            **_peaks_and_children(),
        }
    )


# ---------------------------------------------------------------- orchestration


def _child_cmd(args, role: str, output: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", role]
    for flag, value in (
        ("--n", args.n),
        ("--dim", args.dim),
        ("--clusters", args.clusters),
        ("--shards", args.shards),
        ("--eps", args.eps),
        ("--tile-size", args.tile_size),
        ("--seed", args.seed),
        ("--data", str(data_dir(args))),
    ):
        cmd += [flag, str(value)]
    if args.topics:
        cmd += ["--topics", str(args.topics)]
    if args.prefect_home:
        cmd += ["--prefect-home", args.prefect_home]
    if output is not None:
        cmd += ["--_output", str(output)]
    return cmd


def run_child(args, role: str, output: Path | None = None) -> dict:
    result, wall, foreign = run_tagged_child(_child_cmd(args, role, output), role, RESULT_TAG)
    result["process_wall"] = wall
    result["foreign_cores"] = foreign
    return result


def ensure_data(args) -> dict:
    folder = data_dir(args)
    params_file = folder / "params.json"
    if params_file.exists() and json.loads(params_file.read_text()) == data_params(args):
        print(f"  [data] reusing {folder}", file=sys.stderr)
        return {"folder": str(folder), "generated": False}
    print(f"  [data] generating {args.n} x {args.dim} into {folder} (not timed)", file=sys.stderr, flush=True)
    result = run_child(args, "generate")
    return {"folder": str(folder), "generated": True, "seconds": result["seconds"]}


def kept_ids(output: Path):
    import pyarrow.parquet as pq

    return pq.read_table(output / "result" / "kept.parquet", columns=["id"]).column(0).to_pylist()


def removed_rows(output: Path):
    import pyarrow.parquet as pq

    t = pq.read_table(output / "result" / "removed.parquet", columns=["id", "dup_of"])
    return sorted(zip(t.column("id").to_pylist(), t.column("dup_of").to_pylist()))


def timeline_breakdown(result: dict) -> dict:
    """Seconds since the process started: start-up (to the first stage, the plan), the stages,
    after the last stage; with the CPU seconds this process and its children (Prefect's API
    server) spent in each part, and per stage."""
    marks = {m["mark"]: m for m in result["timeline"]["marks"]}
    order = result["timeline"]["marks"]
    first = next(m for m in order if m["mark"].endswith(" start"))
    last = [m for m in order if m["mark"].endswith(" end")][-1]
    call, returned = marks["call"], marks["returned"]

    def part(a: dict, b: dict) -> dict:
        return {"wall": b["t"] - a["t"], "own_cpu": b["own_cpu"] - a["own_cpu"], "server_cpu": b["children_cpu"] - a["children_cpu"]}

    stages = {}
    for m in order:
        if m["mark"].endswith(" start"):
            name = m["mark"][: -len(" start")]
            stages[name] = part(m, marks[f"{name} end"])
    return {
        "imports_and_setup": {"wall": call["t"], "own_cpu": call["own_cpu"], "server_cpu": call["children_cpu"]},
        "startup": part(call, first),  # the call to the first stage: Prefect's server start, the flow run's creation
        "stages": part(first, last),
        "after": part(last, returned),  # the last stage's end to the call's return
        "per_stage": stages,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="items (default 1000000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--clusters", type=int, default=1000, help="k (default 1000)")
    p.add_argument("--shards", type=int, default=10, help="input parquet shards (default 10)")
    p.add_argument("--topics", type=int, default=None, help="topics in the synthetic data (default: = --clusters)")
    p.add_argument("--eps", type=float, default=0.05, help="eps (default 0.05)")
    p.add_argument("--tile-size", type=int, default=2048, help="kernel tile size (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="data and run seed (default 0)")
    p.add_argument("--data", help="cache folder for the generated input (default: a folder in the temp dir named after n, dim, shards, seed)")
    p.add_argument("--out", help="folder for the two run outputs (default: a temporary folder, removed at the end)")
    p.add_argument("--prefect-home", help="PREFECT_HOME for the flow run (default: the user's, as the CLI uses)")
    p.add_argument("--repeats", type=int, default=1, help="(flow, direct) pairs to run, alternating (default 1); medians reported")
    p.add_argument("--order", choices=["flow-first", "direct-first"], default="flow-first", help="which run goes first in each pair")
    p.add_argument("--cli", action="store_true", help="also (c): the CLI's execute (its own plan, then the flow), after the pair")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_child", choices=["generate", "flow", "direct", "cli"], help=argparse.SUPPRESS)
    p.add_argument("--_output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child == "generate":
        child_generate(args)
        return 0
    if args._child == "flow":
        child_flow(args, Path(args._output))
        return 0
    if args._child == "direct":
        child_direct(args, Path(args._output))
        return 0
    if args._child == "cli":
        child_cli(args, Path(args._output))
        return 0

    info = machine_info()
    print(f"# bench_end_to_end  {info['cpu_model']}, {info['cores']} cores, {info['mem_total_gib']} GiB, {info['date']}")
    payload: dict = {"machine": info, "versions": versions(), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    payload["data"] = ensure_data(args)
    tmp = None
    out = Path(args.out) if args.out else Path(tmp := tempfile.mkdtemp(prefix="semdedup-bench-e2e-"))
    order = ["flow", "direct"] if args.order == "flow-first" else ["direct", "flow"]
    order += ["cli"] if args.cli else []
    runs: dict[str, list[dict]] = {role: [] for role in order}
    identical = True
    try:
        for r in range(args.repeats):
            for role in order:
                res = run_child(args, role, out / role)
                runs[role].append(res)
                print(
                    f"  [{role}] repeat {r + 1}: {res['wall']:.1f} s, peak {gib(res['peak_rss'])} GiB, other processes' cores {res['foreign_cores']}",
                    file=sys.stderr,
                    flush=True,
                )
            kept_direct, removed_direct = sorted(kept_ids(out / "direct")), removed_rows(out / "direct")
            for role in order:
                kept = kept_ids(out / role)
                same = sorted(kept) == kept_direct and len(set(kept)) == len(kept) and removed_rows(out / role) == removed_direct
                identical = identical and same
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    payload["runs"] = runs
    med = {role: statistics.median(r["wall"] for r in rs) for role, rs in runs.items()}
    overhead = (med["flow"] - med["direct"]) / med["flow"]
    process = {role: statistics.median(r["process_wall"] for r in rs) for role, rs in runs.items()}
    payload["median_wall"] = med
    payload["median_process_wall"] = process
    payload["prefect_overhead_share"] = overhead
    payload["prefect_overhead_share_process"] = {role: (process[role] - process["direct"]) / process[role] for role in runs if role != "direct"}
    payload["identical_kept_and_removed"] = identical
    payload["goal_seconds"] = GOAL_SECONDS

    stage_names = sorted({name for rs in runs.values() for r in rs for name in r["stage_seconds"]}, key=stage_order)
    # Medians over the repeats; peak RSS and other-process cores: the maximum over the repeats.
    header = ["run", "items", "k", "shards", "buckets", "wall s", *[f"{s} s" for s in stage_names], "process wall s", "peak RSS GiB", "kept", "removed", "other-process cores"]
    rows = []
    labels = {"flow": "(a) Prefect flow", "direct": "(b) direct semdedup_core", "cli": "(c) CLI execute (plan, then the flow)"}
    for role in runs:
        last = runs[role][-1]
        peak = gib(max(r["peak_rss"] for r in runs[role]))
        servers = [c["peak_rss"] for r in runs[role] for c in r.get("children", {}).values() if c["peak_rss"]]
        if servers:
            peak += f" (+ Prefect server {gib(max(servers))})"
        rows.append(
            [
                labels[role],
                args.n,
                last["clusters"],
                args.shards,
                last["buckets"],
                f"{med[role]:.1f}",
                *[f"{statistics.median(r['stage_seconds'].get(s, float('nan')) for r in runs[role]):.1f}" for s in stage_names],
                f"{statistics.median(r['process_wall'] for r in runs[role]):.1f}",
                peak,
                last["n_kept"],
                last["n_removed"],
                max((r["foreign_cores"] or 0.0) for r in runs[role]),
            ]
        )
    print()
    print_table(header, rows)
    print()
    for role in runs:
        for i, r in enumerate(runs[role]):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["stage_seconds"].items(), key=lambda kv: stage_order(kv[0])))
            print(
                f"  {role} run {i + 1}: wall {r['wall']:.1f} s (stages: {stages}; outside the stages {r['wall'] - sum(r['stage_seconds'].values()):.1f}), "
                f"imports {r['import_seconds']:.1f} s, process {r['process_wall']:.1f} s, peak RSS {gib(r['peak_rss'])} GiB"
            )
    print()
    print("Timeline (s since the process started; CPU s of this process / of its child processes, i.e. Prefect's API server):")
    for role in runs:
        for i, r in enumerate(runs[role]):
            b = r["breakdown"] = timeline_breakdown(r)
            parts = ", ".join(
                f"{name} {b[name]['wall']:.1f} s (cpu {b[name]['own_cpu']:.1f} / {b[name]['server_cpu']:.1f})" for name in ("startup", "stages", "after")
            )
            print(f"  {role} run {i + 1}: imports {b['imports_and_setup']['wall']:.1f} s, call -> {parts}")
            print("    per stage: " + ", ".join(f"{k} {v['wall']:.1f} s (cpu {v['own_cpu']:.1f} / {v['server_cpu']:.1f})" for k, v in b["per_stage"].items()))
            threads = sorted(r["timeline"]["thread_cpu"].items(), key=lambda kv: -kv[1])
            print("    CPU s by thread: " + ", ".join(f"{k} {v:.1f}" for k, v in threads if v >= 0.05))
    print(f"Prefect overhead share (flow wall - direct wall) / flow wall = {overhead * 100:.1f} %")
    for role, share in payload["prefect_overhead_share_process"].items():
        print(f"  by process wall (imports and Python start-up included): ({role} - direct) / {role} = {share * 100:.1f} %")
    print(f"flow wall {med['flow']:.1f} s vs goal <= {GOAL_SECONDS:.0f} s: {'met' if med['flow'] <= GOAL_SECONDS else 'NOT met'}"
          + ("" if args.n == 1_000_000 else f" (goal is for 1,000,000 items; this run has {args.n})"))
    if identical:
        print(f"kept and removed (id, dup_of) sets identical between the runs ({', '.join(order)}): OK")
    else:
        print("KEPT/REMOVED SETS DIFFER between the runs", file=sys.stderr)
        print("KEPT/REMOVED SETS DIFFER between the runs")
    payload["loadavg_end"] = os.getloadavg()
    write_json(args.json, payload)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
