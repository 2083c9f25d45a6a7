"""Hostile input, by class (property-based): arbitrary ids, texts and vectors in jsonl (plain
and every compression), parquet (raw text and precomputed embeddings) and webdataset text
tars. Every run either accounts for every input item exactly once, under its canonical id
(kept ∪ removed ∪ failed, pairwise disjoint, and ``--write-dataset`` writes exactly the
kept items and ``--write-removed`` exactly the removed ones), or is refused with one line
before anything is written.

The expected ids come from the documented contract: string ids as they are, integer ids in
decimal, and an item whose own id is missing or unusable is named by where it is
(``FILE:line`` for jsonl, ``FILE:row`` for parquet, ``FILE:sample`` for tars).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from semdedup_core.config import ConfigError
from semdedup_core.inputs.precomputed import InputError

from .conftest import RunResults, raw_config, run_raw

HOSTILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# text with lone surrogates too (json.loads makes them from "\ud800" escapes)
any_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=30)
valid_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
MISSING = object()


def _refused_before_writing(exc: BaseException, out: Path) -> None:
    assert isinstance(exc, (ConfigError, InputError)), repr(exc)
    assert "\n" not in str(exc).strip()
    assert not out.exists(), "a refusal must come before anything is written"


def _check_partition(res: RunResults, expected_ids: list[str], must_fail: set[str], must_judge: set[str]) -> None:
    kept = [r["id"] for r in res.kept]
    removed = [r["id"] for r in res.removed]
    failed = [r["id"] for r in res.failed]
    assert len(set(kept)) == len(kept) and len(set(removed)) == len(removed) and len(set(failed)) == len(failed)
    assert not (set(kept) & set(removed) or set(kept) & set(failed) or set(removed) & set(failed))
    assert Counter(kept + removed + failed) == Counter(expected_ids)
    s = res.summary
    assert (s["n_kept"], s["n_removed"], s["n_failed"], s["n_input"]) == (len(kept), len(removed), len(failed), len(expected_ids))
    assert must_fail <= set(failed), must_fail - set(failed)
    assert must_judge <= set(kept) | set(removed), must_judge - set(kept) - set(removed)


def _unicode_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------- jsonl

COMPRESS = {
    None: (".jsonl", lambda b: b, lambda b: b),
    "gzip": (".jsonl.gz", gzip.compress, gzip.decompress),
    "bz2": (".jsonl.bz2", bz2.compress, bz2.decompress),
    "xz": (".jsonl.xz", lzma.compress, lzma.decompress),
    "zstd": (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b), lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)),
}

json_id = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    any_text,
    st.just(""),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(valid_text, st.integers(), max_size=1),
    st.just(MISSING),
)
json_text = st.one_of(
    any_text,
    st.sampled_from(["", " ", "\t\n ", "w1 w2", "W1  w2"]),
    st.just("w3 " * 400),  # longer than the model's 64 positions: truncated
    st.integers(),
    st.none(),
    st.just(MISSING),
)
jsonl_line = st.one_of(
    st.tuples(json_id, json_text).map(lambda it: {k: v for k, v in zip(("id", "text"), it) if v is not MISSING}),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),  # not JSON (or by chance JSON that is not an object)
)


def _jsonl_expectation(url: str, lines: list[bytes]) -> tuple[list[str], set[str], set[str], dict[str, bytes]]:
    """(ids in input order, ids that must fail, ids that must be judged, each id's line) from the contract."""
    ids, fail, judge, line_of = [], set(), set(), {}
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines are not items
        synthetic = f"{url}:{n}"
        try:
            record = json.loads(raw + b"\n")  # as read: with its newline (json.loads guesses UTF-16/32 from the first bytes)
        except ValueError:
            record = None
        line_of[synthetic] = raw
        if not isinstance(record, dict):
            ids.append(synthetic)
            fail.add(synthetic)
            continue
        value, bad = record.get("id"), False
        if "id" not in record:
            item_id = synthetic
        elif value is None or isinstance(value, bool) or not isinstance(value, (str, int)) or not _unicode_ok(str(value)):
            item_id, bad = synthetic, True
        else:
            item_id = str(value)
        text = record.get("text")
        bad = bad or not isinstance(text, str) or not text.strip() or not _unicode_ok(text)
        ids.append(item_id)
        line_of[item_id] = raw
        (fail if bad else judge).add(item_id)
    return ids, fail, judge, line_of


GOOD_LINES = [{"id": f"good-{i}", "text": f"w{i} w{i + 10} a b c{i}"} for i in range(3)]


@HOSTILE
@given(lines=st.lists(jsonl_line, max_size=8), compression=st.sampled_from(list(COMPRESS)), seed=st.integers(0, 3))
def test_jsonl_any_ids_and_texts_in_any_compression(tmp_path_factory, tiny_bert, lines, compression, seed):
    root = tmp_path_factory.mktemp("jsonl")
    suffix, compress, decompress = COMPRESS[compression]
    body = list(lines)
    for i, good in enumerate(GOOD_LINES):  # a few judgeable items anywhere, so a run has something to cluster
        body.insert((seed + i * 3) % (len(body) + 1), good)
    raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in body]
    path = root / f"data{suffix}"
    path.write_bytes(compress(b"".join(r + b"\n" for r in raw)))
    url = str(path)
    ids, must_fail, must_judge, line_of = _jsonl_expectation(url, raw)
    out = root / "out"
    cfg = raw_config([path], out, model=str(tiny_bert), clusters=1, write_dataset=True, write_removed=True)
    if len(set(ids)) < len(ids):  # e.g. 7 and "7": one canonical id twice
        event("refused: duplicate id")
        with pytest.raises(InputError, match="duplicate id"):
            run_raw(cfg)
        assert not (out / "embeddings").exists() and not (out / "result").exists()
        return
    event(f"ran, {'some' if must_fail else 'no'} failing items")
    res = run_raw(cfg)
    _check_partition(res, ids, must_fail, must_judge)
    for sub, wanted in (("dataset", res.kept), ("removed", res.removed)):
        written = decompress((out / sub / path.name).read_bytes())
        assert Counter(written.split(b"\n")[:-1]) == Counter(line_of[r["id"]] for r in wanted)  # their input lines, verbatim


