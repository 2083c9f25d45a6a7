"""Embedding throughput on CPU, and what the embedding stage adds around the bare model.

(a) ViT-B-16 image tower (open_clip) throughput in images/s, fp32 and bf16, batch 32, a
    warm-up batch and then ``--batches`` timed batches of random pixels. The weights are
    random (``create_model_and_transforms("ViT-B-16", pretrained=None)``, seeded): the same
    architecture and FLOPs as the real laion2b checkpoint, which cannot be downloaded here.
    They are saved to a temporary safetensors file and loaded back through
    ``semdedup_core.embedding.models.load_embedder`` (``--model ViT-B-16 --pretrained FILE``), so
    (a), (b) time the very model object the pipeline uses.

(b) Pipeline overhead for images: a webdataset tar of ``--images`` (128) JPEGs (256 x 256, smooth
    random colour fields plus noise, quality 90) run through ``run_pipeline`` (no Prefect);
    the embed stage's own time (``embeddings/shard-00000.json`` ``seconds``: reading the
    scan, decoding + preprocessing in DataLoader workers, the model, writing the parquet) is
    compared with the bare ``model.encode_image`` over the same batches decoded and
    preprocessed beforehand (that decoding is timed apart, as a reference row). overhead =
    pipeline / bare - 1, for ``decode_workers`` 0 and 2, in bf16. The three are run in
    turn, in rounds until ``--repeats`` rounds were quiet (no other process used more than
    0.1 core during any of the round's timings) or ``--max-rounds`` ran; medians over the
    quiet rounds (all rounds, flagged "noisy", if none was). The pipeline's embeddings must equal the
    bare forward's, normalised (checked; exit 1 otherwise).

(c) The same for text: ``--docs`` generated short documents (jsonl) embedded with the
    bundled all-MiniLM-L6-v2 (fp32, the CPU default; batch 64, the default), bare = the
    model forward over the same length-sorted batches tokenized beforehand.

(d) What whole documents cost: ``--long-docs`` (48) generated documents of 40 to 3,000 words
    (log-uniform, seeded) embedded by ``run_pipeline`` with ``long_text=truncate`` (each
    document's first 256 tokens) and ``long_text=chunk`` (every token, in windows of 256
    with 32 shared); docs/s and model windows/s from ``embed_shard``'s own seconds,
    interleaved rounds as in (b), (c); chunk / truncate time is the cost ratio.

Every timing records the cores other processes used meanwhile (``_common.ForeignLoad``):
the reference machine is shared, compare numbers only as ratios measured in one run.

    .venv/bin/python benchmarks/bench_embedding.py --quick
    .venv/bin/python benchmarks/bench_embedding.py --out /tmp/bench_embedding.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import importlib.metadata as md
import io
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch
import torch.nn.functional as F
from _common import ForeignLoad, MiB, machine_info, print_table, proc_status_bytes, reset_peak_rss, versions, write_json

from semdedup_core.config import RunConfig
from semdedup_core.embedding.models import load_embedder
from semdedup_core.embedding.stage import TEXT_SORT_CHUNK, open_image
from semdedup_core.run.dag import run_pipeline

WORDS = (  # noqa: SIM905
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by word but "
    "what some we can out other were all there when up use your how said an each she which do their time if will way "
    "about many then them write would like so these her long make thing see him two has look more day could go come "
    "did number sound no most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every good me give our under "
    "name very through just form sentence great think say help low line differ turn cause much mean before move right "
    "boy old too same tell does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need house picture try us "
    "again animal point mother world near build self earth father head stand own page should country found answer school"
).split()


def peak_rss_mib() -> float | None:
    """This process's peak RSS in MiB since the last reset_peak_rss() (VmHWM; ru_maxrss of
    RUSAGE_SELF reads the same counter, so the reset clears it too)."""
    hwm = proc_status_bytes("VmHWM")
    return round(hwm / MiB, 1) if hwm else None


def children_peak_rss_mib() -> float:
    """ru_maxrss of RUSAGE_CHILDREN: the largest waited-for child. DataLoader workers are
    forks, so this counts the pages they share with the parent."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def timed(fn) -> tuple[float, float | None]:
    """(seconds, other processes' average cores meanwhile) of one call."""
    with ForeignLoad() as load:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, load.cores


