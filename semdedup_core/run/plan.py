"""The run contract: validate everything before work, record it in ``run.json``, resume safely."""

from __future__ import annotations

import datetime as _dt
import fnmatch
import functools
import importlib.metadata
import math
import os
import platform
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydantic import BaseModel, ConfigDict

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.layout import ARTIFACT_FOLDERS, EMBEDDING_FOLDERS, RunLayout, is_artifact, is_temp_artifact
from semdedup_core.run.lease import check_free, read_lease
from semdedup_core.inputs.datasets import RAW_FORMATS, RawShard, detect_format, discover_raw_shards
from semdedup_core.inputs.precomputed import InputError, Shard, check_unique_ids, discover_shards, parquet_objects
from semdedup_core.storage import (
    bucket_exists,
    digest,
    exists,
    filesystem,
    fingerprints,
    has_buckets,
    path_kind,
    read_bytes,
    read_json,
    uses_temp_files,
    with_retries,
    write_bytes,
    write_json,
)

RUN_FORMAT_VERSION = 1
MAX_BUCKETS = 1000  # Prefect's server degrades past a few thousand mapped runs
TARGET_BUCKET_BYTES = 128 * 2**20
_GLOB_CHARS = "*?["
_COLLECTION_RUN = re.compile(r"generations/g-\d{5,}/")


class PlanRef(BaseModel):
    """A stored run plan, by content: what tasks receive instead of the plan itself, whose
    shard lists grow with the input (an image folder's plan names every file)."""

    model_config = ConfigDict(frozen=True)

    output: str
    digest: str
    storage_block: str | None = None  # where the credentials to read it come from


class RunPlan(BaseModel):
    """What every stage needs to know about the run; small enough to pass between tasks.

    For raw inputs the plan starts with ``sources`` only; after the embedding stage
    :func:`semdedup_core.embedding.stage.plan_embedded` fills in the run's own embeddings as
    ``shards`` and the sizes that depend on them (n_input, dim, clusters, buckets).
    """

    config: RunConfig
    input_format: str
    shards: list[Shard]
    sources: list[RawShard] = []
    embedder: dict | None = None  # raw inputs: modality, model name, pretrained, precision
    # Input object (or image shard, see image_shard_key) -> what it looked like when planned:
    # a resume over an input rewritten since is refused.
    fingerprints: dict[str, str] = {}
    # A generation of a collection (docs/architecture.md §"Collections"): the earlier runs
    # since the collection's base, base first, whose items the new ones are judged against.
    earlier: list[PlanRef] = []
    # Reference sets (docs/architecture.md §"Reference sets"): one plan each, rooted in the run.
    references: list[RunPlan] = []
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
        return RunLayout(self.config.output, self.config.rethreshold_of)


def store_plan(plan: RunPlan) -> PlanRef:
    """Write the plan once under plans/ (content-addressed) and return its reference."""
    text = plan.model_dump_json()
    ref = PlanRef(output=plan.config.output, digest=digest([text]), storage_block=plan.config.storage_block)
    url = plan.layout.plan(ref.digest)
    if not exists(url):
        write_bytes(url, text.encode())
    return ref


@functools.lru_cache(maxsize=8)
def load_plan(ref: PlanRef) -> RunPlan:
    """The plan a reference names, read once per process (its digest pins its content)."""
    return RunPlan.model_validate_json(read_bytes(RunLayout(ref.output).plan(ref.digest)))


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
    """Every check that can fail before work: the output, inputs, ids, dimensions, k, device,
    an existing run. For a collection, the plan of its next generation."""
    if cfg.collection:
        from semdedup_core.run.collection import plan_generation

        return plan_generation(cfg)
    if cfg.rethreshold_of is not None:
        from semdedup_core.run.rethreshold import plan_rethreshold

        return plan_rethreshold(cfg)
    check_output(cfg)
    plan = plan_inputs(cfg)
    if cfg.reference:
        from semdedup_core.dedup.reference import with_references

        plan = with_references(plan)
    return check_existing_run(plan)


# Given every input object's fingerprint (object -> fingerprint), the objects to plan.
ObjectSelector = Callable[[dict[str, str]], list[str]]


