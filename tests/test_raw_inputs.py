"""Raw inputs end to end through ``run_pipeline``: every reader (webdataset tars, image
folders, parquet with image bytes or text, jsonl) and every writer round-trips on small
generated data, embedded with the tiny open_clip / transformers models of conftest.

What is asserted: the ids each reader gives, kept/removed/failed partitioning the input,
exact duplicates (first copy in shard-then-row order kept, the copies never embedded),
the dataset written back in the input's own format byte for byte, format detection,
resume, re-embedding of one shard, reuse-embeddings, keep='metadata' from webdataset json.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.dag import run_pipeline
from semdedup_core.inputs.datasets import detect_format, discover_raw_shards, scan_items

from .conftest import RunResults, raw_config, run_raw, png_bytes, write_tar

SIDE = 16  # pixels; the tiny CLIP resizes to 32


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def _encoded(seed: int, fmt: str) -> bytes:
    return png_bytes(_image(seed), fmt=fmt)


def _embedded_ids(out: Path) -> list[str]:
    files = sorted((out / "embeddings").glob("shard-*[0-9].parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def _removed(results: RunResults, reason: str) -> dict[str, str]:
    return {r["id"]: r["dup_of"] for r in results.removed if r["reason"] == reason}


def _ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def check_accounting(res: RunResults, all_ids: list[str]) -> None:
    """Every input id exactly once in kept / removed / failed; exact copies are not scored."""
    everything = _ids(res.kept) + _ids(res.removed) + _ids(res.failed)
    assert len(everything) == len(set(everything)), "an id appears twice in the results"
    assert sorted(everything) == sorted(all_ids)
    scored = _ids(res.scores)
    assert sorted(scored) == sorted(_ids(res.kept) + [r["id"] for r in res.removed if r["reason"] == "semantic"])
    s = res.summary
    assert (s["n_kept"], s["n_removed"], s["n_failed"], s["n_input"]) == (len(res.kept), len(res.removed), len(res.failed), len(all_ids))
    assert s["n_exact"] == sum(r["reason"] == "exact" for r in res.removed)


# ---------------------------------------------------------------- webdataset tars

# Two img2dataset-style tars. Keys of the second tar sort BEFORE those of the first, so
# "first copy" must follow shard-then-row order, not key order.
EXACT_WDS = {"z009": "z002", "a001": "z005", "a010": "z002"}  # copy -> first copy


def _wds_samples(prefix: str, seed0: int, copies: dict[int, bytes]) -> list[dict]:
    samples = []
    for i in range(20):
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        data = copies.get(i, _encoded(seed0 + i, fmt))
        ext = "png" if data.startswith(b"\x89PNG") else "jpg"
        samples.append(
            {"__key__": f"{prefix}{i:03d}", ext: data, "txt": f"caption {prefix}{i}", "json": json.dumps({"width": 100 + (i * 7) % 20, "key": f"{prefix}{i:03d}"})}
        )
    return samples


@pytest.fixture(scope="module")
def wds_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wds")
    # z009 repeats z002's bytes; a001 repeats z005's and a010 z002's (across tars)
    first = _wds_samples("z", 1000, {9: _encoded(1002, "PNG")})
    second = _wds_samples("a", 2000, {1: _encoded(1005, "JPEG"), 10: _encoded(1002, "PNG")})
    paths = [write_tar(root / "data" / "00000.tar", first), write_tar(root / "data" / "00001.tar", second)]
    return {"root": root, "paths": paths, "keys": [s["__key__"] for s in first + second], "samples": first + second}


def _tar_samples(path: Path) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(member name, bytes), ...]) per sample, in archive order."""
    samples: list[tuple[str, list[tuple[str, bytes]]]] = []
    with tarfile.open(path) as tf:
        for info in tf.getmembers():
            if not info.isfile():
                continue
            key = info.name.split(".", 1)[0]
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((info.name, tf.extractfile(info).read()))
    return samples


def _wds_cfg(wds_data: dict, out: Path, model: str, **kw) -> RunConfig:
    # eps: the random tiny CLIP maps these images to cosine similarities ~0.95-0.99
    return raw_config([wds_data["root"] / "data" / "*.tar"], out, model=model, batch_size=8, eps=0.015, **kw)


@pytest.fixture(scope="module")
def wds_run(wds_data, tiny_clip) -> tuple[Path, RunResults]:
    out = wds_data["root"] / "out"
    return out, run_raw(_wds_cfg(wds_data, out, tiny_clip, write_dataset=True, write_removed=True))


