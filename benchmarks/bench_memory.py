"""Peak memory (RSS) of deduplicating ONE large cluster (default 300,000 x 512). Goal: <= 1.5 GiB.

Every measurement runs in a fresh Python subprocess, which reports:

* baseline RSS right after its imports (torch alone is ~300 MB),
* RSS with the input in place (kernel mode: the array; pipeline mode: the run plan),
* the process's peak RSS (VmHWM from /proc/self/status, cross-checked with
  getrusage(RUSAGE_SELF).ru_maxrss), and
* the peak inside each phase (VmHWM is reset between phases through /proc/self/clear_refs;
  the phases are observed by wrapping functions in this process only, the project code is
  unchanged).

Modes:

``--mode kernel``    the cluster is generated in memory (seeded, in chunks: peak = the array plus
                     one chunk) and handed to ``semdedup_core.dedup.kernel.cluster_max_sim``.
``--mode pipeline``  the cluster goes through the real code path. A first subprocess writes it as
                     parquet embeddings (``--shards`` files) and runs plan_run, fit_centroids,
                     assign_shard and collect_partitions with clusters=1 and buckets=1; a second,
                     fresh subprocess loads the plan and runs ``semdedup_core.dedup.scoring.score_bucket``
                     only; its peak is the number that counts. The first one's peak is reported too.

The full 300k kernel needs ~4.6e13 flop: several minutes of CPU. Shrink with --n for a check:

    .venv/bin/python benchmarks/bench_memory.py --mode both --n 60000 --json /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import GiB, emit_result, gib, machine_info, maxrss_bytes, mib, print_table, proc_status_bytes, reset_peak_rss, run_tagged_child, write_json

GOAL_BYTES = 1.5 * GiB
EPS = 0.05
RESULT_TAG = "BENCH_MEMORY_RESULT "


# ---------------------------------------------------------------- in the measured subprocess


class PhasePeaks:
    """Peak RSS per (possibly nested) phase and for the whole process, via VmHWM resets."""

    def __init__(self) -> None:
        self.process_peak = 0
        self.phases: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.rss_after: dict[str, int] = {}  # VmRSS when the phase returned (what it left behind)
        self._open: list[str] = []
        self.resettable = reset_peak_rss()

    def _read(self) -> None:
        hwm = proc_status_bytes("VmHWM") or 0
        self.process_peak = max(self.process_peak, hwm, maxrss_bytes() if not self.resettable else 0)
        for name in self._open:
            self.phases[name] = max(self.phases.get(name, 0), hwm)
        if self.resettable:
            reset_peak_rss()

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            self._read()
            self._open.append(name)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._read()
                self._open.pop()
                self.rss_after[name] = proc_status_bytes("VmRSS") or 0
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        setattr(owner, attr, wrapped)

    def finish(self) -> int:
        self._read()
        return self.process_peak


def _emit(result: dict) -> None:
    emit_result(RESULT_TAG, result)


def child_kernel(args) -> None:
    import torch

    from semdedup_core.dedup import kernel

    torch.set_num_threads(os.cpu_count() or 1)
    baseline = proc_status_bytes("VmRSS")
    hwm_imports = proc_status_bytes("VmHWM")
    from _common import synth_embeddings

    y = synth_embeddings(args.n, args.dim, args.seed, topics=1)
    with_data = proc_status_bytes("VmRSS")
    peaks = PhasePeaks()
    peaks.process_peak = max(peaks.process_peak, proc_status_bytes("VmHWM") or 0)
    peaks.wrap(kernel, "first_copy_mask", "first_copy_mask")
    peaks.wrap(kernel, "cluster_max_sim", "cluster_max_sim")
    start = time.perf_counter()
    scores = kernel.cluster_max_sim(y, tile_size=args.tile_size, device="cpu")
    seconds = time.perf_counter() - start
    peak = peaks.finish()
    _emit(
        {
            "mode": "kernel",
            "n": args.n,
            "dim": args.dim,
            "tile_size": args.tile_size,
            "input_bytes": int(y.nbytes),
            "baseline_rss": baseline,
            "hwm_after_imports": hwm_imports,
            "rss_with_input": with_data,
            "peak_rss": peak,
            "ru_maxrss": maxrss_bytes(),
            "hwm_resettable": peaks.resettable,
            "phase_peaks": peaks.phases,
            "phase_seconds": peaks.seconds,
            "phase_rss_after": peaks.rss_after,
            "seconds": seconds,
            "n_removed_at_eps_0.05": int(kernel.removed_mask(scores.max_sim, EPS).sum()),
            "threads": torch.get_num_threads(),
        }
    )


def _pipeline_paths(workdir: str) -> tuple[Path, Path, Path]:
    root = Path(workdir)
    return root / "data", root / "run", root / "plan.json"


def child_prepare(args) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from _common import synth_embeddings
    from semdedup_core.dedup import partitions
    from semdedup_core.config import RunConfig
    from semdedup_core.run.plan import plan_run, write_run_json

    torch.set_num_threads(os.cpu_count() or 1)
    data_dir, run_dir, plan_file = _pipeline_paths(args.workdir)
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    y = synth_embeddings(args.n, args.dim, args.seed, topics=1)
    bounds = np.linspace(0, args.n, args.shards + 1).astype(int)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = pa.array([f"item-{i:08d}" for i in range(lo, hi)], pa.string())
        emb = pa.FixedSizeListArray.from_arrays(pa.array(y[lo:hi].reshape(-1)), args.dim)
        pq.write_table(pa.table({"id": ids, "embedding": emb}), data_dir / f"embeddings-{s:03d}.parquet")
        del ids, emb
    del y
    t_data = time.perf_counter() - t0
    cfg = RunConfig(
        input=[str(data_dir / "embeddings-*.parquet")],
        output=str(run_dir),
        clusters=1,
        buckets=1,
        eps=EPS,
        tile_size=args.tile_size,
        device="cpu",
    )
    peaks = PhasePeaks()  # from here on: the prepare stages only
    stage_seconds = {}
    t = time.perf_counter()
    plan = plan_run(cfg)
    write_run_json(plan)
    stage_seconds["plan"] = time.perf_counter() - t
    peaks.wrap(partitions, "fit_centroids", "fit_centroids")
    peaks.wrap(partitions, "assign_shard", "assign_shard")
    peaks.wrap(partitions, "collect_partitions", "collect_partitions")
    t = time.perf_counter()
    partitions.fit_centroids(plan)
    stage_seconds["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    for shard in plan.shards:
        partitions.assign_shard(plan, shard.index)
    stage_seconds["assign"] = time.perf_counter() - t
    t = time.perf_counter()
    index = partitions.collect_partitions(plan)
    stage_seconds["collect"] = time.perf_counter() - t
    plan_file.write_text(json.dumps({"plan": plan.model_dump(mode="json"), "entries": index["buckets"][0]}))
    _emit(
        {
            "mode": "pipeline-prepare",
            "n": args.n,
            "shards": args.shards,
            "data_seconds": t_data,
            "stage_seconds": stage_seconds,
            "peak_rss_stages": peaks.finish(),
            "phase_peaks": peaks.phases,
            "n_assigned": index["n_assigned"],
        }
    )


def child_score(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from semdedup_core.dedup import kernel, scoring as dedup
    from semdedup_core.run.plan import RunPlan

    torch.set_num_threads(os.cpu_count() or 1)
    baseline = proc_status_bytes("VmRSS")
    hwm_imports = proc_status_bytes("VmHWM")
    _, run_dir, plan_file = _pipeline_paths(args.workdir)
    saved = json.loads(plan_file.read_text())
    plan = RunPlan.model_validate(saved["plan"])
    entries = saved["entries"]
    for p in run_dir.glob("scores/*"):  # a rerun must score again, not resume
        p.unlink()
    with_input = proc_status_bytes("VmRSS")
    peaks = PhasePeaks()
    peaks.process_peak = max(peaks.process_peak, proc_status_bytes("VmHWM") or 0)
    peaks.wrap(dedup, "load_bucket", "load_bucket")
    peaks.wrap(kernel, "first_copy_mask", "first_copy_mask")
    peaks.wrap(dedup, "cluster_max_sim", "cluster_max_sim")
    peaks.wrap(dedup, "write_parquet", "write_scores")
    start = time.perf_counter()
    result = dedup.score_bucket(plan, 0, entries, EPS)
    seconds = time.perf_counter() - start
    peak = peaks.finish()
    pool = pa.default_memory_pool()
    arrow_pool = {"backend": pool.backend_name, "max_memory": pool.max_memory(), "bytes_allocated_at_end": pool.bytes_allocated()}
    n_kept = pq.read_table(plan.layout.scores(0), columns=["kept"]).column(0).to_numpy().sum()
    _emit(
        {
            "mode": "pipeline",
            "n": args.n,
            "dim": args.dim,
            "tile_size": args.tile_size,
            "shards": len(plan.shards),
            "input_bytes": args.n * args.dim * 4,
            "baseline_rss": baseline,
            "hwm_after_imports": hwm_imports,
            "rss_with_input": with_input,
            "peak_rss": peak,
            "ru_maxrss": maxrss_bytes(),
            "hwm_resettable": peaks.resettable,
            "phase_peaks": peaks.phases,
            "phase_seconds": peaks.seconds,
            "phase_rss_after": peaks.rss_after,
            "seconds": seconds,
            "n_scored": result["n_scored"],
            "n_removed_at_eps_0.05": result["n_removed"],
            "n_kept": int(n_kept),
            "arrow_pool": arrow_pool,
            "threads": torch.get_num_threads(),
        }
    )


# ---------------------------------------------------------------- orchestration


def run_child(role: str, args, workdir: str | None = None) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        role,
        "--n",
        str(args.n),
        "--dim",
        str(args.dim),
        "--tile-size",
        str(args.tile_size),
        "--seed",
        str(args.seed),
        "--shards",
        str(args.shards),
    ]
    if workdir:
        cmd += ["--workdir", workdir]
    result, wall, _ = run_tagged_child(cmd, role, RESULT_TAG)
    result["subprocess_wall_seconds"] = wall
    return result


def _row(r: dict) -> list:
    phases = ", ".join(f"{k} {gib(v)}" for k, v in r["phase_peaks"].items())
    return [
        r["mode"],
        f"{r['n']} x {r['dim']}",
        r["tile_size"],
        r.get("shards", "-"),
        mib(r["input_bytes"]),
        mib(r["baseline_rss"]),
        mib(r["rss_with_input"]),
        gib(r["peak_rss"]),
        f"{(r['peak_rss'] - r['baseline_rss']) / GiB:.3f}",
        "yes" if r["peak_rss"] <= GOAL_BYTES else "NO",
        f"{r['seconds']:.1f}",
        phases,
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["kernel", "pipeline", "both"], default="both", help="what to measure (default both)")
    p.add_argument("--n", type=int, default=300000, help="rows of the single cluster (default 300000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--tile-size", type=int, default=2048, help="kernel tile size (default 2048, the project default)")
    p.add_argument("--shards", type=int, default=1, help="pipeline: parquet input shards the cluster is spread over (default 1)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--workdir", help="pipeline: folder for the parquet data and the run (default: a temporary folder, removed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_child", choices=["kernel", "prepare", "score"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child == "kernel":
        child_kernel(args)
        return 0
    if args._child == "prepare":
        child_prepare(args)
        return 0
    if args._child == "score":
        child_score(args)
        return 0

    info = machine_info()
    print(f"# bench_memory  {info['cpu_model']}, {info['cores']} cores, {info['mem_total_gib']} GiB, {info['date']}")
    payload: dict = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "_child"}, "goal_bytes": GOAL_BYTES}
    results = []
    if args.mode in ("kernel", "both"):
        payload["kernel"] = run_child("kernel", args)
        results.append(payload["kernel"])
    if args.mode in ("pipeline", "both"):
        tmp = None
        workdir = args.workdir
        if workdir is None:
            tmp = tempfile.mkdtemp(prefix="semdedup-bench-memory-")
            workdir = tmp
        try:
            payload["pipeline_prepare"] = run_child("prepare", args, workdir)
            payload["pipeline"] = run_child("score", args, workdir)
            results.append(payload["pipeline"])
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    print()
    header = [
        "mode",
        "cluster",
        "tile",
        "shards",
        "input MiB",
        "baseline RSS MiB (after imports)",
        "RSS with input MiB",
        "peak RSS GiB",
        "peak - baseline GiB",
        "<= 1.5 GiB",
        "seconds",
        "peak GiB by phase",
    ]
    print_table(header, [_row(r) for r in results])
    print()
    for r in results:
        check = "" if abs(r["ru_maxrss"] - r["peak_rss"]) < 64 * 2**20 or r["hwm_resettable"] else " (differs from VmHWM!)"
        print(f"{r['mode']}: peak {gib(r['peak_rss'])} GiB (ru_maxrss at exit {gib(r['ru_maxrss'])} GiB{check}), removed at eps {EPS}: {r['n_removed_at_eps_0.05']}")
    if "pipeline_prepare" in payload:
        pp = payload["pipeline_prepare"]
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in pp["stage_seconds"].items())
        phases = ", ".join(f"{k} {gib(v)}" for k, v in pp["phase_peaks"].items())
        print(f"pipeline prepare (not the measured number): {stages}; peak {gib(pp['peak_rss_stages'])} GiB ({phases})")
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