def plan_inputs(cfg: RunConfig, select: ObjectSelector | None = None) -> RunPlan:
    """The inputs' shards, sizes, device and fingerprints (nothing about the output).

    ``select`` (a collection's generation: the objects not processed yet) sees the listed
    objects' fingerprints first; only the objects it returns are opened, and a raw input's
    model is loaded only when it returns some.
    """
    from semdedup_core.dedup.kernel import resolve_device  # torch: imported only when a run is planned

    try:
        device = str(resolve_device(cfg.device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    fmt = detect_format(cfg)
    if fmt in RAW_FORMATS:
        plan = _plan_raw(cfg, fmt, device, select)
    else:
        if cfg.model is not None:
            raise ConfigError(f"the input holds precomputed embeddings ({fmt}); --model is only used for raw images or text")
        if fmt == "clip-retrieval" and (cfg.write_dataset or cfg.write_removed):
            raise ConfigError("writing the dataset back is not supported for clip-retrieval inputs (they hold no items, only embeddings)")
        if select is not None and fmt == "clip-retrieval":  # its objects come in pairs (vectors, metadata) found by discovery
            everything = discover_shards(cfg)
            keep = set(select(input_fingerprints([], everything)))
            shards = [s.model_copy(update={"index": i}) for i, s in enumerate(s for s in everything if s.url in keep)]
        elif select is not None:  # parquet files: listed and fingerprinted, and only the selected ones opened
            listed = [url for entry in cfg.input for url in parquet_objects(entry)]
            if len(set(listed)) < len(listed):
                twice = next(url for url in listed if listed.count(url) > 1)
                raise InputError(f"{twice}: listed twice in the inputs")
            shards = discover_shards(cfg, only=set(select(fingerprints(listed))))
        else:
            shards = discover_shards(cfg)
        check_unique_ids(shards)
        n_input = sum(s.n_rows for s in shards)
        dim = next((s.dim for s in shards if s.n_rows), 0)
        if select is not None:  # a generation: k and the buckets are its base's, however few the new items
            k, buckets = cfg.clusters or 0, cfg.buckets or 0
        else:
            k = cfg.clusters_for(n_input)
            buckets = cfg.buckets if cfg.buckets is not None else default_buckets(n_input, dim, k)
        if buckets > k:
            raise ConfigError(f"buckets={buckets} is larger than clusters={k}")
        plan = RunPlan(config=cfg, input_format=fmt, shards=shards, n_input=n_input, dim=dim, clusters=k, buckets=buckets, device=device)
    return plan.model_copy(update={"fingerprints": input_fingerprints(plan.sources, plan.shards)})


def check_existing_run(plan: RunPlan) -> RunPlan:
    """An existing run at the plan's output: free, and resumable (or restarted after a refusal)."""
    cfg = plan.config
    check_free(plan.layout.lease)
    if cfg.on_existing != "fresh":
        plan = restart_after_refusal(plan)
    if plan.config.on_existing != "fresh":
        check_resumable(plan)
    return plan


def _plan_raw(cfg: RunConfig, fmt: str, device: str, select: ObjectSelector | None = None) -> RunPlan:
    """Raw inputs: the shards and a loadable model; sizes come after the embedding stage."""
    from semdedup_core.embedding.models import load_embedder, model_spec

    sources = discover_raw_shards(cfg, fmt)
    if select is not None:
        keep = set(select(input_fingerprints(sources, [])))
        sources = [s for s in sources if (image_shard_key(s) if s.kind == "images" else s.url) in keep]
        sources = [s.model_copy(update={"index": i}) for i, s in enumerate(sources)]
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


def image_shard_key(shard: RawShard) -> str:
    """Image folders are cut into several shards under one URL: one key per shard."""
    return f"{shard.url}#shard-{shard.index:05d}"


def input_fingerprints(sources: list[RawShard], shards: list[Shard]) -> dict[str, str]:
    """What each input object looks like now (see :func:`semdedup_core.storage.fingerprints`):
    the raw ``sources`` when there are any, else the precomputed ``shards``; an image shard
    gets one digest over its files' paths and fingerprints."""
    if sources:
        single = [s.url for s in sources if s.kind != "images"]
        files = [f for s in sources if s.kind == "images" for f in s.files]
    else:
        single = [u for s in shards for u in (s.url, s.metadata_url) if u]
        files = []
    found = fingerprints(single + files)
    out = {url: found[url] for url in single}
    for s in sources:
        if s.kind == "images":
            out[image_shard_key(s)] = digest([f"{f} {found[f]}" for f in s.files])
    return out


# ---------------------------------------------------------------- the output folder


def check_output(cfg: RunConfig) -> None:
    """Refuse, before anything is written, an output that overlaps an input, is a file, cannot
    be written, lies in a bucket that does not exist, or is a folder holding files that are
    not a run of ours."""
    _refuse_overlap(cfg)
    fs, root = filesystem(cfg.output)
    if uses_temp_files(fs):
        _check_local_output(cfg.output, root)
    else:
        if has_buckets(fs) and not bucket_exists(cfg.output):
            bucket = root.split("/", 1)[0]
            raise ConfigError(f"--output {cfg.output}: bucket {bucket!r} does not exist (buckets are never created; create it or fix the name)")
        if path_kind(cfg.output) == "file":
            raise ConfigError(f"--output {cfg.output} is a file, not a folder")
    _refuse_foreign_folder(cfg, fs, root)


def _check_local_output(output: str, path: str) -> None:
    """The output is a folder or does not exist yet, and the nearest existing folder is writable."""
    probe = path
    while not os.path.lexists(probe) and posixpath.dirname(probe) != probe:
        probe = posixpath.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"lies under {probe}, which is a file"
        raise ConfigError(f"--output {output} {where}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: {probe} is not writable")


def _location(url: str, pattern: bool) -> tuple[str, list[str], bool]:
    """(storage family, normalised path components, whether they hold glob patterns): local
    paths resolved through symlinks, object-store paths as bucket/key."""
    fs, path = filesystem(url)
    globbed = pattern and any(ch in path for ch in _GLOB_CHARS) and path_kind(url) is None
    parts = [p for p in path.split("/") if p]
    if not uses_temp_files(fs):
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        return protocols[0], parts, globbed
    static = next((i for i, p in enumerate(parts) if globbed and any(ch in p for ch in _GLOB_CHARS)), len(parts))
    resolved = os.path.realpath("/" + "/".join(parts[:static]))
    return "file", [p for p in resolved.split("/") if p] + parts[static:], globbed


def _may_overlap(pattern: list[str], globbed: bool, output: list[str]) -> bool:
    """Whether the output is, holds, or lies inside something the input names (a file, a folder
    searched recursively, or anything a listing of the glob can pick up now or later)."""
    recursive = next((i for i, p in enumerate(pattern) if globbed and "**" in p), None)
    fixed = pattern[:recursive] if recursive is not None else pattern
    for want, have in zip(fixed, output):
        if not (fnmatch.fnmatchcase(have, want) if globbed else have == want):
            return False
    return True


def overlaps_output(entry: str, output: str) -> bool:
    """Whether the input URL or glob ``entry`` is, holds, or lies inside the folder ``output``."""
    family, output_parts, _ = _location(output, pattern=False)
    entry_family, parts, globbed = _location(entry, pattern=True)
    return entry_family == family and _may_overlap(parts, globbed, output_parts)


def _refuse_overlap(cfg: RunConfig) -> None:
    for entry in cfg.input:
        if overlaps_output(entry, cfg.output):
            raise ConfigError(
                f"--output {cfg.output} overlaps the input {entry} (it is, holds, or lies inside what the input reads); choose an output folder outside the input"
            )


def is_run_record(record: object) -> bool:
    """Whether a parsed run.json was written by a run of ours."""
    return (
        isinstance(record, dict)
        and record.get("format_version") == RUN_FORMAT_VERSION
        and isinstance(record.get("config"), dict)
        and isinstance(record.get("stages"), dict)
        and isinstance(record.get("shards"), list)
    )


def read_run_record(url: str) -> dict | None:
    """The run.json at ``url`` if a run of ours wrote it; None if absent or not ours."""
    try:
        record = read_json(url)
    except (FileNotFoundError, ValueError):
        return None
    return record if is_run_record(record) else None


def _files_under(fs, root: str) -> list[str]:
    """Every file under ``root``, relative to it."""
    found = with_retries("list", root, lambda: fs.find(root))
    prefix = root.rstrip("/") + "/"
    return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))


