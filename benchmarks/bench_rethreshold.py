"""What answering "what if eps were E?" costs: ``rethreshold`` against a fresh run at E.

One invocation, in process, on seeded precomputed embeddings (``_common.synth_embeddings``):
1. a full run at eps 0.05 (the source);
2. a fresh full run at the new threshold;
3. a rethreshold of the source at the same threshold (``run/rethreshold.py``).
The rethreshold's kept/removed ids must equal the fresh run's (exit 1 otherwise). Wall times
are compared as ratios within the run (the machine is shared); peak RSS per step from VmHWM.
The report and recall stages' share of the full run is printed too (both added to every run).

    .venv/bin/python benchmarks/bench_rethreshold.py --n 300000 --dim 128 --eps 0.1
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import machine_info, print_table, proc_status_bytes, reset_peak_rss, synth_embeddings

from semdedup_core.config import RunConfig
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.rethreshold import rethreshold_config


def write_shards(folder: Path, vectors: np.ndarray, shards: int) -> str:
    folder.mkdir(parents=True)
    for i, rows in enumerate(np.array_split(np.arange(len(vectors)), shards)):
        ids = pa.array([f"item-{r}" for r in rows])
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].ravel()), vectors.shape[1])
        pq.write_table(pa.table({"id": ids, "embedding": embedding}), folder / f"shard-{i:03d}.parquet")
    return str(folder / "*.parquet")


def timed(label: str, cfg: RunConfig) -> tuple[float, int, object]:
    reset_peak_rss()
    start = time.perf_counter()
    summary = run_pipeline(cfg)
    wall = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM") or 0
    print(f"  {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    return wall, peak, summary


def decisions(output: str) -> tuple[set, set]:
    kept = set(pq.read_table(Path(output) / "result/kept.parquet").column("id").to_pylist())
    removed = set(pq.read_table(Path(output) / "result/removed.parquet").column("id").to_pylist())
    return kept, removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--eps", type=float, default=0.1, help="the new threshold")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-rethreshold-"))
    try:
        glob = write_shards(work / "in", synth_embeddings(args.n, args.dim, seed=0, topics=64), args.shards)
        common = {"input": [glob], "workers": args.workers}
        source = str(work / "source")
        full_wall, full_peak, full = timed("source run, eps 0.05", RunConfig(output=source, eps=0.05, **common))
        fresh_wall, fresh_peak, _ = timed(f"fresh run, eps {args.eps}", RunConfig(output=str(work / "fresh"), eps=args.eps, **common))
        derived = str(work / "derived")
        re_wall, re_peak, rethresholded = timed(f"rethreshold, eps {args.eps}", rethreshold_config(source, derived, eps=args.eps))
        if decisions(derived) != decisions(str(work / "fresh")):
            raise SystemExit("rethreshold decisions differ from the fresh run's")
        print(machine_info())
        print(f"n={args.n:,} dim={args.dim} shards={args.shards} workers={args.workers}; new eps {args.eps}; decisions identical")
        print_table(
            ["step", "wall s", "of a fresh run", "peak RSS MiB"],
            [
                ["fresh run at the new eps", f"{fresh_wall:.1f}", "100 %", f"{fresh_peak / 2**20:.0f}"],
                ["rethreshold to the new eps", f"{re_wall:.2f}", f"{re_wall / fresh_wall:.1%}", f"{re_peak / 2**20:.0f}"],
            ],
        )
        shown = lambda stages: ", ".join(f"{k} {v:.2f}" for k, v in stages.items())  # noqa: E731
        print(f"source run {full_wall:.1f} s ({full_peak / 2**20:.0f} MiB), stage seconds: {shown(full.stage_seconds)}")
        print(f"rethreshold stage seconds: {shown(rethresholded.stage_seconds)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