@pytest.mark.parametrize("compression", list(COMPRESS))
def test_every_compression_keeps_the_lines_before_a_cut(tmp_path, tiny_bert, compression):
    suffix, compress, decompress = COMPRESS[compression]
    lines = [json.dumps({"id": i, "text": f"w{i % 60} a b c{i % 7} {i}"}).encode() + b"\n" for i in range(6000)]
    packed = bz2.compress(b"".join(lines), 1) if compression == "bz2" else compress(b"".join(lines))  # bz2: 100 kB blocks
    path = tmp_path / "data" / f"cut{suffix}"
    path.parent.mkdir()
    cut = len(packed) * 2 // 3
    while compression is None and packed[cut - 1 : cut] in (b"}", b"\n"):  # a plain file cut inside a line
        cut -= 1
    path.write_bytes(packed[:cut])
    res = run_raw(raw_config([path], tmp_path / "out", model=str(tiny_bert), clusters=2, write_dataset=True))
    failed = {r["id"]: r for r in res.failed}
    read = len(res.kept) + len(res.removed)
    assert 0 < read < 6000 and len(failed) == 1
    (cut_id, cut), = failed.items()
    assert cut_id == f"{path}:{read + 1}" and cut["source"] == f"{path} line {read + 1}"
    assert cut["error"].startswith("file is cut off or corrupt here") if compression else cut["error"].startswith("line is not valid JSON")
    assert sorted(int(r["id"]) for r in res.kept + res.removed) == list(range(read))
    kept = {r["id"] for r in res.kept}
    written = decompress((tmp_path / "out" / "dataset" / path.name).read_bytes()).splitlines(keepends=True)
    assert written == [line for line in lines if str(json.loads(line)["id"]) in kept]


