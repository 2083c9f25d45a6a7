"""A collection generation vs a full re-run (default: a 1,000,000 x 512 base + 10 % new items, k=1000, eps=0.05).

Goal: a generation costs in proportion to its new items, <= 15 % of a full run over everything.

The input (seeded parquet shards: ``id`` string + ``embedding`` list<float32>, the generator of
bench_end_to_end.py: lognormal topic sizes, 5 % planted near-copies, 0.5 % exact copies, drawn over
all n * (1 + new share) rows at once, so new items are near-copies of earlier ones too) is written
once into --data as ``--shards`` base shards plus one shard of new items, and reused. Three runs,
each in a fresh Python subprocess through ``semdedup_core.run.dag.run_pipeline`` (no Prefect):

(base)        ``collection=True`` over the base shards only: generation 0 of the collection
              (skipped with --reuse-base when --out holds a committed base of the same data and
              settings: the collection is put back to its base, the generation folder removed);
(generation)  ``collection=True`` over every shard: generation 1 processes only the new shard,
              with the base's centroids, its new items judged against the base's kept items;
(full)        a normal run over every shard into a fresh output.

Each child reports the run's wall time (imports excluded), its peak RSS (``ru_maxrss``) and the
bytes it read: the deltas of ``rchar`` (bytes returned by read-like system calls, page cache hits
included) and ``read_bytes`` (bytes fetched from the block device) of /proc/self/io around the run. The generation's
ratios to the full run are the result. ``--profile PATH`` runs the generation under cProfile.

Checks (exit 1 on failure): every id of the new shard is in exactly one of the generation's
result/kept, result/removed, result/failed; the base's files (generation 0's folder) are
byte-identical before and after the generation and collection.json still holds its record
unchanged; every removed item's kept_id is a kept item of the base or of the generation.
The generation's scores (id, max_sim, dup_of, kept of every bucket) are hashed (``scores_sha256``)
so that a change to the scoring code can be shown to leave them bit-identical.

    .venv/bin/python benchmarks/bench_collection.py --n 200000 --clusters 200 --json /tmp/coll.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import emit_result, machine_info, print_table, run_tagged_child, versions, write_json

GOAL_SHARE = 0.15
RESULT_TAG = "BENCH_COLLECTION_RESULT "


def n_new(args) -> int:
    return int(round(args.n * args.new_share))


def data_params(args) -> dict:
    return {
        "n_base": args.n,
        "n_new": n_new(args),
        "dim": args.dim,
        "base_shards": args.shards,
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
    return Path(tempfile.gettempdir()) / f"semdedup-bench-collection-data-{args.n}+{n_new(args)}x{args.dim}-{args.shards}shards-seed{args.seed}"


def base_files(args) -> list[Path]:
    return [data_dir(args) / f"embeddings-{s:04d}.parquet" for s in range(args.shards)]


def new_file(args) -> Path:
    return data_dir(args) / f"embeddings-{args.shards:04d}.parquet"


# ---------------------------------------------------------------- subprocesses


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(":") for line in fh)}


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
    total = args.n + n_new(args)
    y = synth_embeddings(total, args.dim, args.seed, topics=params["topics"], planted=params["planted"], exact=params["exact"])
    bounds = [*np.linspace(0, args.n, args.shards + 1).astype(int), total]
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = pa.array([f"item-{i:08d}" for i in range(lo, hi)], pa.string())
        offsets = pa.array(np.arange(0, (hi - lo + 1) * args.dim, args.dim, dtype=np.int32))
        emb = pa.ListArray.from_arrays(offsets, pa.array(y[lo:hi].reshape(-1)))
        pq.write_table(pa.table({"id": ids, "embedding": emb}), folder / f"embeddings-{s:04d}.parquet")
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    emit_result(RESULT_TAG, {"seconds": time.perf_counter() - start, "folder": str(folder)})


def _config(args, output: Path, role: str):
    from semdedup_core.config import RunConfig

    inputs = [str(p) for p in base_files(args)] if role == "base" else [str(data_dir(args) / "embeddings-*.parquet")]
    return RunConfig(
        input=inputs,
        output=str(output),
        clusters=args.clusters,
        eps=args.eps,
        tile_size=args.tile_size,
        device="cpu",
        seed=args.seed,
        collection=role != "full",
    )


def scores_digest(run: Path) -> str:
    """sha256 over every bucket's (id, cluster, max_sim, dup_of, kept), buckets in order."""
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for path in sorted((run / "scores").glob("bucket-*[0-9].parquet")):
        t = pq.read_table(path, columns=["id", "cluster", "max_sim", "dup_of", "kept"])
        for name in t.column_names:
            h.update(json.dumps([name, t.column(name).to_pylist()]).encode())
    return h.hexdigest()


