"""Texts longer than the model's limit: chunked (windows pooled), truncated or failed, and
counted. References are built with transformers directly (each window run alone, no
padding), never through the code under test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.embedding.models import TextEmbedder, model_spec

from .conftest import raw_config, run_raw, single_thread
from .test_cli import cli, collapsed


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _embedder(folder, **kw) -> TextEmbedder:
    cfg = RunConfig(input=["x"], output="y", device="cpu", model=str(folder), **kw)
    return TextEmbedder(model_spec(cfg, "text", "cpu"), "cpu", cfg.pooling, cfg.max_length, cfg.long_text)


def _reference_chunked(folder, text: str, max_length: int, overlap: int) -> np.ndarray:
    """Windows of max_length - 2 content tokens, consecutive ones sharing ``overlap``, each as
    [CLS] window [SEP] run alone; masked mean per window, unit-normalised; the windows
    averaged weighted by their token counts and normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    capacity = max_length - 2
    starts = range(0, max(1, len(content) - overlap), capacity - overlap)
    vectors, weights = [], []
    for s in starts:
        ids = [tokenizer.cls_token_id, *content[s : s + capacity], tokenizer.sep_token_id]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        vectors.append(F.normalize(hidden.mean(0), dim=-1).double().numpy())
        weights.append(len(ids))
    pooled = np.average(np.stack(vectors), axis=0, weights=weights)
    return pooled / np.linalg.norm(pooled)


WORDS = [f"w{i}" for i in range(60)]


def test_chunk_equals_windows_run_alone_and_pooled(tiny_bert):
    emb = _embedder(tiny_bert, max_length=8)
    assert emb.overlap == 1  # 8 // 8
    texts = [" ".join(WORDS[:n]) for n in (3, 6, 7, 13, 30, 59)]
    windows = emb.windows(texts)
    assert windows.long.tolist() == [False, False, True, True, True, True]  # 6 words + 2 specials fit in 8
    got = emb.encode_windows(windows, batch_size=3)
    for text, vector in zip(texts, got):
        np.testing.assert_allclose(vector, _reference_chunked(tiny_bert, text, 8, emb.overlap), rtol=1e-5, atol=1e-6)
    # A text that fits gets exactly the vector encode (one batch, truncating) gives it.
    np.testing.assert_array_equal(got[:2], emb.encode(texts[:2]))


def test_chunk_does_not_depend_on_batch_composition(tiny_bert):
    emb = _embedder(tiny_bert, max_length=8)
    long = " ".join(WORDS[:40])
    alone = emb.encode_windows(emb.windows([long]), batch_size=64)
    for batch_size in (1, 2, 5):
        mixed = emb.encode_windows(emb.windows(["w1 w2", long, " ".join(WORDS[10:20]), "a"]), batch_size=batch_size)
        np.testing.assert_allclose(mixed[1], alone[0], rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(
        st.lists(st.one_of(st.sampled_from(WORDS), st.text(min_size=1, max_size=4)), min_size=0, max_size=40).map(" ".join),
        min_size=1,
        max_size=6,
    ),
    max_length=st.integers(4, 16),
)
def test_windows_cover_every_token_once_in_order(tiny_bert, texts, max_length):
    """Any text (unicode, surrogate-free noise, empty): windows fit max_length, start with
    [CLS] and end with [SEP], and without their specials and overlaps they are the text's
    tokens exactly; long <=> more tokens than max_length."""
    emb = _embedder(tiny_bert, max_length=max_length)
    windows = emb.windows(texts)
    tok = emb.tokenizer
    assert sorted(set(windows.owner.tolist())) == list(range(len(texts)))
    for t, text in enumerate(texts):
        mine = [w for w, o in zip(windows.ids, windows.owner) if o == t]
        assert all(len(w) <= max_length and w[0] == tok.cls_token_id and w[-1] == tok.sep_token_id for w in mine)
        rebuilt = mine[0][1:-1] + [i for w in mine[1:] for i in w[1 + emb.overlap : -1]]
        content = tok(text, add_special_tokens=False)["input_ids"]
        assert rebuilt == content
        assert bool(windows.long[t]) == (len(content) + 2 > max_length)


