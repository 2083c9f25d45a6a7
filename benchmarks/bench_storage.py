"""Object storage and resume: S3 (moto's server on loopback) vs local disk, and resuming a
run killed half-way vs running it from scratch.

Every run is ``semdedup_core.run.dag.run_pipeline`` (no Prefect, so storage is what
differs) in a fresh subprocess over the same seeded input:

(a) ``local``    input and output on local disk;
(b) ``s3``       input uploaded to a moto S3 server on 127.0.0.1 (untimed), output there too;
(c) ``resume``   a local run killed with SIGKILL once half of the dedup buckets are done,
                 then re-run to completion: the re-run's wall time vs (a).

All three must give the same kept and removed ids (exit code 1 if not).

    .venv/bin/python benchmarks/bench_storage.py                       # 1,000,000 x 512, k=1000
    .venv/bin/python benchmarks/bench_storage.py --n 200000 --clusters 200
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ForeignLoad, machine_info, print_table, synth_embeddings, write_json

HERE = Path(__file__).resolve()


def generate(args, folder: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    y = synth_embeddings(args.n, args.dim, args.seed, topics=args.clusters)
    bounds = np.linspace(0, args.n, args.shards + 1).astype(int)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(y[lo:hi].reshape(-1)), args.dim)
        ids = pa.array([f"item-{i:08d}" for i in range(lo, hi)], pa.string())
        pq.write_table(pa.table({"id": ids, "embedding": emb}), folder / f"embeddings-{s:04d}.parquet")
    (folder / "done").write_text("ok\n")


def child_run(input_glob: str, output: str, clusters: int, buckets: int | None) -> None:
    from semdedup_core.config import RunConfig
    from semdedup_core.run.dag import run_pipeline

    start = time.perf_counter()
    summary = run_pipeline(RunConfig(input=[input_glob], output=output, clusters=clusters, eps=0.05, buckets=buckets))
    print(json.dumps({"wall": time.perf_counter() - start, "stage_seconds": summary["stage_seconds"]}), flush=True)


def run_child(args, input_glob: str, output: str, env: dict, kill_at_bucket: int | None = None) -> dict | None:
    cmd = [sys.executable, str(HERE), "--_child", input_glob, output, str(args.clusters), str(args.buckets or 0)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    if kill_at_bucket is not None:
        marker = Path(output) / "scores" / f"bucket-{kill_at_bucket:05d}.json"
        while proc.poll() is None and not marker.exists():
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(out.strip().splitlines()[-1])


def id_sets(read_table, output: str) -> tuple[set, set]:
    kept = set(read_table(f"{output}/result/kept.parquet").column("id").to_pylist())
    removed = set(read_table(f"{output}/result/removed.parquet").column("id").to_pylist())
    return kept, removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--buckets", type=int, default=None, help="default: the project's automatic choice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="cache folder for the generated input")
    parser.add_argument("--json", default=None)
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        glob, output, clusters, buckets = args._child
        child_run(glob, output, int(clusters), int(buckets) or None)
        return 0

    import pyarrow.parquet as pq
    import s3fs
    from moto.server import ThreadedMotoServer

    data = Path(args.data or Path(tempfile.gettempdir()) / f"semdedup-bench-storage-{args.n}x{args.dim}-{args.shards}-seed{args.seed}")
    generate(args, data)
    work = Path(tempfile.mkdtemp(prefix="semdedup-bench-storage-"))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_S3=f"http://{host}:{port}")
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")})
    fs = s3fs.S3FileSystem()
    try:
        fs.mkdir("bench")
        fs.put(str(data) + "/", "bench/data/", recursive=True)
        local_glob = str(data / "embeddings-*.parquet")
        rows = []
        with ForeignLoad() as load_local:
            local = run_child(args, local_glob, str(work / "local"), env)
        with ForeignLoad() as load_s3:
            s3 = run_child(args, "s3://bench/data/embeddings-*.parquet", "s3://bench/run", env)
        buckets = json.loads((work / "local" / "run.json").read_text())["buckets"]
        run_child(args, local_glob, str(work / "resume"), env, kill_at_bucket=buckets // 2)
        killed_done = len(list((work / "resume" / "scores").glob("bucket-*.json")))
        with ForeignLoad() as load_resume:
            resumed = run_child(args, local_glob, str(work / "resume"), env)

        def s3_table(url: str):
            with fs.open(url, "rb") as fh:
                return pq.read_table(fh)

        reference = id_sets(pq.read_table, str(work / "local"))
        same = reference == id_sets(s3_table, "s3://bench/run") == id_sets(pq.read_table, str(work / "resume"))
        for name, result, load in (("(a) local disk", local, load_local), ("(b) S3 (moto, loopback)", s3, load_s3), ("(c) resume after kill -9", resumed, load_resume)):
            st = result["stage_seconds"]
            rows.append([name, args.n, args.clusters, buckets, f"{result['wall']:.1f}", f"{result['wall'] / local['wall']:.2f}", *(f"{st.get(k, 0):.1f}" for k in ("fit", "assign", "dedup", "finalize")), f"{load.cores if load.cores is not None else float('nan'):.2f}"])
        print(f"\n# bench_storage  {machine_info()['cpu_model']}, {machine_info()['cores']} cores")
        print_table(["run", "items", "k", "buckets", "wall s", "vs local", "fit s", "assign s", "dedup s", "finalize s", "other-process cores"], rows)
        print(f"\nkilled run had finished {killed_done} of {buckets} dedup buckets; resume took {resumed['wall'] / local['wall']:.0%} of a run from scratch")
        print(f"kept/removed ids identical across local, S3 and resumed runs: {'OK' if same else 'MISMATCH'}")
        write_json(args.json, {"machine": machine_info(), "args": vars(args), "local": local, "s3": s3, "resume": resumed, "killed_buckets_done": killed_done, "buckets": buckets, "identical": same})
        return 0 if same else 1
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