def test_webdataset_partition_and_exact_duplicates(wds_data, wds_run):
    out, res = wds_run
    check_accounting(res, wds_data["keys"])
    assert res.failed == []
    assert res.summary["input_format"] == "webdataset"
    assert res.summary["n_exact"] == 3
    assert _removed(res, "exact") == EXACT_WDS
    # the copies were never embedded; every other item was
    embedded = _embedded_ids(out)
    assert embedded == [k for k in wds_data["keys"] if k not in EXACT_WDS]
    exact_rows = [r for r in res.removed if r["reason"] == "exact"]
    assert all(r["max_sim"] is None and r["cluster"] is None for r in exact_rows)
    # the embeddings are 32-d unit vectors (the tiny CLIP)
    table = pq.read_table(out / "embeddings" / "shard-00000.parquet")
    vectors = np.asarray(table.column("embedding").to_pylist(), np.float32)
    assert vectors.shape == (19, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_webdataset_written_back_byte_for_byte(wds_data, wds_run):
    out, res = wds_run
    kept, removed = set(_ids(res.kept)), set(_ids(res.removed))
    assert kept and removed
    for path in wds_data["paths"]:
        source = _tar_samples(path)
        assert len(source) == 20 and all(len(members) == 3 for _, members in source)
        assert _tar_samples(out / "dataset" / path.name) == [s for s in source if s[0] in kept]
        assert _tar_samples(out / "removed" / path.name) == [s for s in source if s[0] in removed]
    assert sorted(p.name for p in (out / "dataset").iterdir()) == ["00000.tar", "00001.tar"]
    assert res.summary["written"]["counts"] == {"kept": len(kept), "removed": len(removed), "failed": 0}


def test_decode_workers_give_identical_results(wds_data, wds_run, tiny_clip, tmp_path):
    out0, res0 = wds_run
    # batch_size 8: 19 and 18 items to embed per tar, so two workers decode each tar
    res2 = run_raw(_wds_cfg(wds_data, tmp_path / "out", tiny_clip, decode_workers=2))
    assert res2.decisions() == res0.decisions()
    for shard in ("shard-00000.parquet", "shard-00001.parquet"):
        assert pq.read_table(tmp_path / "out" / "embeddings" / shard).equals(pq.read_table(out0 / "embeddings" / shard))


def test_webdataset_text_modality_embeds_the_txt(wds_data, tiny_bert, tmp_path):
    res = run_raw(raw_config([wds_data["root"] / "data"], tmp_path / "out", model=str(tiny_bert), modality="text"))
    check_accounting(res, wds_data["keys"])
    assert res.failed == [] and res.summary["n_exact"] == 0  # the captions all differ
    assert res.summary["embedder"]["modality"] == "text"
    scan = pq.read_table(tmp_path / "out" / "scan" / "shard-00000.parquet", columns=["id", "text"])
    assert scan.to_pylist() == [{"id": s["__key__"], "text": s["txt"]} for s in wds_data["samples"][:20]]


def test_webdataset_keep_metadata_reads_the_json(wds_data, tiny_clip, tmp_path):
    cfg = raw_config([wds_data["paths"][0]], tmp_path / "out", model=tiny_clip, keep="metadata", metadata_columns=["width"])
    res = run_raw(cfg)
    check_accounting(res, wds_data["keys"][:20])
    width = {s["__key__"]: json.loads(s["json"])["width"] for s in wds_data["samples"][:20]}
    table = pq.read_table(tmp_path / "out" / "embeddings" / "shard-00000.parquet")
    assert table.schema.field("width").type == pa.float64()
    assert dict(zip(table.column("id").to_pylist(), table.column("width").to_pylist())) == {k: float(w) for k, w in width.items() if k != "z009"}
    # in every cluster the widest item is judged first, so it is never removed
    for cluster in {r["cluster"] for r in res.scores}:
        members = [r["id"] for r in res.scores if r["cluster"] == cluster]
        widest = max(members, key=width.get)  # widths are distinct
        assert widest in _ids(res.kept), (cluster, widest)
    semantic = _removed(res, "semantic")
    assert semantic and all(width[of] > width[i] for i, of in semantic.items())


# ---------------------------------------------------------------- image folders

FOLDER_FILES = {  # relative path -> (seed, format); "dup/copy.png" repeats "b/x1.png"
    "a/deep/p0.png": (1, "PNG"),
    "a/deep/p1.jpg": (2, "JPEG"),
    "a/p2.png": (3, "PNG"),
    "a/p3.jpeg": (4, "JPEG"),
    "b/x1.png": (5, "PNG"),
    "b/x2.jpg": (6, "JPEG"),
    "c0.png": (7, "PNG"),
    "c1.jpg": (8, "JPEG"),
    "dup/copy.png": (5, "PNG"),
    "z/last.png": (9, "PNG"),
}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_clip) -> tuple[Path, Path, RunResults]:
    root = tmp_path_factory.mktemp("folder")
    folder = root / "images"
    for rel, (seed, fmt) in FOLDER_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(_encoded(seed, fmt))
    (folder / "notes.txt").write_text("not an image")
    cfg = raw_config([folder], root / "out", model=tiny_clip, write_dataset=True, write_removed=True)
    return folder, root / "out", run_raw(cfg)


