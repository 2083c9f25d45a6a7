"""Shared test setup: offline, quiet, real Prefect (test harness), small generated data."""

from __future__ import annotations

import os

# Before prefect/transformers are imported anywhere in the session.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import io
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect backend for flow tests (started once per session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(path: Path, ids, vectors: np.ndarray, **extra) -> Path:
    """A parquet shard of precomputed embeddings: id + embedding (list<float32>) [+ extra columns]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"id": pa.array(list(ids), pa.string()), "embedding": pa.array(list(np.asarray(vectors, np.float32)), pa.list_(pa.float32()))}
    columns.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(columns), path)
    return path


# ---------------------------------------------------------------- S3 (moto's server on 127.0.0.1)

# Distinctive fake credentials (moto accepts any): the secret tests grep for them.
FAKE_AWS_KEY = "AKIASEMDEDUPTESTKEY7Q"
FAKE_AWS_SECRET = "semdedupTESTsecret+x9Vq2/kL0pZr7"


class MotoS3:
    """A running moto S3 server and a boto3 client for setting up and inspecting buckets."""

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=FAKE_AWS_KEY, aws_secret_access_key=FAKE_AWS_SECRET
        )
        self._n = 0

    def new_bucket(self, prefix: str = "bkt") -> str:
        self._n += 1
        name = f"{prefix}-{os.getpid()}-{self._n}"
        self.client.create_bucket(Bucket=name)
        return name

    def upload(self, local: Path, bucket: str, key: str) -> str:
        self.client.upload_file(str(local), bucket, key)
        return f"s3://{bucket}/{key}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def moto_s3():
    """A real HTTP S3 endpoint (moto's ThreadedMotoServer on 127.0.0.1, a free port), with the
    AWS_* environment pointing at it for the whole session; subprocesses inherit it."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_AWS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        s3fs.S3FileSystem.clear_instance_cache()
        yield MotoS3(endpoint)
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@contextmanager
def single_thread():
    """One torch/faiss thread for in-process runs: on a shared 2-core machine, spinning OpenMP
    threads make the kernel orders of magnitude slower (nothing is asserted on time)."""
    import faiss
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)


# Environment for pipeline subprocesses: one compute thread each (see single_thread).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def fast_embeddings(path: Path, ids, vectors: np.ndarray) -> Path:
    """Like write_embeddings, as a fixed_size_list<float32> column (fast for many rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
    pq.write_table(pa.table({"id": pa.array(list(ids), pa.string()), "embedding": emb}), path)
    return path


class RunResults:
    """Everything a finished run decided, read without the project's code, from a local
    folder or an ``s3://bucket/prefix`` (through ``moto``)."""

    def __init__(self, root: str | Path, moto: MotoS3 | None = None):
        self.root = str(root)
        self.moto = moto
        self.summary = json.loads(self._read("result/summary.json"))
        self.kept = self._table("result/kept.parquet").to_pylist()
        self.removed = self._table("result/removed.parquet").to_pylist()
        self.failed = self._table("result/failed.parquet").to_pylist()
        score_files = [f for f in self._list("scores") if f.endswith(".parquet") and not f.endswith(".earlier.parquet")]
        self.n_score_files = len(score_files)
        self.scores = pa.concat_tables([self._table(f) for f in score_files]).to_pylist() if score_files else []

    def _split(self) -> tuple[str, str]:
        bucket, _, prefix = self.root.removeprefix("s3://").partition("/")
        return bucket, prefix.rstrip("/")

    def _read(self, rel: str) -> bytes:
        if self.root.startswith("s3://"):
            bucket, prefix = self._split()
            return self.moto.get(bucket, f"{prefix}/{rel}")
        return (Path(self.root) / rel).read_bytes()

    def _table(self, rel: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self._read(rel)))

    def _list(self, rel_dir: str) -> list[str]:
        if self.root.startswith("s3://"):
            bucket, prefix = self._split()
            return [k[len(prefix) + 1 :] for k in self.moto.keys(bucket, f"{prefix}/{rel_dir}/")]
        return sorted(str(p.relative_to(self.root)) for p in (Path(self.root) / rel_dir).glob("*"))

    @staticmethod
    def _f32(value) -> int | None:
        return None if value is None else int(np.float32(value).view(np.uint32))

    def decisions(self) -> dict:
        """Per id: kept / removed (dup_of, max_sim bits, cluster) / failed (error), and the scores
        row (cluster, centroid_sim bits, max_sim bits, dup_of, kept): comparable across runs."""
        return {
            "kept": sorted(r["id"] for r in self.kept),
            "removed": {r["id"]: (r["dup_of"], self._f32(r["max_sim"]), r["cluster"]) for r in self.removed},
            "failed": {r["id"]: r["error"] for r in self.failed},
            "scores": {
                r["id"]: (r["cluster"], self._f32(r["centroid_sim"]), self._f32(r["max_sim"]), r["dup_of"], r["kept"]) for r in self.scores
            },
        }

    def check_accounting(self, all_ids: list[str]) -> None:
        """Every input id exactly once in kept / removed / failed, and the counts add up."""
        kept = [r["id"] for r in self.kept]
        removed = [r["id"] for r in self.removed]
        failed = [r["id"] for r in self.failed]
        everything = kept + removed + failed
        assert len(everything) == len(set(everything)), "an id appears twice in the results"
        assert sorted(everything) == sorted(all_ids)
        scored = [r["id"] for r in self.scores]
        assert len(scored) == len(set(scored)) and set(scored) == set(kept) | set(removed)
        s = self.summary
        assert (s["n_kept"], s["n_removed"], s["n_failed"]) == (len(kept), len(removed), len(failed))
        assert s["n_kept"] + s["n_removed"] + s["n_failed"] == s["n_input"] == len(all_ids)


# ---------------------------------------------------------------- tiny models, saved and loaded back through the real loaders

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny open_clip model (random weights, seeded) saved as an open_clip ``local-dir:``
    folder (open_clip_config.json + open_clip_model.safetensors); returns the model name."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def _save_tiny_text_model(folder: Path, config) -> Path:
    import torch
    from transformers import AutoModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"w{i}" for i in range(60)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BertModel + tokenizer saved with save_pretrained (mean pooling by default)."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return _save_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"), config)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """A tiny OPT decoder saved with save_pretrained (last-token pooling by default, as the paper's OPT recipe)."""
    from transformers import OPTConfig

    config = OPTConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
        word_embed_proj_dim=32, pad_token_id=0, architectures=["OPTForCausalLM"],
    )
    return _save_tiny_text_model(tmp_path_factory.mktemp("tiny-opt"), config)


def png_bytes(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar in img2dataset's layout, written with webdataset's own TarWriter
    (each sample: __key__ plus extension -> bytes/str)."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def raw_config(inputs, out: Path, **kw):
    """A RunConfig for small raw-input runs: 2 clusters, decoding in the task's own process."""
    from semdedup_core.config import RunConfig

    kw.setdefault("clusters", 2)
    kw.setdefault("decode_workers", 0)
    return RunConfig(input=[str(i) for i in inputs], output=str(out), **kw)


def run_raw(cfg) -> RunResults:
    """The whole pipeline without Prefect, single-threaded, and what it decided."""
    from semdedup_core.run.dag import run_pipeline

    with single_thread():
        run_pipeline(cfg)
    return RunResults(cfg.output)