def test_a_compression_that_cannot_be_read_is_refused_before_work(tmp_path, tiny_bert, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zstandard" else real(name, *a))
    path = tmp_path / "data" / "t.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"id": 1, "text": "w1"}\n'))
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        run_raw(raw_config([path], out, model=str(tiny_bert), clusters=1))
    assert str(path) in str(info.value) and "zstandard" in str(info.value)
    _refused_before_writing(info.value, out)


# ---------------------------------------------------------------- parquet: raw text

ACCEPTED_ID_TYPES = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()),
    "int64": pa.int64(),
    "int8": pa.int8(),
    "uint64": pa.uint64(),
}
REFUSED_ID_TYPES = {  # name -> (type, value of row i, how the refusal names the type)
    "float64": (pa.float64(), lambda i: float(i), "double"),
    "bool": (pa.bool_(), lambda i: bool(i % 2), "bool"),
    "binary": (pa.binary(), lambda i: str(i).encode(), "binary"),
    "list": (pa.list_(pa.int64()), lambda i: [i], "list<"),
    "struct": (pa.struct([("a", pa.int64())]), lambda i: {"a": i}, "struct<a: int64>"),
    "timestamp": (pa.timestamp("ms"), lambda i: i, "timestamp[ms]"),
    "date": (pa.date32(), lambda i: i, "date32"),
}
INVALID_UTF8 = b"bad\xff\xfe"


def _strings_with_invalid_utf8(values: list, invalid: list[bool], typ: pa.DataType) -> pa.Array:
    """A string column where the marked rows hold bytes that are not UTF-8 (parquet readers let
    them through; pyarrow refuses to build them from Python, so the buffers are built by hand)."""
    encoded = [None if v is None else (INVALID_UTF8 if bad else v.encode()) for v, bad in zip(values, invalid)]
    binary = pa.array(encoded, pa.binary())
    as_string = pa.Array.from_buffers(pa.string(), len(binary), binary.buffers(), binary.null_count)
    return as_string if typ == pa.string() else as_string.cast(pa.large_binary()).view(pa.large_string()) if typ == pa.large_string() else as_string.dictionary_encode()


def _id_values(draw, typ_name: str, n: int) -> list:
    """n ids of the kind: distinct, but now and then with a null or one id twice."""
    if typ_name in ("string", "large_string", "dictionary"):
        base = valid_text
    else:
        info = np.iinfo({"int64": np.int64, "int8": np.int8, "uint64": np.uint64}[typ_name])
        base = st.integers(int(info.min), int(info.max))
    values = draw(st.lists(base, min_size=n, max_size=n, unique=True))
    if n and draw(st.integers(0, 4)) == 0:
        values[draw(st.integers(0, n - 1))] = None
    if n >= 2 and draw(st.integers(0, 5)) == 0:
        values[draw(st.integers(1, n - 1))] = values[0]
    return values


# Refused id types are one draw in four: most examples should run.
id_kind_choice = st.one_of(st.sampled_from(list(ACCEPTED_ID_TYPES)), st.sampled_from(list(ACCEPTED_ID_TYPES)), st.sampled_from(list(ACCEPTED_ID_TYPES)), st.sampled_from(list(REFUSED_ID_TYPES)))


@st.composite
def text_parquet(draw):
    n = draw(st.integers(0, 8))
    id_kind = draw(st.one_of(st.none(), id_kind_choice))
    texts = draw(st.lists(st.one_of(valid_text, st.sampled_from(["", "  ", None])), min_size=n, max_size=n))
    bad_text = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    ids, bad_id = None, [False] * n
    if id_kind in ACCEPTED_ID_TYPES:
        ids = _id_values(draw, id_kind, n)
        if id_kind in ("string", "large_string", "dictionary"):
            bad_id = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    group = draw(st.integers(1, 4))
    return n, id_kind, ids, bad_id, texts, bad_text, group