def test_image_folder_ids_are_relative_paths(folder_run):
    _, out, res = folder_run
    check_accounting(res, list(FOLDER_FILES))
    assert res.summary["input_format"] == "images" and res.failed == []
    assert _removed(res, "exact") == {"dup/copy.png": "b/x1.png"}
    assert _embedded_ids(out) == sorted(set(FOLDER_FILES) - {"dup/copy.png"})


def test_image_folder_written_as_file_lists(folder_run):
    folder, out, res = folder_run
    order = sorted(FOLDER_FILES)
    kept, removed = set(_ids(res.kept)), set(_ids(res.removed))
    assert (out / "dataset" / "images-00000.txt").read_text().splitlines() == [f"{folder}/{i}" for i in order if i in kept]
    assert (out / "removed" / "images-00000.txt").read_text().splitlines() == [f"{folder}/{i}" for i in order if i in removed]
    assert [p.name for p in (out / "dataset").iterdir()] == ["images-00000.txt"]


def test_image_glob_ids_are_relative_to_the_folder_holding_every_match(folder_run, tmp_path):
    folder = folder_run[0]
    for pattern, ids in (
        ("**/*.png", sorted(rel for rel in FOLDER_FILES if rel.endswith(".png"))),
        ("a/**/*.jp*g", ["deep/p1.jpg", "p3.jpeg"]),
        ("b/x1.png", ["x1.png"]),
    ):
        (shard,) = discover_raw_shards(raw_config([f"{folder}/{pattern}"], tmp_path / "out"), "images")
        assert [item.id for item in scan_items(shard, [])] == ids, pattern


# ---------------------------------------------------------------- parquet with image bytes


@pytest.fixture(scope="module")
def image_parquet_run(tmp_path_factory, tiny_clip) -> tuple[Path, Path, RunResults]:
    root = tmp_path_factory.mktemp("imgpq")
    data = root / "data"
    data.mkdir()
    plain = [_encoded(100 + i, "PNG" if i % 2 else "JPEG") for i in range(8)]
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(8)], "image": pa.array(plain, pa.binary()), "caption": [f"c{i}" for i in range(8)]}),
        data / "plain.parquet",
    )
    # Hugging Face datasets' Image feature: struct<bytes: binary, path: string>; h3 repeats p5
    hf = [_encoded(200 + i, "PNG") for i in range(8)]
    hf[3] = plain[5]
    struct = pa.array([{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(hf)], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"id": [f"h{i}" for i in range(8)], "image": struct, "label": pa.array(range(8), pa.int16())})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})})
    pq.write_table(table, data / "struct.parquet", row_group_size=3)
    cfg = raw_config([data], root / "out", model=tiny_clip, write_dataset=True, write_removed=True)
    return data, root / "out", run_raw(cfg)


def test_parquet_image_bytes_plain_and_struct(image_parquet_run):
    data, out, res = image_parquet_run
    check_accounting(res, [f"p{i}" for i in range(8)] + [f"h{i}" for i in range(8)])
    assert res.summary["input_format"] == "parquet" and res.failed == []
    assert _removed(res, "exact") == {"h3": "p5"}
    assert len(_embedded_ids(out)) == 15
    kept, removed = set(_ids(res.kept)), set(_ids(res.removed))
    for name in ("plain.parquet", "struct.parquet"):
        source = pq.read_table(data / name)
        for sub, chosen in (("dataset", kept), ("removed", removed)):
            written = pq.read_table(out / sub / name)
            assert written.schema.equals(source.schema, check_metadata=True)
            assert written.to_pylist() == [r for r in source.to_pylist() if r["id"] in chosen]


# ---------------------------------------------------------------- parquet text

WORDS = [f"w{i}" for i in range(60)]


