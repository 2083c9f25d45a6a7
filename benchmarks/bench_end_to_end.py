"""End to end on precomputed embeddings (default 1,000,000 x 512, k=1000, eps=0.05). Goal: <= 90 s on 2 cores.

Two runs over the same cached input, each in a fresh Python subprocess, each into its own
output folder (removed first, so nothing is resumed):

(a) ``flow``    the Prefect flow ``flows.dedup_flow.semdedup_flow`` on ephemeral Prefect
                (PREFECT_SERVER_ANALYTICS_ENABLED=false, PREFECT_LOGGING_LEVEL=WARNING); total wall
                time of the call (Prefect's start-up included) and the per-stage wall times from
                result/summary.json's stage_seconds (finalize from run.json).
(b) ``direct``  the same stages called directly through semdedup_core, no Prefect: plan_run,
                partitions.fit_centroids, partitions.assign_shard per shard,
                partitions.collect_partitions, dedup.score_bucket per bucket, results.finalize,
                as semdedup_core.run.dag.run_pipeline runs them.

Reports the wall times, Prefect's overhead share = (flow wall - direct wall) / flow wall, the peak
RSS of each run's process (VmHWM; for the flow also Prefect's ephemeral API server subprocess),
and checks that both runs keep exactly the same ids (exit code 1 if not).

The input (seeded parquet shards: ``id`` string + ``embedding`` list<float32>, clustered data with
lognormal topic sizes, 5 % planted near-copies, 0.5 % exact copies) is generated once into --data
and reused when its parameters match; generating it is not timed.

    .venv/bin/python benchmarks/bench_end_to_end.py --n 200000 --clusters 200 --json /tmp/e2e.json
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


def child_flow(args, output: Path) -> None:
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    if args.prefect_home:
        os.environ["PREFECT_HOME"] = args.prefect_home
    t_import = time.perf_counter()
    from flows.dedup_flow import semdedup_flow
    from semdedup_core.storage import read_json

    import_seconds = time.perf_counter() - t_import
    shutil.rmtree(output, ignore_errors=True)
    cfg = _config(args, output)
    start = time.perf_counter()
    summary = semdedup_flow(config=cfg)
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
            "n_kept": summary["n_kept"],
            "n_removed": summary["n_removed"],
            "n_failed": summary["n_failed"],
            "clusters": summary["clusters"],
            "buckets": summary["buckets"],
            **_peaks_and_children(),
        }
    )


def child_direct(args, output: Path) -> None:
    """The same stages without Prefect: semdedup_core.run.dag.run_pipeline."""
    t_import = time.perf_counter()
    import faiss
    import torch

    from semdedup_core.run.dag import run_pipeline

    import_seconds = time.perf_counter() - t_import
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # what the flow's configure_compute does for workers=1
    faiss.omp_set_num_threads(threads)
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    summary = run_pipeline(_config(args, output))
    wall = time.perf_counter() - start
    _emit(
        {
            "run": "direct",
            "wall": wall,
            "import_seconds": import_seconds,
            "stage_seconds": summary["stage_seconds"] | {"finalize": json.loads((output / "run.json").read_text())["stages"]["finalize"]["seconds"]},
            "n_kept": summary["n_kept"],
            "n_removed": summary["n_removed"],
            "n_failed": summary["n_failed"],
            "clusters": summary["clusters"],
            "buckets": summary["buckets"],
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
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_child", choices=["generate", "flow", "direct"], help=argparse.SUPPRESS)
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

    info = machine_info()
    print(f"# bench_end_to_end  {info['cpu_model']}, {info['cores']} cores, {info['mem_total_gib']} GiB, {info['date']}")
    payload: dict = {"machine": info, "versions": versions(), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    payload["data"] = ensure_data(args)
    tmp = None
    out = Path(args.out) if args.out else Path(tmp := tempfile.mkdtemp(prefix="semdedup-bench-e2e-"))
    runs: dict[str, list[dict]] = {"flow": [], "direct": []}
    identical = True
    try:
        order = ["flow", "direct"] if args.order == "flow-first" else ["direct", "flow"]
        for r in range(args.repeats):
            for role in order:
                res = run_child(args, role, out / role)
                runs[role].append(res)
                print(
                    f"  [{role}] repeat {r + 1}: {res['wall']:.1f} s, peak {gib(res['peak_rss'])} GiB, other processes' cores {res['foreign_cores']}",
                    file=sys.stderr,
                    flush=True,
                )
            kept_flow, kept_direct = kept_ids(out / "flow"), kept_ids(out / "direct")
            same_kept = sorted(kept_flow) == sorted(kept_direct) and len(set(kept_flow)) == len(kept_flow)
            same_removed = removed_rows(out / "flow") == removed_rows(out / "direct")
            identical = identical and same_kept and same_removed
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    payload["runs"] = runs
    med = {role: statistics.median(r["wall"] for r in rs) for role, rs in runs.items()}
    overhead = (med["flow"] - med["direct"]) / med["flow"]
    payload["median_wall"] = med
    payload["prefect_overhead_share"] = overhead
    payload["identical_kept_and_removed"] = identical
    payload["goal_seconds"] = GOAL_SECONDS

    stage_names = sorted({name for rs in runs.values() for r in rs for name in r["stage_seconds"]}, key=stage_order)
    # Medians over the repeats; peak RSS and other-process cores: the maximum over the repeats.
    header = ["run", "items", "k", "shards", "buckets", "wall s", *[f"{s} s" for s in stage_names], "process wall s", "peak RSS GiB", "kept", "removed", "other-process cores"]
    rows = []
    for role in ("flow", "direct"):
        last = runs[role][-1]
        peak = gib(max(r["peak_rss"] for r in runs[role]))
        servers = [c["peak_rss"] for r in runs[role] for c in r.get("children", {}).values() if c["peak_rss"]]
        if servers:
            peak += f" (+ Prefect server {gib(max(servers))})"
        rows.append(
            [
                "(a) Prefect flow" if role == "flow" else "(b) direct semdedup_core",
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
    for role in ("flow", "direct"):
        for i, r in enumerate(runs[role]):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["stage_seconds"].items(), key=lambda kv: stage_order(kv[0])))
            print(
                f"  {role} run {i + 1}: wall {r['wall']:.1f} s (stages: {stages}; outside the stages {r['wall'] - sum(r['stage_seconds'].values()):.1f}), "
                f"imports {r['import_seconds']:.1f} s, process {r['process_wall']:.1f} s, peak RSS {gib(r['peak_rss'])} GiB"
            )
    print(f"Prefect overhead share (flow wall - direct wall) / flow wall = {overhead * 100:.1f} %")
    print(f"flow wall {med['flow']:.1f} s vs goal <= {GOAL_SECONDS:.0f} s: {'met' if med['flow'] <= GOAL_SECONDS else 'NOT met'}"
          + ("" if args.n == 1_000_000 else f" (goal is for 1,000,000 items; this run has {args.n})"))
    if identical:
        print("kept and removed (id, dup_of) sets identical between the flow and the direct run: OK")
    else:
        print("KEPT/REMOVED SETS DIFFER between the flow and the direct run", file=sys.stderr)
        print("KEPT/REMOVED SETS DIFFER between the flow and the direct run")
    payload["loadavg_end"] = os.getloadavg()
    write_json(args.json, payload)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