@HOSTILE
@given(case=text_parquet(), seed=st.integers(0, 3))
def test_raw_parquet_any_id_column_and_texts(tmp_path_factory, tiny_bert, case, seed):
    n, id_kind, ids, bad_id, texts, bad_text, group = case
    root = tmp_path_factory.mktemp("rawpq")
    good_texts = [f"w{i} w{i + 20} x y{i}" for i in range(3)]
    at = sorted((seed + 2 * i) % (n + 1) for i in range(3))  # good rows, with their ids, placed among the drawn ones
    for k, pos in enumerate(at):
        texts.insert(pos + k, good_texts[k])
        bad_text.insert(pos + k, False)
        bad_id.insert(pos + k, False)
        if ids is not None:
            ids.insert(pos + k, f"good-{k}" if id_kind in ("string", "large_string", "dictionary") else 10**2 + k)
    rows = len(texts)
    columns = {"text": _strings_with_invalid_utf8(texts, bad_text, pa.string())}
    if id_kind in ACCEPTED_ID_TYPES:
        typ = ACCEPTED_ID_TYPES[id_kind]
        columns["id"] = _strings_with_invalid_utf8(ids, bad_id, typ) if id_kind in ("string", "large_string", "dictionary") else pa.array(ids, typ)
    elif id_kind is not None:
        typ, make, _ = REFUSED_ID_TYPES[id_kind]
        columns["id"] = pa.array([make(i) for i in range(rows)], typ)
    path = root / "data" / "t.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table(columns), path, row_group_size=group)
    out = root / "out"
    cfg = raw_config([path], out, model=str(tiny_bert), clusters=1, write_dataset=True, write_removed=True)
    if id_kind in REFUSED_ID_TYPES:
        event("refused: id type")
        with pytest.raises(InputError) as info:
            run_raw(cfg)
        assert f"{path}: id column 'id' has type {REFUSED_ID_TYPES[id_kind][2]}" in str(info.value)
        _refused_before_writing(info.value, out)
        return
    expected, fail, judge = [], set(), set()
    for r in range(rows):
        usable_id = ids is not None and ids[r] is not None and not bad_id[r]
        item_id = str(ids[r]) if usable_id else f"{path}:{r}"
        expected.append(item_id)
        text_ok = not bad_text[r] and texts[r] is not None and texts[r].strip() != ""
        (judge if text_ok and (usable_id or ids is None) else fail).add(item_id)
    if len(set(expected)) < len(expected):
        event("refused: duplicate id")
        with pytest.raises(InputError, match="duplicate id"):
            run_raw(cfg)
        return
    event(f"ran, {'some' if fail else 'no'} failing items")
    res = run_raw(cfg)
    _check_partition(res, expected, fail, judge)
    for sub, wanted in (("dataset", res.kept), ("removed", res.removed)):
        written = pq.read_table(out / sub / path.name)
        assert written.num_rows == len(wanted)
        if ids is not None:
            assert sorted(str(v) for v in written.column("id").to_pylist()) == sorted(r["id"] for r in wanted)


@pytest.mark.parametrize("column", ["text", "id"])
def test_a_corrupt_row_group_of_raw_parquet_fails_its_rows_only(tmp_path, tiny_bert, column):
    """Its rows fail under their ids, or, when the ids are what cannot be read, under FILE:row."""
    path = tmp_path / "data" / "t.parquet"
    path.parent.mkdir()
    table = pa.table({"id": [f"r{i}" for i in range(30)], "text": [f"w{i % 50} w{(i * 7) % 50} z{i}" for i in range(30)]})
    pq.write_table(table, path, row_group_size=10, compression="snappy")
    meta = pq.ParquetFile(path).metadata.row_group(1).column(table.schema.get_field_index(column))  # rows 10..19
    data = bytearray(path.read_bytes())
    start = meta.data_page_offset
    data[start + 20 : start + 60] = b"\xff" * 40
    path.write_bytes(bytes(data))
    res = run_raw(raw_config([path], tmp_path / "out", model=str(tiny_bert), clusters=2, write_dataset=True))
    failed = {r["id"]: r for r in res.failed}
    lost = [f"r{i}" if column == "text" else f"{path}:{i}" for i in range(10, 20)]
    assert set(failed) == set(lost)
    assert all(f["error"].startswith("row group 1 cannot be read (") and "\n" not in f["error"] for f in failed.values())
    others = {f"r{i}" for i in range(30) if not 10 <= i < 20}
    _check_partition(res, sorted(others) + lost, set(lost), others)
    assert sorted(pq.read_table(tmp_path / "out" / "dataset" / "t.parquet").column("id").to_pylist()) == sorted(r["id"] for r in res.kept)