def _doc(rng: np.random.Generator, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def text_parquet_run(tmp_path_factory, tiny_bert) -> tuple[Path, Path, RunResults]:
    root = tmp_path_factory.mktemp("textpq")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(7)
    with_ids = [_doc(rng) for _ in range(10)]
    without = [_doc(rng) for _ in range(10)]
    without[4] = "  " + with_ids[2].upper().replace(" ", " \t ") + "\n"  # an exact copy up to case and whitespace
    pq.write_table(
        pa.table({"id": pa.array(range(500, 510), pa.int64()), "text": with_ids, "lang": ["xx"] * 10, "score": np.linspace(0, 1, 10)}),
        data / "a.parquet",
    )
    pq.write_table(pa.table({"text": without, "n": pa.array(range(10), pa.int32())}), data / "b.parquet", row_group_size=4)
    cfg = raw_config([data / "*.parquet"], root / "out", model=str(tiny_bert), write_dataset=True, write_removed=True)
    return data, root / "out", run_raw(cfg)


def test_parquet_text_ids_from_the_column_or_synthetic(text_parquet_run):
    data, out, res = text_parquet_run
    synthetic = [f"{data}/b.parquet:{r}" for r in range(10)]
    check_accounting(res, [str(i) for i in range(500, 510)] + synthetic)
    assert res.summary["input_format"] == "parquet" and res.failed == []
    assert res.summary["embedder"]["modality"] == "text"
    assert _removed(res, "exact") == {synthetic[4]: "502"}
    assert _embedded_ids(out) == [str(i) for i in range(500, 510)] + [s for s in synthetic if s != synthetic[4]]


def test_parquet_text_written_back_with_every_column(text_parquet_run):
    data, out, res = text_parquet_run
    kept, removed = set(_ids(res.kept)), set(_ids(res.removed))
    for name, ids in (("a.parquet", [str(i) for i in range(500, 510)]), ("b.parquet", [f"{data}/b.parquet:{r}" for r in range(10)])):
        source = pq.read_table(data / name)
        for sub, chosen in (("dataset", kept), ("removed", removed)):
            written = pq.read_table(out / sub / name)
            assert written.schema.equals(source.schema, check_metadata=True)
            assert written.to_pylist() == [r for r, i in zip(source.to_pylist(), ids) if i in chosen]


# ---------------------------------------------------------------- jsonl


def _jsonl_lines() -> tuple[list[bytes], list[bytes]]:
    """Lines of e.jsonl and f.jsonl.gz, as bytes, each a document with its own formatting."""
    rng = np.random.default_rng(11)
    plain: list[bytes] = []
    for i in range(10):
        record = {"id": f"e{i}", "text": _doc(rng, 3 + i % 5), "meta": {"i": i, "note": "naïve ✓"}}
        if i == 6:
            del record["id"]  # a synthetic id: "<url>:<line number>", here 8 (after the blank line)
        line = json.dumps(record, ensure_ascii=i % 2 == 0, separators=(",", ":") if i % 3 else (", ", ": "))
        plain.append(line.encode() + b"\n")
    plain.insert(4, b"\n")  # a blank line: not an item, but it counts as a line
    plain.append(b'{"id": "e10",   "text": "' + json.loads(plain[1])["text"].encode() + b'"}\n')  # a byte-identical text
    compressed = [json.dumps({"id": f"f{i}", "text": _doc(rng, 2 + i % 6)}).encode() + b"\n" for i in range(8)]
    # f3: e2's text up to case and whitespace; the last line has no newline
    compressed[3] = json.dumps({"id": "f3", "text": "\t" + json.loads(plain[2])["text"].upper().replace(" ", "   ") + " \n"}).encode() + b"\n"
    compressed[-1] = compressed[-1].rstrip(b"\n")
    return plain, compressed


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("jsonl")
    data = root / "data"
    data.mkdir()
    plain, compressed = _jsonl_lines()
    (data / "e.jsonl").write_bytes(b"".join(plain))
    (data / "f.jsonl.gz").write_bytes(gzip.compress(b"".join(compressed)))
    ids = [f"e{i}" if i != 6 else f"{data}/e.jsonl:8" for i in range(11)] + [f"f{i}" for i in range(8)]
    return {"root": root, "data": data, "plain": plain, "compressed": compressed, "ids": ids}


@pytest.fixture(scope="module")
def jsonl_run(jsonl_data, tiny_bert) -> tuple[Path, RunResults]:
    out = jsonl_data["root"] / "out"
    cfg = raw_config([jsonl_data["data"]], out, model=str(tiny_bert), write_dataset=True, write_removed=True)
    return out, run_raw(cfg)


def test_jsonl_plain_and_gzip(jsonl_data, jsonl_run):
    out, res = jsonl_run
    check_accounting(res, jsonl_data["ids"])
    assert res.summary["input_format"] == "jsonl" and res.failed == []
    assert _removed(res, "exact") == {"e10": "e1", "f3": "e2"}
    assert _embedded_ids(out) == [i for i in jsonl_data["ids"] if i not in ("e10", "f3")]


def test_jsonl_written_back_verbatim(jsonl_data, jsonl_run):
    out, res = jsonl_run
    kept, removed = set(_ids(res.kept)), set(_ids(res.removed))
    items = [line for line in jsonl_data["plain"] if line.strip()]
    plain_ids = jsonl_data["ids"][:11]
    gz_ids = jsonl_data["ids"][11:]
    compressed = [line if line.endswith(b"\n") else line + b"\n" for line in jsonl_data["compressed"]]
    for sub, chosen in (("dataset", kept), ("removed", removed)):
        assert (out / sub / "e.jsonl").read_bytes() == b"".join(line for line, i in zip(items, plain_ids) if i in chosen)
        raw = (out / sub / "f.jsonl.gz").read_bytes()
        assert raw[:2] == b"\x1f\x8b"  # still gzip
        assert gzip.decompress(raw) == b"".join(line for line, i in zip(compressed, gz_ids) if i in chosen)


# ---------------------------------------------------------------- format detection


def test_auto_detection_of_each_format(wds_data, folder_run, image_parquet_run, text_parquet_run, jsonl_data, tmp_path):
    cases = {
        "webdataset": wds_data["root"] / "data" / "*.tar",
        "images": folder_run[0],
        "parquet": text_parquet_run[0],
        "jsonl": jsonl_data["data"] / "*.jsonl*",
    }
    for expected, entry in cases.items():
        assert detect_format(raw_config([entry], tmp_path / "out")) == expected, entry
    assert detect_format(raw_config([image_parquet_run[0] / "struct.parquet"], tmp_path / "out")) == "parquet"
    assert detect_format(raw_config([folder_run[0] / "a" / "deep" / "p1.jpg"], tmp_path / "out")) == "images"


# ---------------------------------------------------------------- resume, re-embedding, reuse-embeddings


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_rerun_skips_embedding_and_reembeds_only_a_missing_shard(jsonl_data, tiny_bert, tiny_opt, tmp_path):
    out = tmp_path / "out"
    cfg = raw_config([jsonl_data["data"]], out, model=str(tiny_bert))
    first = run_raw(cfg)
    embeddings = _snapshot(out / "embeddings")
    assert sorted(embeddings) == [f"shard-0000{i}.{ext}" for i in (0, 1) for ext in ("failed.parquet", "json", "parquet")]

    # the same config on a finished run: nothing is embedded again, the same results
    again = run_raw(cfg)
    assert _snapshot(out / "embeddings") == embeddings
    assert again.decisions() == first.decisions()

    # shard 1 lost its marker: only shard 1 is embedded again, to the same vectors
    (out / "embeddings" / "shard-00001.json").unlink()
    third = run_raw(cfg)
    after = _snapshot(out / "embeddings")
    assert {n: v for n, v in after.items() if n.startswith("shard-00000")} == {n: v for n, v in embeddings.items() if n.startswith("shard-00000")}
    assert after["shard-00001.json"][0] != embeddings["shard-00001.json"][0]
    assert after["shard-00001.parquet"][0] != embeddings["shard-00001.parquet"][0]
    assert pq.read_table(out / "embeddings" / "shard-00001.parquet").equals(pq.read_table(pa.BufferReader(embeddings["shard-00001.parquet"][1])))
    assert third.decisions() == first.decisions()

    # reuse-embeddings with another eps: embeddings kept as they are, the rest recomputed
    embeddings = _snapshot(out / "embeddings")
    scan = _snapshot(out / "scan")
    scores_before = _snapshot(out / "scores")
    reused = run_raw(cfg.model_copy(update={"eps": 0.3, "on_existing": "reuse-embeddings"}))
    assert _snapshot(out / "embeddings") == embeddings and _snapshot(out / "scan") == scan
    assert all(v[0] != scores_before[n][0] for n, v in _snapshot(out / "scores").items())
    assert reused.summary["eps"] == 0.3
    check_accounting(reused, jsonl_data["ids"])
    for row in reused.scores:
        removed = row["max_sim"] is not None and np.float32(row["max_sim"]) > np.float32(1 - 0.3)
        assert row["kept"] is not removed, row

    # ... but not with another model: refused before anything is touched
    with pytest.raises(ConfigError, match=r"different configuration \(model\)"):
        run_pipeline(cfg.model_copy(update={"model": str(tiny_opt), "on_existing": "reuse-embeddings"}))
    assert _snapshot(out / "embeddings") == embeddings
    assert RunResults(out).decisions() == reused.decisions()