def _refuse_foreign_folder(cfg: RunConfig, fs, root: str) -> None:
    """An existing output must be a run of ours, or hold nothing but what a run of ours leaves
    before its run.json (a lease, temporary files)."""
    layout = RunLayout(cfg.output)
    if not cfg.collection and read_run_record(layout.run_json) is not None:
        return
    lease = read_lease(layout.lease)
    others = [f for f in _files_under(fs, root) if not is_temp_artifact(f) and not (f == "lease.json" and lease and "owner" in lease)]
    if cfg.collection:  # a collection holds its record and its generations' run folders
        others = [f for f in others if f != "collection.json" and not _COLLECTION_RUN.match(f)]
    if not others:
        return
    example = f"{len(others)} files, e.g. {others[0]}" if len(others) > 1 else others[0]
    if cfg.on_existing == "resume":
        raise ConfigError(f"--output {cfg.output} is not empty and holds no semdedup run ({example}); choose an empty or new folder")
    flag = "--fresh" if cfg.on_existing == "fresh" else "--reuse-embeddings"
    raise ConfigError(
        f"--output {cfg.output} holds no semdedup run ({example}); {flag} deletes only a run's own files, so nothing was deleted: choose an empty or new folder"
    )


def _dataset_names(*records: dict) -> frozenset[str]:
    """The file names a run writes back under dataset/ and removed/: its inputs' names."""
    names: set[str] = set()
    for record in records:
        sources = record.get("sources") or []
        entries = [s for s in sources if s.get("kind") != "images"] if sources else record.get("shards") or []
        names |= {posixpath.basename(str(e.get("url", "")).rstrip("/")) for e in entries if isinstance(e, dict)}
    return frozenset(names)