# ---------------------------------------------------------------- parquet: precomputed embeddings

DIM = 8
BAD_VECTORS = {
    "nan": (lambda v: [float("nan")] + v[1:], "NaN or Inf"),
    "inf": (lambda v: v[:-1] + [float("-inf")], "NaN or Inf"),
    "zero": (lambda v: [0.0] * DIM, "zero norm"),
    "empty": (lambda v: [], "embedding has 0 values, expected 8"),
    "short": (lambda v: v[:3], "embedding has 3 values, expected 8"),
    "long": (lambda v: v + [0.5, 0.5], "embedding has 10 values, expected 8"),
    "null": (lambda v: None, "embedding is null"),
}
# Valid whatever their scale: normalised, never failed.
ODD_GOOD_VECTORS = {
    "huge": lambda v: [x * 1e30 for x in v],
    "tiny": lambda v: [x * 1e-30 for x in v],
    "subnormal": lambda v: [x * 1e-42 for x in v],
}


@st.composite
def embeddings_parquet(draw):
    n_good = draw(st.integers(4, 8))
    bad = draw(st.lists(st.sampled_from(list(BAD_VECTORS)), max_size=3))
    odd = draw(st.lists(st.sampled_from(list(ODD_GOOD_VECTORS)), max_size=2))
    order = draw(st.permutations(["good"] * n_good + odd + bad))
    id_kind = draw(id_kind_choice)
    ids = None
    if id_kind in ACCEPTED_ID_TYPES:
        ids = _id_values(draw, id_kind, len(order))
    return order, id_kind, ids, draw(st.integers(1, 5))


@HOSTILE
@given(case=embeddings_parquet(), seed=st.integers(0, 2**16))
def test_precomputed_any_ids_and_vectors(tmp_path_factory, case, seed):
    order, id_kind, ids, group = case
    root = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(seed)
    vectors = []
    for kind in order:
        v = [float(x) for x in rng.standard_normal(DIM)]
        vectors.append(v if kind == "good" else ODD_GOOD_VECTORS[kind](v) if kind in ODD_GOOD_VECTORS else BAD_VECTORS[kind][0](v))
    if id_kind in ACCEPTED_ID_TYPES:
        id_column = pa.array(ids, ACCEPTED_ID_TYPES[id_kind]) if id_kind != "dictionary" else pa.array(ids, pa.string()).dictionary_encode()
    else:
        typ, make, _ = REFUSED_ID_TYPES[id_kind]
        id_column = pa.array([make(i) for i in range(len(order))], typ)
    path = root / "data" / "e.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": id_column, "embedding": pa.array(vectors, pa.list_(pa.float32()))}), path, row_group_size=group)
    out = root / "out"
    cfg = raw_config([path], out, clusters=1, decode_workers=0, write_dataset=True, write_removed=True)
    expected = [None if i is None else str(i) for i in ids] if ids is not None else []
    if id_kind in REFUSED_ID_TYPES or None in expected or len(set(expected)) < len(expected):
        event("refused")
        with pytest.raises(InputError) as info:
            run_raw(cfg)
        message = str(info.value)
        if id_kind in REFUSED_ID_TYPES:
            assert f"{path}: id column 'id' has type {REFUSED_ID_TYPES[id_kind][2]}" in message
        else:
            assert "null id" in message or "duplicate id" in message
        _refused_before_writing(info.value, out)
        return
    fail = {i for i, kind in zip(expected, order) if kind in BAD_VECTORS}
    event(f"ran, {'some' if fail else 'no'} failing items")
    res = run_raw(cfg)
    _check_partition(res, expected, fail, set(expected) - fail)
    errors = {r["id"]: r["error"] for r in res.failed}
    for item_id, kind in zip(expected, order):
        if kind in BAD_VECTORS:
            assert BAD_VECTORS[kind][1] in errors[item_id], (kind, errors[item_id])
    for sub, wanted in (("dataset", res.kept), ("removed", res.removed)):
        written = pq.read_table(out / sub / path.name).column("id").to_pylist()
        assert sorted(str(i) for i in written) == sorted(r["id"] for r in wanted)


