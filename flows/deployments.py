"""The flow entrypoint for deployments: RunConfig's options as a few groups, for the UI.

``semdedup_curate`` takes the options as nested objects (input, storage, model, dedup,
tuning, collection), so Prefect's parameter form shows one section per group with the real
defaults. It builds a RunConfig and runs ``semdedup_flow``'s own body, so the DAG and its
executor are described once (docs/architecture.md §"The DAG", §"Executors").

Every field except the threshold is RunConfig's own field (type, default, bounds,
description), so the groups cannot drift from the config. The threshold is a choice of one
of two objects, each with ``additionalProperties: false``: a fixed eps (default 0.05) or a
target kept fraction with its tuning options. The Prefect server validates parameters
against this JSON schema when a flow run is created (deployments enforce their parameter
schema), so eps together with target_keep is refused there, before any worker sees the run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from prefect import flow
from semdedup_core.config import DEFAULT_EPS, ConfigError, RunConfig, describe_validation_error
from semdedup_core.run.stage_results import RunSummary
from flows.dedup_flow import semdedup_flow

_GROUP_CONFIG = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _group(name: str, title: str, description: str, fields: dict[str, str], **extra: Any) -> type[BaseModel]:
    """A model whose fields are RunConfig's (``{field in the group: RunConfig field}``)."""
    own = {field: _field(config_field) for field, config_field in fields.items()}
    return create_model(name, __config__=ConfigDict(_GROUP_CONFIG, title=title), __doc__=description, **extra, **own)


def _field(name: str) -> tuple[Any, FieldInfo]:
    """RunConfig's field, its default made explicit so the form shows it (JSON schema
    leaves out defaults that come from a factory)."""
    field = RunConfig.model_fields[name]
    if field.default_factory is not None:
        field = FieldInfo.merge_field_infos(field, default=field.default_factory(), default_factory=None)
    return field.annotation, field


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


class FixedEps(BaseModel):
    """Remove an item when its similarity to an earlier item exceeds 1 - eps."""

    model_config = ConfigDict(_GROUP_CONFIG, title="Fixed eps")
    eps: float = Field(DEFAULT_EPS, gt=0, lt=1, description=RunConfig.model_fields["eps"].description)


TargetKeep = _group(
    "TargetKeep",
    "Target kept fraction",
    "Pick eps so that this fraction of the judged items is kept.",
    _same("tuning", "tuning_cluster_fraction", "tuning_min_items"),
    target_keep=(float, Field(gt=0, lt=1, description=RunConfig.model_fields["target_keep"].description)),
)

InputOptions = _group(
    "InputOptions",
    "Input",
    "What to deduplicate.",
    {"urls": "input", **_same("format", "id_column", "embedding_column", "modality", "text_column", "image_column", "reference")},
)
StorageOptions = _group(
    "StorageOptions",
    "Storage",
    "Where the run writes, and what else it writes.",
    _same("output", "on_existing", "storage_block", "write_dataset", "write_removed"),
)
ModelOptions = _group(
    "ModelOptions",
    "Model",
    "The embedding model, for raw images or text (unused for precomputed embeddings).",
    _same("model", "pretrained", "pooling", "max_length", "long_text", "precision"),
)
DedupOptions = _group(
    "DedupOptions",
    "Dedup",
    "How duplicates are decided.",
    _same("keep", "metadata_columns", "exact_dedup", "clusters", "kmeans_method", "kmeans_points_per_centroid", "kmeans_iterations", "seed"),
    threshold=(FixedEps | TargetKeep, Field(FixedEps(), description="A fixed eps, or the kept fraction to tune eps for (not both).")),
)
TuningOptions = _group(
    "TuningOptions",
    "Tuning",
    "Speed and memory only: these never change what is decided.",
    _same("device", "workers", "threads_per_task", "tile_size", "buckets", "batch_size", "decode_workers"),
)
CollectionOptions = _group(
    "CollectionOptions",
    "Collection",
    "Recurring curation: each run adds the input objects not processed before to the collection at storage.output.",
    {"enabled": "collection", **_same("against", "refit", "changed_inputs")},
)

# Group fields named differently from their RunConfig field.
RENAMED = {"urls": "input", "enabled": "collection"}


def build_config(*groups: BaseModel) -> RunConfig:
    """The RunConfig the groups describe; a misconfiguration is one line (ConfigError)."""
    options: dict[str, Any] = {}
    for group in groups:
        for name, value in group:
            if isinstance(value, (FixedEps, TargetKeep)):
                options.update(value.model_dump())
            else:
                options[RENAMED.get(name, name)] = value
    try:
        return RunConfig.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


@flow(name="semdedup", log_prints=False, validate_parameters=True)
def semdedup_curate(
    input: InputOptions,  # type: ignore[valid-type]
    storage: StorageOptions,  # type: ignore[valid-type]
    model: ModelOptions = ModelOptions(),  # type: ignore[valid-type]
    dedup: DedupOptions = DedupOptions(),  # type: ignore[valid-type]
    tuning: TuningOptions = TuningOptions(),  # type: ignore[valid-type]
    collection: CollectionOptions = CollectionOptions(),  # type: ignore[valid-type]
) -> RunSummary:
    """Semantic deduplication of a dataset, with the options in groups; see semdedup_flow."""
    return semdedup_flow.fn(build_config(input, storage, model, dedup, tuning, collection))