def child_run(args, output: Path, role: str) -> None:
    t_import = time.perf_counter()
    import faiss
    import torch

    from semdedup_core.run.dag import run_pipeline

    import_seconds = time.perf_counter() - t_import
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # what the flow's configure_compute does for workers=1
    faiss.omp_set_num_threads(threads)
    if role != "generation":
        shutil.rmtree(output, ignore_errors=True)
    cfg = _config(args, output, role)
    profiler = None
    if args.profile and role == "generation":
        import cProfile

        profiler = cProfile.Profile()
    io_before = proc_io()
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    summary = run_pipeline(cfg)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - start
    io_after = proc_io()
    if profiler:
        profiler.dump_stats(args.profile)
    run = output / "generations" / f"g-{1 if role == 'generation' else 0:05d}" if role != "full" else output
    result = {
        "run": role,
        "wall": wall,
        "import_seconds": import_seconds,
        "stage_seconds": summary.stage_seconds | {"finalize": json.loads((run / "run.json").read_text())["stages"]["finalize"]["seconds"]},
        "rchar": io_after["rchar"] - io_before["rchar"],
        "read_bytes": io_after["read_bytes"] - io_before["read_bytes"],
        "wchar": io_after["wchar"] - io_before["wchar"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # the child's high-water mark, imports included
        "n_input": summary.n_input,
        "n_kept": summary.n_kept,
        "n_removed": summary.n_removed,
        "n_failed": summary.n_failed,
        "clusters": summary.clusters,
        "buckets": summary.buckets,
    }
    if role == "generation":
        result["scores_sha256"] = scores_digest(run)
    emit_result(RESULT_TAG, result)


# ---------------------------------------------------------------- orchestration


def _child_cmd(args, role: str, output: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", role]
    for flag, value in (
        ("--n", args.n),
        ("--new-share", args.new_share),
        ("--dim", args.dim),
        ("--clusters", args.clusters),
        ("--shards", args.shards),
        ("--eps", args.eps),
        ("--tile-size", args.tile_size),
        ("--seed", args.seed),
        ("--threads", args.threads),
        ("--data", str(data_dir(args))),
    ):
        cmd += [flag, str(value)]
    if args.topics:
        cmd += ["--topics", str(args.topics)]
    if args.profile:
        cmd += ["--profile", args.profile]
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
    print(f"  [data] generating {args.n} + {n_new(args)} x {args.dim} into {folder} (not timed)", file=sys.stderr, flush=True)
    result = run_child(args, "generate")
    return {"folder": str(folder), "generated": True, "seconds": result["seconds"]}


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def id_column(path: Path, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns or ["id"])


def check_generation(args, coll: Path, base_hashes: dict[str, str], base_record: dict) -> list[str]:
    """The generation's accounting and the base left untouched; a list of failures."""
    import pyarrow.parquet as pq

    problems = []
    gen = coll / "generations" / "g-00001" / "result"
    base = coll / "generations" / "g-00000" / "result"
    new_ids = pq.read_table(new_file(args), columns=["id"]).column("id").to_pylist()
    sets = {}
    for name in ("kept", "removed", "failed"):
        ids = id_column(gen / f"{name}.parquet").column("id").to_pylist()
        if len(set(ids)) != len(ids):
            problems.append(f"generation {name}.parquet lists an id twice")
        sets[name] = set(ids)
    union = sets["kept"] | sets["removed"] | sets["failed"]
    n_sum = sum(len(s) for s in sets.values())
    if union != set(new_ids) or n_sum != len(new_ids):
        problems.append(f"new shard ids ({len(new_ids)}) != kept {len(sets['kept'])} + removed {len(sets['removed'])} + failed {len(sets['failed'])} (union {len(union)})")
    if file_hashes(coll / "generations" / "g-00000") != base_hashes:
        problems.append("generation 0's files changed")
    record = json.loads((coll / "collection.json").read_text())["generations"]
    if len(record) != 2 or record[0] != base_record:
        problems.append("collection.json: the base's record changed or the generation is not committed")
    base_kept = set(id_column(base / "kept.parquet").column("id").to_pylist())
    removed = id_column(gen / "removed.parquet", ["id", "kept_id"])
    orphans = set(removed.column("kept_id").to_pylist()) - base_kept - sets["kept"]
    if orphans:
        problems.append(f"{len(orphans)} removed items resolve to an id that is kept neither by the base nor by the generation")
    to_base = sum(1 for k in removed.column("kept_id").to_pylist() if k in base_kept)
    print(f"  [check] generation: {len(new_ids)} new ids = kept {len(sets['kept'])} + removed {len(sets['removed'])} + failed {len(sets['failed'])}; "
          f"{to_base} removed for a base item; base files unchanged: {'generation 0' not in ' '.join(problems)}", file=sys.stderr)
    return problems


def restore_base(coll: Path, base_snapshot: Path) -> None:
    """Put the collection back to its committed base: the generation's folder removed,
    collection.json as the base committed it."""
    shutil.rmtree(coll / "generations" / "g-00001", ignore_errors=True)
    shutil.copyfile(base_snapshot, coll / "collection.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="items of the base (default 1000000)")
    p.add_argument("--new-share", type=float, default=0.1, help="new items of the generation, as a share of --n (default 0.1)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--clusters", type=int, default=1000, help="k (default 1000)")
    p.add_argument("--shards", type=int, default=10, help="parquet shards of the base (default 10); the new items are one more")
    p.add_argument("--topics", type=int, default=None, help="topics in the synthetic data (default: = --clusters)")
    p.add_argument("--eps", type=float, default=0.05, help="eps (default 0.05)")
    p.add_argument("--tile-size", type=int, default=2048, help="kernel tile size (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="data and run seed (default 0)")
    p.add_argument(
        "--threads", type=int, default=0,
        help="torch/faiss threads of every run (default 0: all cores; 1 keeps a shared machine's neighbours from stalling OpenMP barriers)",
    )
    p.add_argument("--data", help="cache folder for the generated input (default: a folder in the temp dir named after the sizes and seed)")
    p.add_argument("--out", help="folder for the run outputs (default: a temporary folder, removed at the end)")
    p.add_argument("--reuse-base", action="store_true", help="reuse the base committed in --out by an earlier call with the same data and settings")
    p.add_argument("--skip-full", action="store_true", help="run only the generation (e.g. to profile it)")
    p.add_argument("--profile", metavar="PATH", help="run the generation under cProfile and write its stats to PATH")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_child", choices=["generate", "base", "generation", "full"], help=argparse.SUPPRESS)
    p.add_argument("--_output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child == "generate":
        child_generate(args)
        return 0
    if args._child:
        child_run(args, Path(args._output), args._child)
        return 0
    if args.reuse_base and not args.out:
        p.error("--reuse-base needs --out")

    info = machine_info()
    print(f"# bench_collection  {info['cpu_model']}, {info['cores']} cores, {info['mem_total_gib']} GiB, {info['date']}")
    payload: dict = {"machine": info, "versions": versions(), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    payload["data"] = ensure_data(args)
    tmp = None
    out = Path(args.out) if args.out else Path(tmp := tempfile.mkdtemp(prefix="semdedup-bench-collection-"))
    coll, full = out / "collection", out / "full"
    settings = {"data": data_params(args), "clusters": args.clusters, "eps": args.eps, "tile_size": args.tile_size}
    base_snapshot, base_settings = out / "collection.base.json", out / "base-settings.json"
    runs: dict[str, dict] = {}
    try:
        reuse = args.reuse_base and base_snapshot.exists() and base_settings.exists() and json.loads(base_settings.read_text()) == settings
        if reuse:
            print(f"  [base] reusing the base committed in {coll}", file=sys.stderr)
            restore_base(coll, base_snapshot)
            runs["base"] = json.loads((out / "base-result.json").read_text())
        else:
            base_settings.unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            runs["base"] = run_child(args, "base", coll)
            shutil.copyfile(coll / "collection.json", base_snapshot)
            (out / "base-result.json").write_text(json.dumps(runs["base"]))
            base_settings.write_text(json.dumps(settings))
        base_hashes = file_hashes(coll / "generations" / "g-00000")
        base_record = json.loads(base_snapshot.read_text())["generations"][0]
        runs["generation"] = run_child(args, "generation", coll)
        problems = check_generation(args, coll, base_hashes, base_record)
        if not args.skip_full:
            runs["full"] = run_child(args, "full", full)
            shutil.rmtree(full, ignore_errors=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    payload["runs"] = runs
    payload["problems"] = problems
    gen, whole = runs["generation"], runs.get("full")
    if whole:
        payload["generation_share"] = {k: gen[k] / whole[k] if whole[k] else None for k in ("wall", "rchar", "read_bytes")}
    order = ("plan", "fit", "assign", "collect", "dedup", "finalize")
    stage_names = sorted({s for r in runs.values() for s in r["stage_seconds"]}, key=lambda s: (order.index(s) if s in order else len(order), s))
    header = ["run", "items in", "wall s", *[f"{s} s" for s in stage_names], "rchar GiB", "read_bytes GiB", "peak RSS GiB", "kept", "removed", "other-process cores"]
    rows = []
    labels = {"base": "base (generation 0)", "generation": f"(a) generation: +{n_new(args)} new", "full": "(b) full re-run"}
    for role in ("base", "generation", "full"):
        if role not in runs:
            continue
        r = runs[role]
        rows.append(
            [
                labels[role] + (" (reused)" if role == "base" and reuse else ""),
                r["n_input"],
                f"{r['wall']:.1f}",
                *[f"{r['stage_seconds'][s]:.1f}" if s in r["stage_seconds"] else "-" for s in stage_names],
                f"{r['rchar'] / 2**30:.3f}",
                f"{r['read_bytes'] / 2**30:.3f}",
                f"{r['peak_rss'] / 2**30:.2f}" if "peak_rss" in r else "-",
                r["n_kept"],
                r["n_removed"],
                r["foreign_cores"],
            ]
        )
    print()
    print_table(header, rows)
    print()
    if whole:
        share = payload["generation_share"]
        print(
            f"generation / full re-run: wall {share['wall'] * 100:.1f} %, rchar {share['rchar'] * 100:.1f} %, "
            + (f"read_bytes {share['read_bytes'] * 100:.1f} %" if share["read_bytes"] is not None else "read_bytes n/a (full run read nothing from disk)")
            + f"; goal <= {GOAL_SHARE * 100:.0f} %: wall {'met' if share['wall'] <= GOAL_SHARE else 'NOT met'}, rchar {'met' if share['rchar'] <= GOAL_SHARE else 'NOT met'}"
        )
    print(f"generation scores sha256 {gen['scores_sha256']}")
    if problems:
        for line in problems:
            print("CHECK FAILED: " + line)
            print("CHECK FAILED: " + line, file=sys.stderr)
    else:
        print("checks: every new id in exactly one of kept/removed/failed; the base's files and record untouched; removed resolve to kept items: OK")
    payload["loadavg_end"] = os.getloadavg()
    write_json(args.json, payload)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
