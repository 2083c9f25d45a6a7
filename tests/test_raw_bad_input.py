"""Bad raw inputs: every unusable item ends as a row of result/failed.parquet naming the
item, where it lives (``source``) and the reason, while the rest of the run goes on; a model
that cannot be loaded is a ConfigError before anything is written."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semdedup_core.config import ConfigError
from semdedup_core.inputs.datasets import RawShard, scan_items
from semdedup_core.run.plan import plan_run

from .conftest import RunResults, raw_config, run_raw, write_tar


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _palette(transparency: bool) -> bytes:
    img = Image.fromarray(np.random.default_rng(3).integers(0, 16, (16, 16), dtype=np.uint8)).convert("P")
    img.putpalette([(i * 37) % 256 for i in range(768)])
    return _encode(img, "PNG", **({"transparency": 0} if transparency else {}))


def _accounted(res: RunResults, all_ids: list[str]) -> None:
    everything = [r["id"] for r in res.kept + res.removed + res.failed]
    assert sorted(everything) == sorted(all_ids) and len(everything) == len(set(everything))
    s = res.summary
    assert (s["n_input"], s["n_kept"], s["n_removed"], s["n_failed"]) == (len(all_ids), len(res.kept), len(res.removed), len(res.failed))


def _failed(res: RunResults) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["source"], r["error"]) for r in res.failed}


# ---------------------------------------------------------------- images in webdataset tars

GOOD_JPEG = _encode(_rgb(1), "JPEG")
BAD_IMAGES = {  # key -> (extension, bytes, reason fragment)
    "corrupt": ("jpg", b"\xff\xd8 these are not the bytes of an image", "cannot decode image (not a known image format)"),
    "truncated": ("jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2], "cannot decode image"),
    "cmyk": ("jpg", _encode(Image.new("CMYK", (16, 16), (10, 200, 30, 40)), "JPEG"), "CMYK image is not supported"),
    "gray16": ("png", _encode(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200), "PNG"), "16-bit image (mode I;16) is not supported"),
    "palette_alpha": ("png", _palette(transparency=True), "palette image with transparency is not supported"),
}
GOOD_IMAGES = {  # accepted and converted to RGB
    "rgb": ("jpg", GOOD_JPEG),
    "rgba": ("png", _encode(_rgb(2).convert("RGBA"), "PNG")),
    "gray": ("png", _encode(_rgb(4).convert("L"), "PNG")),
    "palette": ("png", _palette(transparency=False)),
    "rgb2": ("png", _encode(_rgb(5), "PNG")),
}
CUT_KEYS = ["c0", "c1", "c2", "c3", "c4"]  # the tar is cut off inside c3's image


@pytest.fixture(scope="module")
def bad_tar_run(tmp_path_factory, tiny_clip) -> dict:
    root = tmp_path_factory.mktemp("badtar")
    data = root / "data"
    samples = [{"__key__": k, ext: data_, "txt": f"caption of {k}"} for k, (ext, data_, _) in BAD_IMAGES.items()]
    samples += [{"__key__": k, ext: data_, "txt": f"caption of {k}"} for k, (ext, data_) in GOOD_IMAGES.items()]
    samples.insert(3, {"__key__": "caption_only", "txt": "a caption without its image", "json": b'{"width": 3}'})
    samples.insert(6, {"__key__": "empty_image", "png": b"", "txt": "a zero-byte image"})
    write_tar(data / "00000.tar", samples)

    full = write_tar(root / "full.tar", [{"__key__": k, "png": _encode(_rgb(10 + i), "PNG"), "txt": k} for i, k in enumerate(CUT_KEYS)])
    with tarfile.open(full) as tf:
        image = tf.getmember("c3.png")
    (data / "00001.tar").write_bytes(full.read_bytes()[: image.offset_data + image.size // 2])

    (data / "00002.tar").write_bytes(b"")  # zero bytes
    (data / "00003.tar").write_bytes(b"this is a text file named .tar\n" * 40)
    out = root / "out"
    res = run_raw(raw_config([data], out, model=tiny_clip, write_dataset=True, write_removed=True))
    return {"data": data, "out": out, "res": res}


def test_bad_images_fail_one_by_one(bad_tar_run):
    res, data = bad_tar_run["res"], bad_tar_run["data"]
    failed = _failed(res)
    tar = f"{data}/00000.tar"
    for key, (ext, _, reason) in BAD_IMAGES.items():
        source, error = failed[key]
        assert source == f"{tar} member {key}.{ext}", key
        assert error.startswith(reason), (key, error)
    assert "truncated" in failed["truncated"][1].lower()
    assert failed["caption_only"] == (f"{tar} member caption_only", "sample has no image (files: json, txt)")
    assert failed["empty_image"] == (f"{tar} member empty_image.png", "empty_image.png is empty (0 bytes)")
    # RGBA, grayscale and palette images without transparency are embedded
    kept_or_removed = {r["id"] for r in res.kept + res.removed}
    assert set(GOOD_IMAGES) | {"c0", "c1", "c2"} == kept_or_removed


def test_cut_off_tar_keeps_what_came_before(bad_tar_run):
    res, data = bad_tar_run["res"], bad_tar_run["data"]
    tar = f"{data}/00001.tar"
    source, error = _failed(res)["c3"]
    assert source == f"{tar} member c3"
    assert error.startswith("tar is cut off in member c3.png")
    # c4 lies after the cut: nothing of it can be known, so it is no item of the run
    assert "c4" not in {r["id"] for r in res.kept + res.removed + res.failed}
    # the samples before the cut are written back like any other
    written = []
    for sub in ("dataset", "removed"):
        with tarfile.open(bad_tar_run["out"] / sub / "00001.tar") as tf:
            written += [m.name for m in tf.getmembers()]
    assert sorted(written) == ["c0.png", "c0.txt", "c1.png", "c1.txt", "c2.png", "c2.txt"]


def _cut_tar(tmp_path: Path) -> tuple[bytes, dict[str, tarfile.TarInfo]]:
    full = write_tar(tmp_path / "full.tar", [{"__key__": k, "png": _encode(_rgb(30 + i), "PNG"), "txt": k} for i, k in enumerate(["d0", "d1", "d2"])])
    with tarfile.open(full) as tf:
        return full.read_bytes(), {m.name: m for m in tf.getmembers()}


@pytest.mark.parametrize(
    "cut, failed, error",
    [
        (lambda m: m["d1.txt"].offset + 100, "d1", "tar is cut off after member d1.png (no end-of-archive block)"),
        (lambda m: m["d2.png"].offset, "d1", "tar is cut off after member d1.txt (no end-of-archive block)"),
        (lambda m: m["d1.txt"].offset_data + 1, "d1", "tar is cut off in member d1.txt (unexpected end of data)"),
        (lambda m: m["d2.txt"].offset_data + 512, "d2", "tar is cut off after member d2.txt (no end-of-archive block)"),
    ],
    ids=["inside-a-header", "at-a-sample-boundary", "inside-the-data", "before-the-end-of-archive-block"],
)
def test_a_tar_cut_anywhere_fails_the_sample_being_read(tmp_path, cut, failed, error):
    """tarfile reads a tar cut at or inside a header as a shorter, complete tar; the scan
    must still tell that the sample being read is cut off."""
    data, members = _cut_tar(tmp_path)
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: cut(members)])
    shard = RawShard(index=0, kind="webdataset", url=str(path), modality="image")
    items = list(scan_items(shard, []))
    assert [(i.id, i.error) for i in items[:-1]] == [(k, None) for k in ["d0", "d1", "d2"][: len(items) - 1]]
    assert (items[-1].id, items[-1].source, items[-1].error) == (failed, f"{path} member {failed}", error)
    # the whole tar, and one with a single zero block as the end, read as they are
    for end in (len(data), members["d2.txt"].offset_data + 1024):
        path.write_bytes(data[:end])
        assert [(i.id, i.error) for i in scan_items(shard, [])] == [("d0", None), ("d1", None), ("d2", None)]


def test_unreadable_tars_fail_as_one_row_each(bad_tar_run):
    res, data = bad_tar_run["res"], bad_tar_run["data"]
    failed = _failed(res)
    for name, reason in (("00002.tar", "empty file"), ("00003.tar", "invalid header")):
        url = f"{data}/{name}"
        assert failed[url] == (url, f"unreadable shard: not a tar (ReadError: {reason})")


def test_bad_tar_run_accounting(bad_tar_run):
    res = bad_tar_run["res"]
    bad = [*BAD_IMAGES, "caption_only", "empty_image", "c3", f"{bad_tar_run['data']}/00002.tar", f"{bad_tar_run['data']}/00003.tar"]
    _accounted(res, [*bad, *GOOD_IMAGES, "c0", "c1", "c2"])
    assert sorted(r["id"] for r in res.failed) == sorted(bad)
    assert res.summary["n_failed"] == 10 and res.summary["n_exact"] == 0
    assert res.summary["written"]["counts"] == {"kept": len(res.kept), "removed": len(res.removed), "failed": 10}


# ---------------------------------------------------------------- image folders


def test_image_folder_with_a_zero_byte_and_a_broken_file(tmp_path, tiny_clip):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        (folder / f"ok{i}.png").write_bytes(_encode(_rgb(20 + i), "PNG"))
    (folder / "sub" / "zero.jpg").write_bytes(b"")
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    res = run_raw(raw_config([folder], tmp_path / "out", model=tiny_clip))
    _accounted(res, [f"ok{i}.png" for i in range(4)] + ["sub/zero.jpg", "sub/broken.png"])
    failed = _failed(res)
    assert failed["sub/zero.jpg"] == (f"{folder}/sub/zero.jpg", "file is empty (0 bytes)")
    assert failed["sub/broken.png"][0] == f"{folder}/sub/broken.png"
    assert failed["sub/broken.png"][1].startswith("cannot decode image")


# ---------------------------------------------------------------- text


def test_bad_text_lines(tmp_path, tiny_bert):
    data = tmp_path / "data"
    data.mkdir()
    lines = [
        {"id": "t0", "text": "w1 w2 w3"},
        {"id": "empty", "text": ""},
        {"id": "blank", "text": " \t\n  "},
        {"id": "notext", "body": "w1 w2"},
        {"id": "t1", "text": "w4 w5 w6 w7"},
        '{"id": "broken", "text": "an unterminated line',
        {"id": "long", "text": " ".join(["w9"] * 40)},
        {"id": "number", "text": 42},
        ["a", "list"],
        {"id": "t2", "text": "w8 w9"},
        {"id": "t3", "text": "w10 w11 w12 w13 w14"},
    ]
    (data / "t.jsonl").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    url = f"{data}/t.jsonl"
    res = run_raw(raw_config([data], tmp_path / "out", model=str(tiny_bert), max_length=16, truncation=False))
    good = ["t0", "t1", "t2", "t3"]
    _accounted(res, good + ["empty", "blank", "notext", f"{url}:6", "long", "number", f"{url}:9"])
    assert _failed(res) == {
        "empty": (f"{url} line 2", "text is empty"),
        "blank": (f"{url} line 3", "text is only whitespace"),
        "notext": (f"{url} line 4", "text field 'text' is missing"),
        f"{url}:6": (f"{url} line 6", _failed(res)[f"{url}:6"][1]),
        "long": (f"{url} line 7", "text has 42 tokens, more than max_length 16 (truncation is off)"),
        "number": (f"{url} line 8", "text field 'text' is not a string (int)"),
        f"{url}:9": (f"{url} line 9", "line is a JSON list, expected an object"),
    }
    assert _failed(res)[f"{url}:6"][1].startswith("line is not valid JSON (")
    assert sorted(r["id"] for r in res.kept + res.removed) == good


# ---------------------------------------------------------------- models that cannot be loaded: fail fast


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    tar = write_tar(root / "images" / "00000.tar", [{"__key__": f"k{i}", "jpg": _encode(_rgb(i), "JPEG")} for i in range(3)])
    jsonl = root / "text" / "t.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"id": f"t{i}", "text": f"w{i} w{i + 1}"}) + "\n" for i in range(3)))
    (root / "no-weights").mkdir()
    (root / "no-weights" / "open_clip_config.json").write_text("{}")
    return {"image": tar, "text": jsonl, "root": root}


@pytest.mark.parametrize(
    "modality, model, pretrained, fragments",
    [
        ("image", "ViT-Nope-99", None, ["unknown open_clip model 'ViT-Nope-99'"]),
        ("image", "RN50", None, ["open_clip model RN50 needs --pretrained", "openai"]),
        ("image", "RN50", "{root}/missing/rn50.pt", ["checkpoint {root}/missing/rn50.pt does not exist"]),
        ("image", "local-dir:{root}/no-weights", None, ["local-dir:{root}/no-weights: expected a folder with open_clip_config.json and a weights file"]),
        ("image", "RN50", "laion-nonsense", ["open_clip model RN50 has no pretrained tag 'laion-nonsense'", "known: openai"]),
        ("text", "{root}/no-such-text-model", None, ["text model {root}/no-such-text-model cannot be loaded"]),
    ],
    ids=["unknown-name", "no-pretrained", "missing-checkpoint", "local-dir-without-weights", "unknown-tag", "missing-text-model"],
)
def test_models_that_cannot_load_fail_before_any_work(tiny_inputs, tmp_path, modality, model, pretrained, fragments):
    root = tiny_inputs["root"]
    out = tmp_path / "out"
    kw = {"pretrained": pretrained.format(root=root)} if pretrained else {}
    cfg = raw_config([tiny_inputs[modality]], out, model=model.format(root=root), **kw)
    with pytest.raises(ConfigError) as info:
        plan_run(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment.format(root=root) in message, message
    assert "\n" not in message
    assert not out.exists()


def test_cut_off_gzip_jsonl_keeps_the_lines_before_the_cut(tmp_path, tiny_bert):
    import gzip

    lines = [json.dumps({"id": f"x{i}", "text": f"w{i % 60} a b c{i % 7}"}) + "\n" for i in range(400)]
    packed = gzip.compress("".join(lines).encode())
    path = tmp_path / "data" / "cut.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(packed[: len(packed) // 2])
    read = [i for i in scan_items(RawShard(index=0, kind="jsonl", url=str(path), modality="text", id_column="id", content_column="text"), []) if i.error is None]
    assert 0 < len(read) < 400 and [i.id for i in read] == [f"x{n}" for n in range(len(read))]
    res = run_raw(raw_config([path], tmp_path / "out", model=str(tiny_bert), write_dataset=True))
    cut = len(read) + 1
    assert _failed(res) == {f"{path}:{cut}": (f"{path} line {cut}", _failed(res)[f"{path}:{cut}"][1])}
    assert "cut off or corrupt" in _failed(res)[f"{path}:{cut}"][1]
    _accounted(res, [i.id for i in read] + [f"{path}:{cut}"])
    kept = {r["id"] for r in res.kept}
    written = gzip.decompress((tmp_path / "out" / "dataset" / "cut.jsonl.gz").read_bytes()).decode().splitlines(keepends=True)
    assert written == [line for line in lines if json.loads(line)["id"] in kept]


def test_an_exact_copy_of_an_item_that_fails_embedding_fails_too(tmp_path, tiny_bert):
    long_text = " ".join(f"w{i % 60}" for i in range(100))  # > tiny_bert's 64 positions
    path = tmp_path / "data" / "docs.jsonl"
    path.parent.mkdir()
    docs = [{"id": "long", "text": long_text}, {"id": "long-copy", "text": long_text.upper()}] + [{"id": f"d{i}", "text": f"w{i} a"} for i in range(6)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    res = run_raw(raw_config([path], tmp_path / "out", model=str(tiny_bert), truncation=False))
    failed = _failed(res)
    assert set(failed) == {"long", "long-copy"}
    assert "more than max_length 64" in failed["long"][1]
    assert failed["long-copy"] == (f"{path} line 2", f"exact copy of long, which failed: {failed['long'][1]}")
    assert all(r["reason"] != "exact" for r in res.removed)
    _accounted(res, [d["id"] for d in docs])


def test_duplicate_ids_across_shards_stop_the_run_before_any_embedding(tmp_path, tiny_bert):
    from semdedup_core.inputs.precomputed import InputError

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"id": "x1", "text": "w1 a"}\n{"id": "same", "text": "w2 b"}\n')
    (data / "b.jsonl").write_text('{"id": "same", "text": "w3 c"}\n')
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        run_raw(raw_config([data], out, model=str(tiny_bert)))
    message = str(info.value)
    assert "duplicate id 'same'" in message and f"{data / 'a.jsonl'} line 2" in message and f"{data / 'b.jsonl'} line 1" in message
    assert not (out / "embeddings").exists()