def start_run(plan: RunPlan) -> None:
    """Under the lease: clear an earlier run of ours if asked to start fresh, drop temporary
    files an interrupted write of ours left, and write run.json."""
    layout = plan.layout
    fs, root = filesystem(layout.root)
    mode = plan.config.on_existing
    previous = read_run_record(layout.run_json)
    current = {"sources": [s.model_dump() for s in plan.sources], "shards": [s.model_dump() for s in plan.shards]}
    names = _dataset_names(current, *([previous] if previous else []))
    restart = mode in ("fresh", "reuse-embeddings") and previous is not None
    if restart:
        _clear_run(fs, root, names, keep_embeddings=mode == "reuse-embeddings")
    if uses_temp_files(fs):
        _drop_temp_files(root, names)
    write_run_json(plan, restart=restart)


def _clear_run(fs, root: str, names: frozenset[str], keep_embeddings: bool) -> None:
    """Delete the artifacts of the earlier run (never run.json, rewritten next, nor the lease;
    nothing that is not of our layout). Completion markers go first, so a crash half-way
    leaves unfinished units, never finished-looking ones without their data."""
    ours = [
        f
        for f in _files_under(fs, root)
        if f not in ("run.json", "lease.json")
        and (is_artifact(f, names) or is_temp_artifact(f, names))
        and not (keep_embeddings and f.split("/", 1)[0] in EMBEDDING_FOLDERS)
        and not (uses_temp_files(fs) and _through_a_link(root, f))
    ]
    for batch in ([f for f in ours if f.endswith(".json")], [f for f in ours if not f.endswith(".json")]):
        if batch:
            paths = [f"{root.rstrip('/')}/{f}" for f in batch]
            with_retries("delete", f"{root} ({len(paths)} files of the earlier run)", lambda paths=paths: fs.rm(paths))
    if uses_temp_files(fs):
        for folder in ARTIFACT_FOLDERS:
            try:
                os.rmdir(posixpath.join(root, folder))
            except OSError:
                pass  # absent, or holding files that are not ours