# ---------------------------------------------------------------- inputs


def jpeg_images(n: int, size: int, seed: int) -> list[bytes]:
    """Smooth random colour fields (8 x 8 upsampled) plus pixel noise: photo-like JPEG sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.normal(0, 10, (size, size, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_webdataset(path: Path, images: list[bytes]) -> None:
    """A webdataset tar as img2dataset writes it (KEY.jpg + KEY.json), with webdataset's TarWriter."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as writer:
        for i, data in enumerate(images):
            writer.write({"__key__": f"{i:09d}", "jpg": data, "json": json.dumps({"key": f"{i:09d}"}).encode()})


def documents(n: int, seed: int) -> list[str]:
    """n distinct short documents (6-30 words) drawn from a small English vocabulary."""
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    seen: set[str] = set()
    while len(docs) < n:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 31)))).capitalize() + "."
        if text not in seen:
            seen.add(text)
            docs.append(text)
    return docs


def embed_seconds(output: Path) -> tuple[float, float]:
    """(embed_shard's own seconds from the shard marker, the embed stage from summary.json)."""
    marker = json.loads((output / "embeddings" / "shard-00000.json").read_text())
    summary = json.loads((output / "result" / "summary.json").read_text())
    return float(marker["seconds"]), float(summary["stage_seconds"]["embed"])