def test_float_ids_are_refused_before_anything_is_written(tmp_path):
    """1.0 would be "1" in the plan and "1.0" in the writer: float ids have no faithful text form."""
    path = tmp_path / "data" / "e.parquet"
    path.parent.mkdir()
    x = np.random.default_rng(0).standard_normal((6, DIM)).astype(np.float32)
    pq.write_table(pa.table({"id": pa.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), "embedding": pa.array(list(x), pa.list_(pa.float32()))}), path)
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        run_raw(raw_config([path], out, clusters=1, write_dataset=True))
    assert f"{path}: id column 'id' has type double" in str(info.value)
    _refused_before_writing(info.value, out)


def test_a_short_first_embedding_fails_alone(tmp_path):
    path = tmp_path / "data" / "e.parquet"
    path.parent.mkdir()
    x = [list(map(float, v)) for v in np.random.default_rng(1).standard_normal((12, DIM))]
    x[0] = x[0][:2]
    pq.write_table(pa.table({"id": [f"e{i}" for i in range(12)], "embedding": pa.array(x, pa.list_(pa.float32()))}), path)
    res = run_raw(raw_config([path], tmp_path / "out", clusters=2))
    assert [(r["id"], r["error"]) for r in res.failed] == [("e0", "embedding has 2 values, expected 8")]
    assert len(res.kept) + len(res.removed) == 11


def test_a_corrupt_precomputed_page_is_one_line_naming_the_file(tmp_path):
    from semdedup_core.run.dag import run_pipeline

    path = tmp_path / "data" / "e.parquet"
    path.parent.mkdir()
    x = np.random.default_rng(2).standard_normal((40, DIM)).astype(np.float32)
    pq.write_table(pa.table({"id": [f"e{i}" for i in range(40)], "embedding": pa.array(list(x), pa.list_(pa.float32()))}), path, row_group_size=20)
    meta = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    data[meta.data_page_offset + 20 : meta.data_page_offset + 80] = b"\xff" * 60
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as info:
        run_pipeline(raw_config([path], tmp_path / "out", clusters=2))
    message = str(info.value)
    assert message.startswith(f"{path}: unreadable parquet data") and "\n" not in message


# ---------------------------------------------------------------- webdataset text tars

key_bytes = st.binary(min_size=0, max_size=12).filter(lambda b: not set(b) & {0, ord("."), ord("/")})
txt_member = st.one_of(valid_text.map(str.encode), st.just(INVALID_UTF8), st.just(b""), st.just(b"  \n"), st.none())