def _through_a_link(root: str, relative: str) -> bool:
    """Whether a local file's folder is reached through a symlink (it may hold anyone's files)."""
    folder = posixpath.dirname(relative)
    real_root = os.path.realpath(root)
    return os.path.realpath(posixpath.join(root, folder)) != (posixpath.join(real_root, folder) if folder else real_root)


def _drop_temp_files(root: str, names: frozenset[str]) -> None:
    """Temporary files a killed write of ours left, in the folders we write to only."""
    for folder in ("", *ARTIFACT_FOLDERS):
        directory = posixpath.join(root, folder) if folder else root
        if folder and _through_a_link(root, posixpath.join(folder, "x")):
            continue
        try:
            entries = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in entries:
            if is_temp_artifact(posixpath.join(folder, name), names):
                try:
                    os.unlink(posixpath.join(directory, name))
                except FileNotFoundError:
                    pass


def record_refusal(plan: RunPlan, reason: str) -> None:
    """Mark the run as stopped on what its data turned out to hold (k larger than the valid
    items, nothing usable, duplicate ids), so that a corrected re-run may change the config."""
    state = read_json(plan.layout.run_json)
    state["refused"] = {"reason": reason, "at": _now()}
    write_json(plan.layout.run_json, state)


@contextmanager
def refusals_recorded(plan: RunPlan) -> Iterator[None]:
    """Around the stages after the run started: a refusal only the data could tell is
    recorded in run.json, so that a corrected re-run may change the configuration."""
    try:
        yield
    except (ConfigError, InputError) as exc:
        record_refusal(plan, str(exc))
        raise


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
    same_embeddings = (
        all(old.get(k) == v for k, v in plan.config.embedding_fields().items())
        and previous.get("sources") == [s.model_dump() for s in plan.sources]
        and previous.get("fingerprints") == plan.fingerprints
    )
    mode = "reuse-embeddings" if plan.embeds and same_embeddings else "fresh"
    return plan.model_copy(update={"config": plan.config.model_copy(update={"on_existing": mode})})


def check_resumable(plan: RunPlan) -> None:
    """An existing run at the output must have been started with the same result-defining
    config (with on_existing='reuse-embeddings': the same embedding-defining config) on the
    same, unchanged input objects."""
    layout = plan.layout
    previous = read_run_record(layout.run_json)
    if previous is None:
        return
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
    recorded = previous.get("fingerprints") or {}
    changed = [key for key, now in plan.fingerprints.items() if key in recorded and recorded[key] != now]
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(
            f"input {_describe_input(plan, changed[0])}{more} changed since the run at {plan.config.output} read it; "
            "its results would be stale: use --fresh to redo the run on the new input, or another --output"
        )


def _describe_input(plan: RunPlan, key: str) -> str:
    for s in plan.sources:
        if s.kind == "images" and image_shard_key(s) == key:
            return f"{s.url} (image files {s.files[0]} .. {s.files[-1]})"
    return key


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_run_json(plan: RunPlan, restart: bool = False) -> None:
    """run.json: config (no secrets: the config holds none), versions, seeds, input
    fingerprints, stage status.

    Stage status already recorded by an earlier (interrupted) run is kept, unless the run
    starts over (``restart``).
    """
    layout = plan.layout
    previous = {} if restart else (read_run_record(layout.run_json) or {})
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
            "fingerprints": plan.fingerprints,
            "versions": package_versions(),
            "stages": previous.get("stages", {}),
            "parent_run": plan.config.rethreshold_of,
        },
    )


class StageClock:
    """Wall time of each stage (waiting on mapped work included)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)

    def record(self, plan: RunPlan) -> None:
        """Every stage done, in run.json: one rewrite at the end of the run (the units'
        markers are what resume reads)."""
        state = read_json(plan.layout.run_json)
        at = _now()
        state["stages"].update({name: {"status": "done", "seconds": seconds, "at": at} for name, seconds in self.seconds.items()})
        state["updated"] = at
        write_json(plan.layout.run_json, state)