def pipeline_vectors(output: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(output / "embeddings" / "shard-00000.parquet")
    vectors = np.asarray(table.column("embedding").combine_chunks().values, dtype=np.float32).reshape(table.num_rows, -1)
    return dict(zip(table.column("id").to_pylist(), vectors))


# ---------------------------------------------------------------- (a) image model throughput


def part_a(ckpt: Path, batch: int, batches: int) -> list[dict]:
    rows = []
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for precision in ("fp32", "bf16"):
        emb = load_embedder(RunConfig(input=["x"], output="y", model="ViT-B-16", pretrained=str(ckpt), precision=precision, device="cpu"), "image", "cpu")
        x = pixels.to(emb.dtype)
        with torch.inference_mode():
            emb.model.encode_image(x)  # warm-up
            times, foreign = [], []
            for _ in range(batches):
                s, f = timed(lambda emb=emb, x=x: emb.model.encode_image(x))
                times.append(s)
                foreign.append(f)
        total = sum(times)
        rows.append(
            {
                "part": "a",
                "what": f"ViT-B-16 encode_image, {precision}",
                "precision": precision,
                "batch": batch,
                "batches": batches,
                "seconds": round(total, 3),
                "per_batch_s": [round(t, 3) for t in times],
                "items_per_s": round(batch * batches / total, 2),
                "foreign_cores": max((f for f in foreign if f is not None), default=None),
            }
        )
        print(f"  (a) {precision}: {rows[-1]['items_per_s']} images/s", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- (b), (c): pipeline vs bare model, interleaved

QUIET = 0.1  # other-process cores above which a timing counts as contaminated


def interleaved(measures: dict[str, callable], repeats: int, max_rounds: int) -> dict[str, list[dict]]:
    """Rounds of the measurements in turn (A, B, C, A, B, C, ...), each returning a dict with
    'seconds' and 'foreign_cores', until ``repeats`` rounds were quiet (no measurement saw
    other processes use more than QUIET cores) or ``max_rounds`` rounds ran."""
    out: dict[str, list[dict]] = {name: [] for name in measures}
    quiet = 0
    for _ in range(max_rounds):
        for name, fn in measures.items():
            out[name].append(fn())
        quiet += all(r[-1]["foreign_cores"] is not None and r[-1]["foreign_cores"] <= QUIET for r in out.values())
        if quiet >= repeats:
            break
        print(f"  {quiet} quiet round(s) of {len(out[next(iter(out))])}", file=sys.stderr, flush=True)
    return out


def bare_measure(fn) -> callable:
    def measure() -> dict:
        seconds, foreign = timed(fn)
        return {"seconds": seconds, "foreign_cores": foreign}

    return measure


def pipeline_measure(cfg: RunConfig, output: Path, check) -> callable:
    """run_pipeline from scratch; seconds = embed_shard's own time; check(vectors) -> max |diff|."""

    def measure() -> dict:
        shutil.rmtree(output, ignore_errors=True)
        wall, foreign = timed(lambda: run_pipeline(cfg))
        seconds, stage = embed_seconds(output)
        return {"seconds": seconds, "embed_stage_s": stage, "pipeline_wall_s": wall, "foreign_cores": foreign, "max_abs_diff_vs_bare": check(pipeline_vectors(output))}

    return measure


def summarise(part: str, results: dict[str, list[dict]], bare_name: str, common: dict, n_items: int) -> list[dict]:
    """One row per measurement: median seconds over the quiet rounds (every measurement of the
    round had other-process cores <= QUIET; all rounds, flagged, when none was quiet),
    overhead = that median / the bare median - 1."""
    n_rounds = len(results[bare_name])
    quiet = [i for i in range(n_rounds) if all(r[i]["foreign_cores"] is not None and r[i]["foreign_cores"] <= QUIET for r in results.values())]
    used = quiet or list(range(n_rounds))
    bare_s = float(np.median([results[bare_name][i]["seconds"] for i in used]))
    rows = []
    for name, runs in results.items():
        seconds = float(np.median([runs[i]["seconds"] for i in used]))
        row = {"part": part, "what": name, **common, "items": n_items, "repeats": n_rounds, "rounds_used": [i + 1 for i in used], "noisy": not quiet}
        row["seconds"] = round(seconds, 3)
        row["items_per_s"] = round(n_items / seconds, 2)
        row["overhead"] = round(seconds / bare_s - 1, 4)
        row["per_repeat_s"] = [round(r["seconds"], 3) for r in runs]
        row["per_repeat_foreign_cores"] = [r["foreign_cores"] for r in runs]
        row["paired_overheads"] = [round(r["seconds"] / b["seconds"] - 1, 4) for r, b in zip(runs, results[bare_name])]
        row["foreign_cores"] = max((runs[i]["foreign_cores"] for i in used if runs[i]["foreign_cores"] is not None), default=None)
        for key in ("embed_stage_s", "pipeline_wall_s"):
            if key in runs[0]:
                row[key] = [round(r[key], 3) for r in runs]
        if "max_abs_diff_vs_bare" in runs[0]:
            row["max_abs_diff_vs_bare"] = max(r["max_abs_diff_vs_bare"] for r in runs)
        rows.append(row)
        print(f"  ({part}) {name}: {row['items_per_s']} items/s, overhead {row['overhead']:+.1%} (rounds {row['rounds_used']})", file=sys.stderr, flush=True)
    return rows


def part_b(ckpt: Path, work: Path, n_images: int, batch: int, seed: int, repeats: int, max_rounds: int) -> tuple[list[dict], bool]:
    images = jpeg_images(n_images, 256, seed)
    tar = work / "images" / "shard-00000.tar"
    tar.parent.mkdir(parents=True, exist_ok=True)
    write_webdataset(tar, images)
    base = {"input": [str(tar)], "modality": "image", "model": "ViT-B-16", "pretrained": str(ckpt), "precision": "bf16", "device": "cpu", "batch_size": batch}
    emb = load_embedder(RunConfig(output="y", **base), "image", "cpu")

    # Bare: the same batches of batch_size input rows, decoded and preprocessed beforehand
    # (timed apart, for reference: the work decode_workers move off the model's process).
    decoded: list[torch.Tensor] = []
    decode_s, decode_foreign = timed(lambda: decoded.extend(emb.preprocess(open_image(data)) for data in images))
    pixels = torch.stack(decoded)
    chunks = [pixels[i : i + batch].to(emb.dtype) for i in range(0, n_images, batch)]
    outputs: list[torch.Tensor] = []

    def bare():
        outputs.clear()
        with torch.inference_mode():
            for x in chunks:
                outputs.append(emb.model.encode_image(x))

    with torch.inference_mode():
        emb.model.encode_image(chunks[0])  # warm-up
    bare()
    reference = F.normalize(torch.cat(outputs).float(), dim=-1).numpy()

    def check(vectors: dict[str, np.ndarray]) -> float:
        if len(vectors) != n_images:
            return float("inf")
        return float(np.abs(np.stack([vectors[f"{i:09d}"] for i in range(n_images)]) - reference).max())  # ids: the sample keys

    measures = {"bare model.encode_image (pre-decoded)": bare_measure(bare)}
    for workers in (0, 2):
        cfg = RunConfig(output=str(work / f"run-images-w{workers}"), decode_workers=workers, **base)
        measures[f"run_pipeline embed stage, decode_workers={workers}"] = pipeline_measure(cfg, work / f"run-images-w{workers}", check)
    rows = summarise("b", interleaved(measures, repeats, max_rounds), "bare model.encode_image (pre-decoded)", {"precision": "bf16", "batch": batch}, n_images)
    ok = all(r.get("max_abs_diff_vs_bare", 0.0) < 1e-6 for r in rows)
    jpeg_kib = round(sum(len(b) for b in images) / len(images) / 1024, 1)
    for r in rows:
        r["mean_jpeg_kib"] = jpeg_kib
    rows.append(
        {"part": "b", "what": "decode + preprocess only (one process, serial)", "precision": "-", "batch": batch, "items": n_images,
         "repeats": 1, "seconds": round(decode_s, 3), "items_per_s": round(n_images / decode_s, 2),
         "overhead": None, "share_of_bare": round(decode_s / rows[0]["seconds"], 4), "foreign_cores": decode_foreign, "mean_jpeg_kib": jpeg_kib}
    )
    print(f"  (b) decode + preprocess: {rows[-1]['items_per_s']} images/s ({rows[-1]['share_of_bare']:.1%} of the bare model time)", file=sys.stderr, flush=True)
    return rows, ok


def part_c(work: Path, n_docs: int, seed: int, repeats: int, max_rounds: int) -> tuple[list[dict], bool]:
    docs = documents(n_docs, seed)
    path = work / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i:06d}", "text": t}) + "\n" for i, t in enumerate(docs)))
    output = work / "run-text"
    cfg = RunConfig(input=[str(path)], output=str(output), device="cpu")  # default model, fp32, batch 64
    emb = load_embedder(cfg, "text", "cpu")
    batch = cfg.batch_size

    # Bare: the embed stage's batches (length-sorted within chunks), tokenized beforehand (untimed).
    order: list[int] = []
    for lo in range(0, n_docs, TEXT_SORT_CHUNK):
        chunk = list(range(lo, min(lo + TEXT_SORT_CHUNK, n_docs)))
        order += [chunk[i] for i in np.argsort([len(docs[j]) for j in chunk], kind="stable")]
    picks = [order[b : b + batch] for b in range(0, n_docs, batch)]
    encoded = [emb.tokenizer([docs[i] for i in p], padding=True, truncation=True, max_length=emb.max_length, return_tensors="pt") for p in picks]
    tokens = sum(int(e["attention_mask"].sum()) for e in encoded)
    states: list[tuple[torch.Tensor, torch.Tensor]] = []

    def bare():
        states.clear()
        with torch.inference_mode():
            for e in encoded:
                states.append((emb.model(**e).last_hidden_state, e["attention_mask"]))

    with torch.inference_mode():
        emb.model(**encoded[0])  # warm-up
    bare()
    reference = np.zeros((n_docs, emb.dim), np.float32)
    for p, (hidden, mask) in zip(picks, states):
        m = mask.unsqueeze(-1).float()
        reference[p] = F.normalize((hidden.float() * m).sum(1) / m.sum(1), dim=-1).numpy()

    def check(vectors: dict[str, np.ndarray]) -> float:
        if len(vectors) != n_docs:
            return float("inf")
        return float(np.abs(np.stack([vectors[f"d{i:06d}"] for i in range(n_docs)]) - reference).max())

    measures = {
        "bare MiniLM forward (pre-tokenized)": bare_measure(bare),
        "run_pipeline embed stage (tokenize + forward + pool)": pipeline_measure(cfg, output, check),
    }
    rows = summarise("c", interleaved(measures, repeats, max_rounds), "bare MiniLM forward (pre-tokenized)", {"precision": "fp32", "batch": batch}, n_docs)
    for r in rows:
        r["tokens"] = tokens
    return rows, all(r.get("max_abs_diff_vs_bare", 0.0) < 1e-4 for r in rows)


def long_documents(n: int, seed: int) -> list[str]:
    """n distinct documents whose word counts are log-uniform in [40, 3000]."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(40), np.log(3000), n)).astype(int)
    return [f"{i}. " + " ".join(rng.choice(WORDS, size=int(k))).capitalize() + "." for i, k in enumerate(sizes)]


def part_d(work: Path, n_docs: int, seed: int, repeats: int, max_rounds: int) -> list[dict]:
    docs = long_documents(n_docs, seed)
    path = work / "long-docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"l{i:06d}", "text": t}) + "\n" for i, t in enumerate(docs)))
    configs = {mode: RunConfig(input=[str(path)], output=str(work / f"run-{mode}"), device="cpu", long_text=mode) for mode in ("truncate", "chunk")}
    windows = load_embedder(configs["chunk"], "text", "cpu").windows(docs)
    n_windows = {"truncate": n_docs, "chunk": len(windows.owner)}
    tokens = {"truncate": sum(len(w) for w, f in zip(windows.ids, np.r_[True, windows.owner[1:] != windows.owner[:-1]]) if f), "chunk": sum(len(w) for w in windows.ids)}

    def measure(cfg: RunConfig) -> callable:
        def run() -> dict:
            shutil.rmtree(cfg.output, ignore_errors=True)
            _, foreign = timed(lambda: run_pipeline(cfg))
            seconds, stage = embed_seconds(Path(cfg.output))
            return {"seconds": seconds, "embed_stage_s": stage, "foreign_cores": foreign}

        return run

    names = {"truncate": "embed stage, long_text=truncate (first window)", "chunk": "embed stage, long_text=chunk (all windows, pooled)"}
    results = interleaved({names[m]: measure(c) for m, c in configs.items()}, repeats, max_rounds)
    rows = summarise("d", results, names["truncate"], {"precision": "fp32", "batch": 64}, n_docs)
    for mode, row in zip(configs, rows):
        row.update(windows=n_windows[mode], tokens=tokens[mode], long_docs=int(windows.long.sum()), windows_per_s=round(n_windows[mode] / row["seconds"], 2))
        print(f"  (d) {mode}: {row['items_per_s']} docs/s, {row['windows_per_s']} windows/s ({n_windows[mode]} windows, {tokens[mode]} tokens)", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 1 timed batch, 32 images, 256 documents")
    p.add_argument("--batch", type=int, default=None, help="image batch size (default 32; quick 8)")
    p.add_argument("--batches", type=int, default=None, help="(a) timed batches per precision after one warm-up (default 3; quick 1)")
    p.add_argument("--images", type=int, default=None, help="(b) JPEGs in the tar (default 128; quick 32)")
    p.add_argument("--docs", type=int, default=None, help="(c) generated documents (default 2000; quick 256)")
    p.add_argument("--repeats", type=int, default=None, help="(b), (c): quiet interleaved rounds wanted, medians reported (default 2; quick 1)")
    p.add_argument("--max-rounds", type=int, default=None, help="(b), (c): rounds at most while waiting for quiet ones (default repeats + 2)")
    p.add_argument("--long-docs", type=int, default=None, help="(d) generated long documents (default 48; quick 12)")
    p.add_argument("--part", default="abcd", help="which parts to run, e.g. 'ab' (default abcd)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default os.cpu_count())")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    p.add_argument("--workdir", default=None, help="folder for the checkpoint, inputs and runs (default: a temporary folder, removed)")
    p.add_argument("--out", default="/tmp/bench_embedding.json", help="JSON results path (default /tmp/bench_embedding.json)")
    args = p.parse_args(argv)
    batch = args.batch or (8 if args.quick else 32)
    batches = args.batches or (1 if args.quick else 3)
    n_images = args.images or (32 if args.quick else 128)
    n_docs = args.docs or (256 if args.quick else 2000)
    n_long_docs = args.long_docs or (12 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 2)
    max_rounds = max(repeats, args.max_rounds or repeats + 2)
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notice for the random model

    info = machine_info()
    print(f"# {info['cpu_model']}, {info['cores']} cores, torch threads {threads}; load average at start {info['loadavg_start']}", file=sys.stderr)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-embedding-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    ok = True
    started = time.perf_counter()
    rss: dict[str, float | None] = {}  # peak RSS (MiB) of this process per phase
    try:
        ckpt = work / "vit-b-16-random.safetensors"
        if "a" in args.part or "b" in args.part:
            import open_clip
            from safetensors.torch import save_file

            torch.manual_seed(args.seed)
            model, _, _ = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
            del model
        rss["setup"] = peak_rss_mib()  # imports (+ the random checkpoint's creation)
        for part in "abcd":
            if part not in args.part:
                continue
            reset_peak_rss()
            if part == "a":
                rows += part_a(ckpt, batch, batches)
            elif part == "d":
                rows += part_d(work, n_long_docs, args.seed, repeats, max_rounds)
            else:
                part_rows, part_ok = part_b(ckpt, work, n_images, batch, args.seed, repeats, max_rounds) if part == "b" else part_c(work, n_docs, args.seed, repeats, max_rounds)
                rows += part_rows
                ok &= part_ok
            rss[part] = peak_rss_mib()
        rss["process"] = max((v for v in rss.values() if v is not None), default=None)
        rss["largest_child"] = children_peak_rss_mib()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    unit = {"a": "images/s", "b": "images/s", "c": "docs/s", "d": "docs/s"}
    print_table(
        ["part", "measurement", "precision", "batch", "items", "seconds", "throughput", "overhead vs bare", "other-process cores"],
        [
            [
                r["part"],
                r["what"],
                r["precision"],
                r["batch"],
                r.get("items", r["batch"] * r.get("batches", 1)),
                f"{r['seconds']:.2f}",
                f"{r['items_per_s']} {unit[r['part']]}" + (f", {r['windows_per_s']} windows/s" if "windows_per_s" in r else ""),
                "–" if r.get("overhead") is None else f"{r['overhead']:+.1%}",
                f"{r['foreign_cores']}" + (" (no quiet round)" if r.get("noisy") else ""),
            ]
            for r in rows
        ],
    )
    bf = {r["precision"]: r["items_per_s"] for r in rows if r["part"] == "a"}
    d = {r["what"]: r for r in rows if r["part"] == "d"}
    if len(d) == 2:
        trunc, chunk = d.values()
        print(f"chunk / truncate embedding time: {chunk['seconds'] / trunc['seconds']:.2f}x for {chunk['windows'] / trunc['windows']:.2f}x the windows")
    if "fp32" in bf and "bf16" in bf:
        print(f"bf16 / fp32 speed-up (ViT-B-16): {bf['bf16'] / bf['fp32']:.2f}x")
    print(f"peak RSS (MiB): {json.dumps(rss)}")
    if not ok:
        print("MISMATCH: pipeline embeddings differ from the bare forward's", file=sys.stderr)
    write_json(
        args.out,
        {
            "machine": info,
            "versions": {**versions(), **{name: md.version(name) for name in ("open_clip_torch", "transformers")}},
            "threads": threads,
            "quick": args.quick,
            "weights": "random (open_clip ViT-B-16, pretrained=None, seeded): same architecture and FLOPs as laion2b_s34b_b88k",
            "rows": rows,
            "peak_rss_mib": rss,
            "embeddings_match_bare": ok,
            "total_seconds": round(time.perf_counter() - started, 1),
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