@HOSTILE
@given(samples=st.lists(st.tuples(key_bytes, txt_member), max_size=6, unique_by=lambda s: s[0]), seed=st.integers(0, 3))
def test_webdataset_text_any_member_names_and_texts(tmp_path_factory, tiny_bert, samples, seed):
    root = tmp_path_factory.mktemp("wds")
    body = list(samples)
    for i in range(3):
        body.insert((seed + 2 * i) % (len(body) + 1), (f"good-{i}".encode(), f"w{i} w{i + 30} q r{i}".encode()))
    if len({k for k, _ in body}) < len(body):
        return  # a drawn key equal to a good one: two samples under one key are no property of this test
    path = root / "data" / "00000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for key, txt in body:
            name = key.decode("utf-8", "surrogateescape")
            members = {"json": b"{}"} if txt is None else {"txt": txt}
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    out = root / "out"
    cfg = raw_config([path], out, model=str(tiny_bert), modality="text", clusters=1, write_dataset=True, write_removed=True)
    expected, fail, judge = [], set(), set()
    for row, (key, txt) in enumerate(body):
        try:
            item_id, id_ok = key.decode("utf-8"), True
        except UnicodeDecodeError:
            item_id, id_ok = f"{path}:{row}", False
        expected.append(item_id)
        text_ok = txt is not None and txt != INVALID_UTF8 and txt.decode().strip() != ""
        (judge if id_ok and text_ok else fail).add(item_id)
    event(f"ran, {'some' if fail else 'no'} failing items")
    res = run_raw(cfg)
    _check_partition(res, expected, fail, judge)
    for sub, wanted in (("dataset", res.kept), ("removed", res.removed)):
        with tarfile.open(out / sub / path.name) as tf:
            keys = [m.name.rsplit(".", 1)[0] for m in tf.getmembers()]
        assert sorted(keys) == sorted(r["id"] for r in wanted)


def test_wrong_lengths_fail_alone_in_any_shard(tmp_path):
    """The dimension is agreed across shards: a shard whose first row is short, a one-row shard
    of another length and a shard with one long row all keep their other rows."""
    rng = np.random.default_rng(3)

    def rows(n: int) -> list[list[float]]:
        return [list(map(float, v)) for v in rng.standard_normal((n, DIM))]

    a, b, c = rows(10), [list(map(float, rng.standard_normal(5)))], rows(3)
    a[0] = a[0][:5]
    c[1] = c[1] + c[1]
    data = tmp_path / "data"
    data.mkdir()
    for name, vectors in (("a", a), ("b", b), ("c", c)):
        ids = [f"{name}{i}" for i in range(len(vectors))]
        pq.write_table(pa.table({"id": ids, "embedding": pa.array(vectors, pa.list_(pa.float32()))}), data / f"{name}.parquet")
    res = run_raw(raw_config([data], tmp_path / "out", clusters=2))
    assert {r["id"]: r["error"] for r in res.failed} == {
        "a0": "embedding has 5 values, expected 8",
        "b0": "embedding has 5 values, expected 8",
        "c1": "embedding has 16 values, expected 8",
    }
    assert len(res.kept) + len(res.removed) == 11


def test_unsupported_compression_is_refused_before_work(tmp_path, tiny_bert):
    path = tmp_path / "data" / "t.jsonl.zip"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04")
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        run_raw(raw_config([path], out, model=str(tiny_bert), format="jsonl", clusters=1))
    assert str(info.value) == f"{path}: zip compression is not supported for jsonl (gz, bz2, xz and zst are)"
    _refused_before_writing(info.value, out)


def test_an_image_file_name_that_is_not_utf8_fails_that_image(tmp_path, tiny_clip):
    import os

    from .conftest import png_bytes

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(4)
    names = [b"ok0.png", b"bad\xff.png", b"ok1.png", b"ok2.png"]
    for name in names:
        Path(os.fsdecode(bytes(folder) + b"/" + name)).write_bytes(png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    out = tmp_path / "out"
    res = run_raw(raw_config([folder], out, model=tiny_clip, clusters=1, write_dataset=True))
    assert [(r["id"], r["error"]) for r in res.failed] == [("bad\\udcff.png", "id is not valid Unicode (lone surrogate U+DCFF at character 3)")]
    assert sorted(r["id"] for r in res.kept + res.removed) == ["ok0.png", "ok1.png", "ok2.png"]
    listed = (out / "dataset" / "images-00000.txt").read_text().split()
    assert sorted(listed) == sorted(f"{folder}/{r['id']}" for r in res.kept)
