"""The embedding models against their libraries' own code paths: open_clip image towers
(fp32, bf16, checkpoint formats), transformers text encoders (mean / cls / last-token
pooling, padding, truncation) and the bundled all-MiniLM-L6-v2.

References are computed with open_clip / transformers directly, never through our code.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.embedding.models import TextEmbedder, default_pooling, load_embedder, model_spec, text_model_path
from semdedup_core.embedding.stage import _embed_texts

from .conftest import TINY_CLIP_CONFIG, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # shared 2-core machine: tiny models are fastest on one thread
        yield


def _cfg(**kw) -> RunConfig:
    return RunConfig(input=["x"], output="y", device="cpu", **kw)


def _images(n: int = 6, seed: int = 0):
    """RGB images of different sizes and aspect ratios (preprocess resizes and crops them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24 + 9 * i, 48 - 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def _rows_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)


def _assert_unit_f32(x: np.ndarray, n: int, dim: int) -> None:
    assert x.dtype == np.float32 and x.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(x.astype(np.float64), axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- open_clip


def _open_clip_reference(model_name: str, pretrained: str | None, images) -> tuple[torch.Tensor, np.ndarray]:
    """(pixels, normalised embeddings) straight from open_clip."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    pixels = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        ref = F.normalize(model.encode_image(pixels), dim=-1).numpy()
    return pixels, ref


def test_image_embedder_equals_open_clip(tiny_clip):
    from safetensors.torch import load_file

    emb = load_embedder(_cfg(model=tiny_clip, precision="fp32"), "image", "cpu")
    assert emb.dim == TINY_CLIP_CONFIG["embed_dim"] == 32
    assert next(emb.model.parameters()).dtype == torch.float32
    # The saved weights were loaded (not a random init).
    saved = load_file(str(Path(tiny_clip.removeprefix("local-dir:")) / "open_clip_model.safetensors"))
    state = emb.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())

    images = _images()
    pixels, ref = _open_clip_reference(tiny_clip, None, images)
    ours = torch.stack([emb.preprocess(im) for im in images])
    assert ours.shape == (6, 3, 32, 32) and torch.equal(ours, pixels)  # the model's own preprocessing
    got = emb.encode(pixels)
    _assert_unit_f32(got, 6, 32)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # Rows are independent of the batch they are in.
    np.testing.assert_allclose(emb.encode(pixels[2:3]), got[2:3], rtol=1e-5, atol=1e-6)


def test_image_embedder_bf16_close_to_fp32(tiny_clip):
    fp32 = load_embedder(_cfg(model=tiny_clip, precision="fp32"), "image", "cpu")
    bf16 = load_embedder(_cfg(model=tiny_clip, precision="bf16"), "image", "cpu")
    assert bf16 is not fp32 and next(bf16.model.parameters()).dtype == torch.bfloat16  # a model cast
    pixels = torch.stack([fp32.preprocess(im) for im in _images(8, seed=1)])
    a, b = fp32.encode(pixels), bf16.encode(pixels)
    _assert_unit_f32(b, 8, 32)
    cos = _rows_cos(a, b)
    assert (cos > 0.99).all(), cos
    assert not np.array_equal(a, b)  # really computed in bf16


def test_registered_model_pt_and_safetensors_checkpoints_agree(tiny_clip, tmp_path):
    import open_clip
    from safetensors.torch import load_file, save_file

    name = f"semdedup-test-tiny-{uuid.uuid4().hex[:8]}"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{name}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(tmp_path / "configs")
    assert name in open_clip.list_models()

    state = load_file(str(Path(tiny_clip.removeprefix("local-dir:")) / "open_clip_model.safetensors"))
    st_path, pt_path = tmp_path / "tiny.safetensors", tmp_path / "tiny.pt"
    save_file(state, str(st_path))
    torch.save(state, pt_path)

    images = _images(5, seed=2)
    ref_local = load_embedder(_cfg(model=tiny_clip, precision="fp32"), "image", "cpu")
    pixels = torch.stack([ref_local.preprocess(im) for im in images])
    from_st = load_embedder(_cfg(model=name, pretrained=str(st_path), precision="fp32"), "image", "cpu")
    from_pt = load_embedder(_cfg(model=name, pretrained=str(pt_path), precision="fp32"), "image", "cpu")
    assert torch.equal(torch.stack([from_pt.preprocess(im) for im in images]), pixels)
    a, b = from_st.encode(pixels), from_pt.encode(pixels)
    _assert_unit_f32(a, 5, 32)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ref_local.encode(pixels), rtol=1e-5, atol=1e-6)
    # ... and both equal open_clip's own loading of that checkpoint.
    np.testing.assert_allclose(a, _open_clip_reference(name, str(pt_path), images)[1], rtol=1e-5, atol=1e-6)

    # A registered model without weights would be random: refused, naming the tags.
    with pytest.raises(ConfigError, match="needs --pretrained"):
        load_embedder(_cfg(model=name), "image", "cpu")


def test_local_dir_with_only_a_pt_file_is_refused(tmp_path):
    """open_clip's local-dir loader ignores *.pt (it would silently build random weights)."""
    import open_clip

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    torch.save(open_clip.create_model(f"local-dir:{tmp_path}", pretrained=None).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ConfigError, match="weights file"):
        load_embedder(_cfg(model=f"local-dir:{tmp_path}"), "image", "cpu")


# ---------------------------------------------------------------- transformers text models


def _hf(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def _hidden(tokenizer, model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state, batch["attention_mask"]


def _text_embedder(folder: Path, **kw) -> TextEmbedder:
    """A fresh (uncached) embedder: tests below change its tokenizer."""
    cfg = _cfg(model=str(folder), **kw)
    return TextEmbedder(model_spec(cfg, "text", "cpu"), "cpu", cfg.pooling, cfg.max_length, cfg.long_text)


TEXTS = ["w1 w2 w3", "a b", "w10 w11 w12 w13 w14 w15 w16", "q", "w5 x y z w6"]
LONG = " ".join(f"w{i % 60}" for i in range(40))


def test_mean_pooling_equals_masked_mean(tiny_bert):
    emb = load_embedder(_cfg(model=str(tiny_bert)), "text", "cpu")
    assert emb.pooling == "mean" and emb.dim == 32
    tokenizer, model = _hf(tiny_bert)
    hidden, mask = _hidden(tokenizer, model, TEXTS)
    assert (mask == 0).any()  # the batch really is padded
    m = mask.unsqueeze(-1).float()
    ref = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    got = emb.encode(TEXTS)
    _assert_unit_f32(got, len(TEXTS), 32)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # Differs from an unmasked mean (the padding is really excluded).
    unmasked = F.normalize(hidden.mean(1), dim=-1).numpy()
    assert not np.allclose(got[1], unmasked[1], atol=1e-3)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_an_embedding(tiny_bert, pooling):
    emb = load_embedder(_cfg(model=str(tiny_bert), pooling=pooling), "text", "cpu")
    alone = emb.encode(["w1 w2"])
    in_batch = emb.encode(["w1 w2", LONG])
    np.testing.assert_allclose(in_batch[:1], alone, rtol=1e-5, atol=1e-6)
    if pooling == "mean":  # (a random model's [CLS] state barely depends on the text)
        assert _rows_cos(in_batch[:1], in_batch[1:])[0] < 0.999


def test_cls_pooling_is_the_first_token(tiny_bert):
    emb = load_embedder(_cfg(model=str(tiny_bert), pooling="cls"), "text", "cpu")
    assert emb.pooling == "cls"
    tokenizer, model = _hf(tiny_bert)
    hidden, _ = _hidden(tokenizer, model, TEXTS)
    np.testing.assert_allclose(emb.encode(TEXTS), F.normalize(hidden[:, 0], dim=-1).numpy(), rtol=1e-5, atol=1e-6)


def test_last_token_pooling_for_opt_either_padding_side(tiny_opt):
    emb = _text_embedder(tiny_opt)
    assert emb.pooling == "last_token"  # auto for a decoder-only model
    tokenizer, model = _hf(tiny_opt)
    # Reference: each text alone (no padding), the state at its last token.
    ref = []
    for text in TEXTS:
        hidden, mask = _hidden(tokenizer, model, [text])
        assert bool(mask.all())
        ref.append(F.normalize(hidden[0, -1], dim=-1).numpy())
    ref = np.stack(ref)
    for side in ("right", "left"):
        emb.tokenizer.padding_side = side
        batch = emb.tokenizer(TEXTS, padding=True, return_tensors="pt")
        pad_col = 0 if side == "left" else -1
        assert (batch["attention_mask"][:, pad_col] == 0).any()  # padded on that side
        got = emb.encode(TEXTS)
        _assert_unit_f32(got, len(TEXTS), 32)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f"padding_side={side}")
    # Not the final column (a pad state for short texts under right padding).
    tokenizer.padding_side = "right"
    hidden, _ = _hidden(tokenizer, model, TEXTS)
    assert not np.allclose(F.normalize(hidden[:, -1], dim=-1).numpy()[1], ref[1], atol=1e-3)


def test_default_pooling():
    from transformers import AutoConfig, BertConfig, GPT2Config, OPTConfig, RobertaConfig

    assert default_pooling(OPTConfig()) == "last_token"
    assert default_pooling(GPT2Config()) == "last_token"
    assert default_pooling(BertConfig()) == "mean"
    assert default_pooling(RobertaConfig()) == "mean"
    assert default_pooling(AutoConfig.from_pretrained(text_model_path("all-MiniLM-L6-v2"))) == "mean"


def test_default_pooling_of_saved_models(tiny_bert, tiny_opt):
    from transformers import AutoConfig

    assert default_pooling(AutoConfig.from_pretrained(tiny_opt)) == "last_token"
    assert default_pooling(AutoConfig.from_pretrained(tiny_bert)) == "mean"


def test_max_length_too_long_and_truncation(tiny_bert):
    default = load_embedder(_cfg(model=str(tiny_bert)), "text", "cpu")
    assert default.max_length == 64  # position table; the saved tokenizer has no limit

    emb = _text_embedder(tiny_bert, max_length=8)
    assert emb.max_length == 8
    words = [f"w{i}" for i in range(20)]
    texts = ["w1 w2", " ".join(words[:6]), " ".join(words[:7]), " ".join(words)]
    # Token counts include [CLS] and [SEP]: 4, 8, 9, 22.
    assert emb.too_long(texts) == [None, None, 9, 22]
    # Truncated to max_length tokens: the same as the text cut to its first 6 words.
    got = emb.encode(texts)
    np.testing.assert_allclose(got[3], got[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], got[1], rtol=1e-5, atol=1e-6)
    assert _rows_cos(got[:1], got[1:2])[0] < 0.999
    # Untruncated (max_length 64) the long text is different.
    full = default.encode(texts)
    assert _rows_cos(full[3:4], full[1:2])[0] < 0.999


def test_truncation_off_fails_long_texts(tiny_bert):
    cfg = _cfg(model=str(tiny_bert), max_length=8, long_text="fail", batch_size=2)
    emb = load_embedder(cfg, "text", "cpu")
    texts = ["w1 w2", " ".join(f"w{i}" for i in range(7)), "w3", " ".join(f"w{i}" for i in range(6))]
    todo = pa.table({"row": pa.array([10, 11, 12, 13], pa.int64()), "text": texts})
    rows, vectors, failures = [], [], []
    counts = {"n_long_texts": 0}
    for r, v, f in _embed_texts(emb, todo, cfg, counts):
        rows += list(r)
        vectors.append(v)
        failures += f
    assert failures == [(11, "text has 9 tokens, more than max_length 8 (truncation is off)")]
    assert counts == {"n_long_texts": 1}
    assert sorted(rows) == [10, 12, 13]
    by_row = dict(zip(rows, np.concatenate(vectors)))
    np.testing.assert_allclose(by_row[13], emb.encode([texts[3]])[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the bundled all-MiniLM-L6-v2

PARAPHRASES = [
    ("A man is playing a guitar on stage.", "Someone performs guitar music at a concert."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti for dinner."),
]


def test_minilm_default_text_model():
    from transformers import AutoModel, AutoTokenizer

    emb = load_embedder(RunConfig(input=["x"], output="y"), "text", "cpu")
    folder = Path(text_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    st_config = json.loads((folder / "sentence_bert_config.json").read_text())
    pooling_config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling_config["pooling_mode_mean_tokens"] and not pooling_config["pooling_mode_cls_token"]
    # sentence-transformers' model: 384-d, mean pooling, normalised, 256 tokens max.
    assert emb.dim == pooling_config["word_embedding_dimension"] == 384
    assert emb.pooling == "mean"
    assert emb.max_length == st_config["max_seq_length"] == 256

    texts = [t for pair in PARAPHRASES for t in pair]
    got = emb.encode(texts)
    _assert_unit_f32(got, len(texts), 384)
    sims = got.astype(np.float64) @ got.T.astype(np.float64)
    pair_of = np.arange(len(texts)) // 2
    paraphrase = np.array([sims[2 * i, 2 * i + 1] for i in range(len(PARAPHRASES))])
    unrelated = sims[pair_of[:, None] != pair_of[None, :]]
    assert paraphrase.min() > unrelated.max(), (paraphrase, unrelated.max())
    assert paraphrase.min() > 0.4 and unrelated.max() < 0.4

    # The model card's own recipe (masked mean of AutoModel's token states, L2-normalised),
    # with sentence-transformers' 256-token limit; a long text shows the limit matters.
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 30 + ["finally a totally different ending about tax law"] * 10)
    batch_texts = [*texts[:3], long_text]
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    assert len(tokenizer(long_text)["input_ids"]) > 300
    refs = {}
    for limit in (256, 512):
        encoded = tokenizer(batch_texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        with torch.no_grad():
            tokens = model(**encoded)[0]
        m = encoded["attention_mask"].unsqueeze(-1).expand(tokens.size()).float()
        refs[limit] = F.normalize(torch.sum(tokens * m, 1) / torch.clamp(m.sum(1), min=1e-9), p=2, dim=1).numpy()
    ours = emb.encode(batch_texts)
    np.testing.assert_allclose(ours, refs[256], rtol=1e-4, atol=2e-5)
    assert _rows_cos(ours[3:], refs[512][3:])[0] < 0.999
