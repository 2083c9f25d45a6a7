"""Planning a collection's generation costs in proportion to the new objects: processed
objects are listed and fingerprinted, never opened; a night with nothing new loads no model;
ids stay unique across the collection."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.embedding import models
from semdedup_core.inputs.precomputed import InputError
from semdedup_core.run.collection import generation_url, read_collection
from semdedup_core.run.dag import run_pipeline

from .conftest import fast_embeddings, single_thread, unit_rows

CFG = dict(eps=0.05, clusters=4, buckets=2, kmeans_iterations=10, seed=2, workers=1)


def _run(cfg: RunConfig):
    with single_thread():
        return run_pipeline(cfg)


def _scramble_keeping_fingerprint(path: Path) -> None:
    """Overwrite a file with garbage of the same size, its mtime put back: its listing
    (size, mtime) is unchanged, but any reader that opens it fails."""
    st = path.stat()
    path.write_bytes(b"\xff" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_processed_objects_are_never_opened(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "in"
    fast_embeddings(folder / "a.parquet", [f"a{i}" for i in range(120)], unit_rows(rng, 120, 8))
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(folder)], output=str(coll), collection=True, **CFG)
    _run(cfg)
    _scramble_keeping_fingerprint(folder / "a.parquet")  # unreadable, same fingerprint
    fast_embeddings(folder / "b.parquet", [f"b{i}" for i in range(30)], unit_rows(rng, 30, 8))
    gen = _run(cfg)
    assert gen.n_input == 30 and gen.n_kept + gen.n_removed + gen.n_failed == 30
    assert set(read_collection(str(coll)).generations[1].inputs) == {str(folder / "b.parquet")}
    again = _run(cfg)
    assert again.note is not None and "nothing new" in again.note


def test_a_new_object_reusing_an_earlier_id_is_refused_before_any_work(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / "in"
    fast_embeddings(folder / "a.parquet", [f"a{i}" for i in range(100)], unit_rows(rng, 100, 8))
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(folder)], output=str(coll), collection=True, **CFG)
    _run(cfg)
    committed = (coll / "collection.json").read_bytes()
    fast_embeddings(folder / "b.parquet", ["b0", "a17", "b2"], unit_rows(rng, 3, 8))
    with pytest.raises(InputError, match="duplicate id 'a17' in .*b.parquet and in generation 0"):
        _run(cfg)
    assert (coll / "collection.json").read_bytes() == committed
    assert not Path(generation_url(str(coll), 1)).exists()


def test_a_night_with_nothing_new_loads_no_model(tiny_bert, tmp_path):
    """Raw text: once every input object is processed, a run succeeds with 'nothing new' even
    though the model can no longer be loaded; a night with a new object still checks it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "night1.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"text {i} w{i} w{i * 7}"}) + "\n" for i in range(12)))
    coll = tmp_path / "coll"
    cfg = RunConfig(input=[str(folder)], output=str(coll), collection=True, model=str(model), eps=0.001, clusters=2, decode_workers=0, seed=1)
    _run(cfg)
    shutil.rmtree(model)  # loading the model now fails (once the process's loaded copy is dropped)
    models._load.cache_clear()
    again = _run(cfg)
    assert again.note is not None and "nothing new" in again.note and again.n_input == 0
    (folder / "night2.jsonl").write_text(json.dumps({"id": "n0", "text": "a new text"}) + "\n")
    with pytest.raises(ConfigError, match="cannot be loaded"):  # something new: the model is checked before any work
        _run(cfg)
    assert len(read_collection(str(coll)).generations) == 1
    assert not (Path(generation_url(str(coll), 1)) / "embeddings").exists()
