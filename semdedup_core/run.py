"""The run contract: validate everything before work, record it in ``run.json``, resume safely."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import platform
import posixpath
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import BaseModel

from .config import ConfigError, RunConfig
from .kernel import resolve_device
from .layout import RunLayout
from .lease import check_free
from .raw_sources import RAW_FORMATS, RawShard, detect_format, discover_raw_shards
from .sources import InputError, Shard, check_unique_ids, discover_shards
from .storage import exists, filesystem, read_json, uses_temp_files, write_json

RUN_FORMAT_VERSION = 1
MAX_BUCKETS = 1000  # Prefect's server degrades past a few thousand mapped runs
TARGET_BUCKET_BYTES = 128 * 2**20


# What on_existing='reuse-embeddings' keeps of an earlier run.
EMBEDDING_ARTIFACTS = ("scan", "exact", "embeddings")


class RunPlan(BaseModel):
    """What every stage needs to know about the run; small enough to pass between tasks.

    For raw inputs the plan starts with ``sources`` only; after the embedding stage
    :func:`semdedup_core.embedding.plan_embedded` fills in the run's own embeddings as
    ``shards`` and the sizes that depend on them (n_input, dim, clusters, buckets).
    """

    config: RunConfig
    input_format: str
    shards: list[Shard]
    sources: list[RawShard] = []
    embedder: dict | None = None  # raw inputs: modality, model name, pretrained, precision
    n_input: int
    dim: int
    clusters: int
    buckets: int
    device: str

    @property
    def embeds(self) -> bool:
        return bool(self.sources)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.config.output)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("semdedup", "numpy", "pyarrow", "torch", "faiss-cpu", "faiss-gpu", "prefect", "fsspec", "s3fs", "open_clip_torch", "transformers", "torchvision"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def default_buckets(n_items: int, dim: int, clusters: int) -> int:
    """Enough buckets that one holds ~128 MiB of vectors, within [1, min(k, 1000)]."""
    wanted = math.ceil(n_items * dim * 4 / TARGET_BUCKET_BYTES)
    return max(1, min(wanted, clusters, MAX_BUCKETS))


def plan_run(cfg: RunConfig) -> RunPlan:
    """Every check that can fail before work: inputs, ids, dimensions, k, device, an existing run."""
    try:
        device = str(resolve_device(cfg.device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    fmt = detect_format(cfg)
    if fmt in RAW_FORMATS:
        plan = _plan_raw(cfg, fmt, device)
    else:
        if cfg.model is not None:
            raise ConfigError(f"the input holds precomputed embeddings ({fmt}); --model is only used for raw images or text")
        if fmt == "clip-retrieval" and (cfg.write_dataset or cfg.write_removed):
            raise ConfigError("writing the dataset back is not supported for clip-retrieval inputs (they hold no items, only embeddings)")
        shards = discover_shards(cfg)
        check_unique_ids(shards)
        n_input = sum(s.n_rows for s in shards)
        dim = next(s.dim for s in shards if s.n_rows)
        k = cfg.clusters_for(n_input)
        buckets = cfg.buckets if cfg.buckets is not None else default_buckets(n_input, dim, k)
        if buckets > k:
            raise ConfigError(f"buckets={buckets} is larger than clusters={k}")
        plan = RunPlan(config=cfg, input_format=fmt, shards=shards, n_input=n_input, dim=dim, clusters=k, buckets=buckets, device=device)
    check_free(plan.layout.lease)
    if cfg.on_existing != "fresh":
        plan = restart_after_refusal(plan)
    if plan.config.on_existing != "fresh":
        check_resumable(plan)
    return plan


def _plan_raw(cfg: RunConfig, fmt: str, device: str) -> RunPlan:
    """Raw inputs: the shards and a loadable model; sizes come after the embedding stage."""
    from .embedders import load_embedder, model_spec

    sources = discover_raw_shards(cfg, fmt)
    modalities = {s.modality for s in sources}
    if len(modalities) > 1:
        image = next(s for s in sources if s.modality == "image")
        text = next(s for s in sources if s.modality == "text")
        raise InputError(f"{image.url} holds images but {text.url} holds text; run them separately or set --modality")
    modality = modalities.pop()
    if cfg.keep == "metadata" and fmt == "images":
        raise ConfigError("keep='metadata' needs metadata columns, which image folders do not have")
    load_embedder(cfg, modality, device)  # a model that cannot load fails here, before any work
    spec = model_spec(cfg, modality, device)
    embedder = {"modality": spec.modality, "model": spec.name, "pretrained": spec.pretrained, "precision": spec.precision}
    return RunPlan(config=cfg, input_format=fmt, shards=[], sources=sources, embedder=embedder, n_input=0, dim=0, clusters=0, buckets=0, device=device)


def start_run(plan: RunPlan) -> None:
    """Under the lease: clear the output if asked to start fresh, drop interrupted temp files
    from a killed run, and write run.json."""
    layout = plan.layout
    fs, root = filesystem(layout.root)
    mode = plan.config.on_existing
    if mode in ("fresh", "reuse-embeddings") and fs.exists(root):
        keep = {posixpath.basename(layout.lease)} | (set(EMBEDDING_ARTIFACTS) if mode == "reuse-embeddings" else set())
        for entry in fs.ls(root, detail=False):
            if posixpath.basename(entry.rstrip("/")) not in keep:
                fs.rm(entry, recursive=True)
    if uses_temp_files(fs) and fs.exists(root):
        for leftover in fs.glob(posixpath.join(root, "**", "*.tmp-*")):
            fs.rm(leftover)
    write_run_json(plan)


def record_refusal(plan: RunPlan, reason: str) -> None:
    """Mark the run as stopped on what its data turned out to hold (k larger than the valid
    items, nothing usable, duplicate ids), so that a corrected re-run may change the config."""
    state = read_json(plan.layout.run_json)
    state["refused"] = {"reason": reason, "at": _now()}
    write_json(plan.layout.run_json, state)


def restart_after_refusal(plan: RunPlan) -> RunPlan:
    """A refused run re-run with another configuration keeps its embeddings when they still
    apply (same input and embedding options), else starts fresh."""
    layout = plan.layout
    if not exists(layout.run_json):
        return plan
    previous = read_json(layout.run_json)
    if not previous.get("refused") or previous.get("config") == plan.config.result_fields():
        return plan
    old = previous.get("config", {})
    same_embeddings = all(old.get(k) == v for k, v in plan.config.embedding_fields().items()) and previous.get("sources") == [
        s.model_dump() for s in plan.sources
    ]
    mode = "reuse-embeddings" if plan.embeds and same_embeddings else "fresh"
    return plan.model_copy(update={"config": plan.config.model_copy(update={"on_existing": mode})})


def check_resumable(plan: RunPlan) -> None:
    """An existing run at the output must have been started with the same result-defining
    config (with on_existing='reuse-embeddings': the same embedding-defining config)."""
    layout = plan.layout
    if not exists(layout.run_json):
        return
    previous = read_json(layout.run_json)
    reuse = plan.config.on_existing == "reuse-embeddings"
    old = previous.get("config", {})
    new = plan.config.embedding_fields() if reuse else plan.config.result_fields()
    if reuse:
        old = {k: v for k, v in old.items() if k in new}
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if plan.embeds:
        if previous.get("sources") != [s.model_dump() for s in plan.sources]:
            differing.append("input shards")
    elif previous.get("shards") != [s.model_dump() for s in plan.shards]:
        differing.append("input shards")
    if differing:
        hint = "use another --output, or --fresh to start over" if reuse else "use another --output, --reuse-embeddings to keep only its embeddings, or --fresh to start over"
        raise ConfigError(f"{plan.config.output} holds a run with a different configuration ({', '.join(differing)}); {hint}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_run_json(plan: RunPlan) -> None:
    """run.json: config (no secrets: the config holds none), versions, seeds, stage status.

    Stage status already recorded by an earlier (interrupted) run is kept.
    """
    layout = plan.layout
    previous = read_json(layout.run_json) if exists(layout.run_json) else {}
    write_json(
        layout.run_json,
        {
            "format_version": RUN_FORMAT_VERSION,
            "created": previous.get("created", _now()),
            "updated": _now(),
            "config": plan.config.result_fields(),
            "execution": {"device": plan.device, "tile_size": plan.config.tile_size, "workers": plan.config.workers},
            "seeds": {"seed": plan.config.seed},
            "n_input": plan.n_input,
            "dim": plan.dim,
            "clusters": plan.clusters,
            "buckets": plan.buckets,
            "input_format": plan.input_format,
            "embedder": plan.embedder,
            "sources": [s.model_dump() for s in plan.sources],
            "shards": [s.model_dump() for s in plan.shards],
            "versions": package_versions(),
            "stages": previous.get("stages", {}),
            "parent_run": None,
        },
    )


def record_stage(plan: RunPlan, stage: str, seconds: float) -> None:
    """Mark a stage complete in run.json (called by the orchestrator, never by mapped units)."""
    layout = plan.layout
    state = read_json(layout.run_json)
    state["stages"][stage] = {"status": "done", "seconds": round(seconds, 3), "at": _now()}
    state["updated"] = _now()
    write_json(layout.run_json, state)


class StageClock:
    """Wall time of each stage (waiting on mapped work included), recorded in run.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, plan: RunPlan | None = None) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        if plan is not None:
            record_stage(plan, name, self.seconds[name])