def test_config_long_text_and_the_truncation_alias():
    base = {"input": ["x"], "output": "y"}
    assert RunConfig(**base).long_text == "chunk"
    assert RunConfig(**base, truncation=False).long_text == "fail"
    assert RunConfig(**base, truncation=True).long_text == "truncate"
    with pytest.raises(ConfigError, match="long_text only"):
        RunConfig.load(None, **base, truncation=False, long_text="chunk")
    with pytest.raises(ConfigError, match="long_text"):
        RunConfig.load(None, **base, long_text="cut")
    assert "long_text" in RunConfig(**base).embedding_fields()


def _shared_preamble_corpus(tmp_path):
    """Two documents whose first 8 tokens agree and whose bodies differ (the licence-bundle
    case), a true copy up to one late word, and short distinct texts."""
    preamble = " ".join(WORDS[:10])
    docs = [
        {"id": "bundle", "text": preamble + " " + " ".join(WORDS[30:60])},
        {"id": "plain", "text": preamble + " " + " ".join(WORDS[10:30])},
        {"id": "plain-edited", "text": preamble + " " + " ".join(WORDS[10:29] + ["w59"])},
        *({"id": f"s{i}", "text": f"{WORDS[i]} {WORDS[i + 20]} {WORDS[i + 40]}"} for i in range(10)),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path, docs


@pytest.mark.parametrize("mode", ["truncate", "chunk", "fail"])
def test_modes_end_to_end(mode, tiny_bert, tmp_path):
    path, docs = _shared_preamble_corpus(tmp_path)
    res = run_raw(raw_config([path], tmp_path / "out", model=str(tiny_bert), max_length=12, long_text=mode, clusters=1, eps=0.01))
    assert res.summary["n_long_texts"] == 3 and res.summary["long_text"] == mode
    marker = json.loads((tmp_path / "out" / "embeddings" / "shard-00000.json").read_text())
    assert (marker["n_long_texts"], marker["long_text"]) == (3, mode)
    removed = {r["id"]: r for r in res.removed}
    failed = {r["id"]: r for r in res.failed}
    long_ids = {"bundle", "plain", "plain-edited"}
    if mode == "truncate":
        # Cut to their shared first tokens the three are identical: two are "copies".
        assert len(long_ids & set(removed)) == 2
        assert all(removed[i]["max_sim"] > 0.9999 for i in long_ids & set(removed))
    elif mode == "chunk":
        # Whole documents: the different bodies stay, the true copy goes.
        assert "bundle" not in removed and len({"plain", "plain-edited"} & set(removed)) == 1
    else:
        assert set(failed) == long_ids and not long_ids & set(removed)
        assert all("more than max_length 12" in failed[i]["error"] for i in long_ids)
    everything = [r["id"] for r in res.kept + res.removed + res.failed]
    assert sorted(everything) == sorted(d["id"] for d in docs)


def test_cli_long_text_option_and_summary_line(tiny_bert, tmp_path):
    path, _ = _shared_preamble_corpus(tmp_path)
    base = ["run", str(path), "--model", str(tiny_bert), "--clusters", "1", "--max-length", "12"]
    proc = cli([*base, "--output", str(tmp_path / "a"), "--long-text", "truncate"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "textslongerthanthemodel'slimit3(truncate)" in collapsed(proc.stdout)
    proc = cli([*base, "--output", str(tmp_path / "b"), "--no-truncation"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "textslongerthanthemodel'slimit3(fail)" in collapsed(proc.stdout)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["long_text"] == "fail"
    bad = cli([*base, "--output", str(tmp_path / "c"), "--long-text", "cut"], tmp_path)
    assert bad.returncode == 2 and "--long-text" in bad.stderr and "cut" in bad.stderr and not (tmp_path / "c").exists()
