"""Faults a long run meets: kill -9 at every stage then a re-run, the lease a killed run leaves
behind, and S3 requests failing (transiently or for good) through a fault-injecting proxy.

The pipeline runs in a subprocess (``run_pipeline``: the stages of the flow without Prefect's
start-up) in its own process group; the test polls the output for a stage's marker and SIGKILLs
the group when it appears. A re-run must end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fsspec.config
import numpy as np
import pytest
import s3fs

import semdedup_core.storage as storage
from semdedup_core.config import RunConfig
from semdedup_core.run.lease import Lease, LeaseError
from semdedup_core.run.dag import run_pipeline
from semdedup_core.inputs.precomputed import InputError
from semdedup_core.storage import StorageError

from .conftest import ONE_THREAD_ENV, RunResults, fast_embeddings, single_thread, unit_rows

REPO = Path(__file__).resolve().parents[1]
LEASE_TTL = 5  # seconds: SEMDEDUP_LEASE_TTL of a killed subprocess whose lease must expire
HANG_GUARD_S = 240  # bounds every wait; nothing is asserted about time
POLL_S = 0.002

# Sized so each stage outlasts the poll: 12 shards (assignment ~30 ms each), 128 buckets
# (dedup ~25 ms each, finalize reads all of them).
BIG = dict(shards=12, rows=8000, dim=32)
BIG_CFG = dict(eps=0.08, clusters=128, buckets=128, kmeans_points_per_centroid=16, kmeans_iterations=10, tile_size=256, workers=1, seed=3)
# On S3 every request costs a round trip: fewer, smaller shards and buckets.
SMALL = dict(shards=3, rows=2000, dim=16)
SMALL_CFG = dict(eps=0.08, clusters=24, buckets=12, kmeans_points_per_centroid=16, kmeans_iterations=10, tile_size=256, workers=1, seed=5)
# Through the fault proxy each injected fault costs a client back-off: the fewest requests.
TINY = dict(shards=2, rows=400, dim=16)
TINY_CFG = dict(eps=0.08, clusters=4, buckets=2, kmeans_iterations=10, workers=1, seed=9)

CHILD_SCRIPT = """
import json, os, socket, sys
if os.environ.get("TEST_PRETEND_HOSTNAME"):  # a run on another machine: its pid cannot be checked from here
    socket.gethostname = lambda: os.environ["TEST_PRETEND_HOSTNAME"]
from semdedup_core.config import RunConfig
from semdedup_core.run.dag import run_pipeline
summary = run_pipeline(RunConfig.model_validate_json(sys.argv[1]))
print(json.dumps({k: getattr(summary, k) for k in ("n_input", "n_kept", "n_removed", "n_failed")}))
"""


# ---------------------------------------------------------------- data


def make_dataset(folder: Path, shards: int, rows: int, dim: int, seed: int) -> dict:
    """Seeded unit vectors with planted near copies (10 %) and exact copies (3 %), two broken rows."""
    rng = np.random.default_rng(seed)
    n = shards * rows
    vectors = unit_rows(rng, n, dim)
    n_near, n_exact = n // 10, n // 33
    src = rng.choice(n - n_near - n_exact, n_near + n_exact, replace=False)
    near = vectors[src[:n_near]] + 0.01 * rng.standard_normal((n_near, dim)).astype(np.float32)
    vectors[n - n_near - n_exact : n - n_exact] = near / np.linalg.norm(near, axis=1, keepdims=True)
    vectors[n - n_exact :] = vectors[src[n_near:]]
    vectors[3, 0] = np.nan
    vectors[4] = 0.0
    ids = np.array([f"x{seed}-{i:06d}" for i in range(n)])
    perm = rng.permutation(n)
    files = [fast_embeddings(folder / f"emb-{s:02d}.parquet", ids[part], vectors[part]) for s, part in enumerate(np.array_split(perm, shards))]
    return {"folder": folder, "files": files, "glob": str(folder / "emb-*.parquet"), "ids": ids.tolist(), "broken": {ids[3], ids[4]}}


def reference_run(data: dict, cfg: dict, out: Path) -> RunResults:
    """The uninterrupted run on local disk, in this process."""
    with single_thread():
        run_pipeline(RunConfig(input=[data["glob"]], output=str(out), **cfg))
    results = RunResults(out)
    results.check_accounting(data["ids"])
    assert {r["id"] for r in results.failed} == data["broken"]
    assert 0 < results.summary["n_removed"] < results.summary["n_input"]
    return results


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    data = make_dataset(tmp_path_factory.mktemp("big-data"), seed=1, **BIG)
    data["reference"] = reference_run(data, BIG_CFG, tmp_path_factory.mktemp("big-ref") / "run")
    return data


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    data = make_dataset(tmp_path_factory.mktemp("small-data"), seed=2, **SMALL)
    data["reference"] = reference_run(data, SMALL_CFG, tmp_path_factory.mktemp("small-ref") / "run")
    return data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    data = make_dataset(tmp_path_factory.mktemp("tiny-data"), seed=4, **TINY)
    data["reference"] = reference_run(data, TINY_CFG, tmp_path_factory.mktemp("tiny-ref") / "run")
    return data


def upload(moto_s3, data: dict, bucket: str) -> str:
    for f in data["files"]:
        moto_s3.upload(f, bucket, f"data/{f.name}")
    return f"s3://{bucket}/data/emb-*.parquet"


def assert_same_decisions(results: RunResults, reference: RunResults, all_ids: list[str]) -> None:
    results.check_accounting(all_ids)
    got, want = results.decisions(), reference.decisions()
    assert got["kept"] == want["kept"]
    assert got["removed"] == want["removed"]  # dup_of, max_sim (bit for bit), cluster
    assert got["failed"] == want["failed"]
    assert got["scores"] == want["scores"]
    for key in ("n_input", "n_embedded", "n_kept", "n_removed", "n_failed", "eps", "clusters", "buckets"):
        assert results.summary[key] == reference.summary[key], key


# ---------------------------------------------------------------- the subprocess


class Child:
    """``run_pipeline`` in a subprocess of its own process group; always killed on exit."""

    def __init__(self, cfg: RunConfig, logdir: Path, lease_ttl: float = LEASE_TTL, pretend_hostname: str | None = None):
        self.log = logdir / f"child-{time.monotonic_ns()}.log"
        full_env = {**os.environ, **ONE_THREAD_ENV, "SEMDEDUP_LEASE_TTL": str(lease_ttl), "PYTHONUNBUFFERED": "1"}
        if pretend_hostname:
            full_env["TEST_PRETEND_HOSTNAME"] = pretend_hostname
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_SCRIPT, cfg.model_dump_json()], cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def wait_for(self, marker, what: str) -> None:
        """Poll ``marker()`` until true, then SIGKILL the process group at once."""
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            if marker():
                self.kill()
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            time.sleep(POLL_S)
        pytest.fail(f"no {what} within {HANG_GUARD_S} s:\n{self.output()[-3000:]}")

    def finish(self) -> str:
        try:
            rc = self.proc.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run still going after {HANG_GUARD_S} s:\n{self.output()[-3000:]}")
        assert rc == 0, self.output()[-3000:]
        return self.output()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- kill -9 on local disk


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


KILL_POINTS = {
    # name: (marker that the stage is under way, check of the state the kill left)
    "after-clustering": (
        lambda out: (out / "clustering" / "fit.json").exists(),
        lambda out: (out / "clustering" / "fit.json").exists() and not (out / "partitions" / "index.json").exists(),
    ),
    "during-assignment": (
        lambda out: _count(out / "partitions", "shard-*.json") > 0,
        lambda out: 0 < _count(out / "partitions", "shard-*.json") < BIG["shards"] and not (out / "partitions" / "index.json").exists(),
    ),
    "during-dedup": (
        lambda out: _count(out / "scores", "bucket-*.json") > 0,
        lambda out: 0 < _count(out / "scores", "bucket-*.json") < BIG_CFG["buckets"] and not (out / "result").exists(),
    ),
    "during-finalize": (
        lambda out: (out / "result").exists(),
        lambda out: _count(out / "scores", "bucket-*.json") == BIG_CFG["buckets"],
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_rerun_ends_like_an_uninterrupted_run(point, big, tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(input=[big["glob"]], output=str(out), **BIG_CFG)
    marker, killed_state = KILL_POINTS[point]
    with Child(cfg, tmp_path, lease_ttl=60) as child:  # the lease must not expire: its holder is seen dead
        child.wait_for(lambda: marker(out), point)
    assert child.proc.returncode == -signal.SIGKILL
    assert not (out / "result" / "summary.json").exists(), "the run had finished before the kill"
    assert killed_state(out), sorted(tree(out))
    assert "finalize" not in json.loads((out / "run.json").read_text())["stages"]

    # The killed run's lease is still there and unexpired, but its holder is a dead process of
    # this host: a re-run takes it over at once, resumes, and ends like an uninterrupted run.
    lease_url = out / "lease.json"
    record = json.loads(lease_url.read_text())
    assert record["pid"] == child.pid
    assert record["expires"] > time.time() + 5
    with single_thread():
        summary = run_pipeline(cfg)
    assert not lease_url.exists()
    assert not [p for p in tree(out) if ".semdedup-tmp-" in p]
    results = RunResults(out)
    assert summary.n_kept == results.summary["n_kept"]
    assert results.n_score_files == BIG_CFG["buckets"]
    assert_same_decisions(results, big["reference"], big["ids"])
    assert all(s["status"] == "done" for s in json.loads((out / "run.json").read_text())["stages"].values())


@pytest.mark.e2e
def test_kill_9_during_dedup_on_s3_then_rerun(moto_s3, small, tmp_path, monkeypatch):
    bucket = moto_s3.new_bucket("kill")
    cfg = RunConfig(input=[upload(moto_s3, small, bucket)], output=f"s3://{bucket}/run", **SMALL_CFG)

    def done_buckets() -> int:
        return sum(k.endswith(".json") for k in moto_s3.keys(bucket, "run/scores/"))

    # The killed run was on another machine (as far as its lease says): only expiry frees it.
    with Child(cfg, tmp_path, pretend_hostname="worker-elsewhere-7") as child:
        child.wait_for(lambda: done_buckets() > 0, "a finished dedup bucket on S3")
    assert child.proc.returncode == -signal.SIGKILL
    keys = moto_s3.keys(bucket, "run/")
    assert "run/result/summary.json" not in keys
    assert 0 < done_buckets() < SMALL_CFG["buckets"], keys

    record = json.loads(moto_s3.get(bucket, "run/lease.json"))
    assert (record["pid"], record["host"]) == (child.pid, "worker-elsewhere-7")
    # Told not to wait (SEMDEDUP_LEASE_WAIT=0), a re-run inside the TTL is refused, naming the lease
    # and its holder, before writing anything.
    monkeypatch.setenv("SEMDEDUP_LEASE_WAIT", "0")
    with single_thread(), pytest.raises(LeaseError) as refused:
        run_pipeline(cfg)
    message = str(refused.value)
    assert f"s3://{bucket}/run/lease.json" in message, message
    assert record["owner"] in message and "worker-elsewhere-7" in message and f"pid {child.pid}" in message, message
    assert moto_s3.keys(bucket, "run/") == keys
    assert json.loads(moto_s3.get(bucket, "run/lease.json")) == record
    # By default the re-run waits for that lease to expire (its holder, run with the short
    # LEASE_TTL, stopped renewing when killed), then takes over and resumes.
    monkeypatch.delenv("SEMDEDUP_LEASE_WAIT")
    with single_thread():
        run_pipeline(cfg)
    keys = moto_s3.keys(bucket, "run/")
    assert "run/lease.json" not in keys and not [k for k in keys if ".semdedup-tmp-" in k]
    results = RunResults(f"s3://{bucket}/run", moto_s3)
    assert results.n_score_files == SMALL_CFG["buckets"]
    assert_same_decisions(results, small["reference"], small["ids"])


# ---------------------------------------------------------------- S3 faults through a proxy

_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect", "content-length"}


def _s3_error(code: str, message: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>0</RequestId></Error>'.encode()


class FaultyProxy:
    """A threaded HTTP reverse proxy on 127.0.0.1 in front of the S3 endpoint, failing requests
    deterministically and counting what it did.

    - request n (1-based, all requests) gets a 503 ServiceUnavailable when n % unavailable_every == 0,
      else its connection closed without a response (the request never forwarded) when
      n % drop_every == 0;
    - requests for keys starting with a prefix in ``deny`` always get ``deny_status`` (0: the
      connection closed without a response);
    - the first request matching ``lose_response`` (method, key suffix) is forwarded, then its
      connection is closed before the response: the server applied it, the client never heard.
    """

    def __init__(self, upstream: str, unavailable_every: int = 0, drop_every: int = 0, deny: tuple[str, ...] = (), deny_status: int = 503, lose_response: tuple[str, str] | None = None):
        self.upstream_port = urlsplit(upstream).port
        self.unavailable_every, self.drop_every = unavailable_every, drop_every
        self.deny, self.deny_status = deny, deny_status
        self.lose_response = lose_response
        self.lock = threading.Lock()
        self.n = 0
        self.faults: Counter = Counter()  # (kind, method) -> count
        self.denied: list[tuple[str, str]] = []
        self.lost: list[tuple[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _hang_up(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _reply(self, status: int, code: str) -> None:
                body = _s3_error(code, "injected by the test proxy")
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    return resp, resp.read()
                finally:
                    conn.close()

            def handle_one(self) -> None:
                body = self._body()
                verdict = proxy.decide(self.command, self.path)
                if verdict == "drop":
                    return self._hang_up()
                if verdict == "unavailable":
                    return self._reply(503, "ServiceUnavailable")
                if verdict == "deny":
                    if proxy.deny_status == 0:
                        return self._hang_up()
                    return self._reply(proxy.deny_status, "AccessDenied" if proxy.deny_status == 403 else "ServiceUnavailable")
                resp, data = self._forward(body)
                if verdict == "lose":
                    return self._hang_up()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="faulty-s3-proxy", daemon=True)

    @staticmethod
    def key_of(path: str) -> str:
        parts = unquote(urlsplit(path).path).lstrip("/").split("/", 1)  # path style: /bucket/key
        return parts[1] if len(parts) == 2 else ""

    def decide(self, method: str, path: str) -> str:
        key = self.key_of(path)
        with self.lock:
            self.n += 1
            if self.deny and key.startswith(self.deny):
                self.denied.append((method, key))
                return "deny"
            if self.lose_response and not self.lost and method == self.lose_response[0] and key.endswith(self.lose_response[1]):
                self.lost.append((method, key))
                return "lose"
            if self.unavailable_every and self.n % self.unavailable_every == 0:
                self.faults["503", method] += 1
                return "unavailable"
            if self.drop_every and self.n % self.drop_every == 0:
                self.faults["drop", method] += 1
                return "drop"
            return "forward"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def through(moto_s3, monkeypatch):
    """Point this process's S3 client at a proxy (and back at moto afterwards)."""

    def use(proxy: FaultyProxy) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # cached filesystems keep their old endpoint

    yield use
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.e2e
def test_transient_s3_faults_are_retried_to_the_same_result(moto_s3, tiny, through):
    bucket = moto_s3.new_bucket("flaky")
    cfg = RunConfig(input=[upload(moto_s3, tiny, bucket)], output=f"s3://{bucket}/run", **TINY_CFG)
    with FaultyProxy(moto_s3.endpoint, unavailable_every=17, drop_every=5) as proxy, single_thread():
        through(proxy)
        run_pipeline(cfg)
    # The proxy really got in the way, of reads and writes alike.
    kinds = Counter()
    for (kind, method), n in proxy.faults.items():
        kinds[kind] += n
    assert kinds["503"] >= 5 and kinds["drop"] >= 15, proxy.faults
    assert {m for _, m in proxy.faults} >= {"GET", "PUT", "HEAD"}, proxy.faults
    assert proxy.n > 100
    keys = moto_s3.keys(bucket, "run/")
    assert "run/lease.json" not in keys
    assert_same_decisions(RunResults(f"s3://{bucket}/run", moto_s3), tiny["reference"], tiny["ids"])


@pytest.mark.e2e
@pytest.mark.parametrize(("failing", "error"), [("run/scores/", StorageError), ("data/emb-01.parquet", InputError)])
def test_an_object_that_always_fails_ends_the_run_with_an_error_naming_it(failing, error, moto_s3, tiny, through, monkeypatch):
    """Every request for the scores (or for one input shard) gets a 503. Fewer attempts keep it
    short: the project's (SEMDEDUP_STORAGE_ATTEMPTS) and botocore's (fsspec's S3 config_kwargs)."""
    monkeypatch.setattr(storage, "STORAGE_ATTEMPTS", 2)
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}})
    bucket = moto_s3.new_bucket("broken")
    cfg = RunConfig(input=[upload(moto_s3, tiny, bucket)], output=f"s3://{bucket}/run", **TINY_CFG)
    with FaultyProxy(moto_s3.endpoint, deny=(failing,)) as proxy, single_thread():
        through(proxy)
        try:
            summary = run_pipeline(cfg)
        except error as exc:
            message = str(exc)
        else:
            pytest.fail(f"the run succeeded with n_input={summary['n_input']} of {len(tiny['ids'])} items; requests for {failing} failed: {proxy.denied}")
    denied_keys = {key for _, key in proxy.denied}
    assert denied_keys and all(k.startswith(failing) for k in denied_keys)
    assert "\n" not in message
    assert any(f"s3://{bucket}/{key}" in message for key in denied_keys), (message, denied_keys)
    keys = moto_s3.keys(bucket, "run/")
    assert "run/result/summary.json" not in keys and "run/lease.json" not in keys  # the lease is given back
    if error is InputError:
        assert keys == []  # refused in planning, before any work


@pytest.mark.e2e
def test_access_denied_on_one_object_names_that_object(moto_s3, tiny, through, monkeypatch):
    """A permanent error (403 on writing one scores file) must still name the object; the
    retry layer passes permanent errors through, and s3fs's PermissionError carries only
    the server's message."""
    monkeypatch.setattr(storage, "STORAGE_ATTEMPTS", 2)
    bucket = moto_s3.new_bucket("denied")
    cfg = RunConfig(input=[upload(moto_s3, tiny, bucket)], output=f"s3://{bucket}/run", **TINY_CFG)
    target = "run/scores/bucket-00001.parquet"
    with FaultyProxy(moto_s3.endpoint, deny=(target,), deny_status=403) as proxy, single_thread():
        through(proxy)
        with pytest.raises(Exception) as failed:
            run_pipeline(cfg)
    assert proxy.denied and {key for _, key in proxy.denied} == {target}
    assert "run/result/summary.json" not in moto_s3.keys(bucket, "run/")
    assert f"s3://{bucket}/{target}" in str(failed.value), f"{type(failed.value).__name__}: {failed.value}"


@pytest.mark.e2e
def test_lease_create_whose_response_is_lost_is_still_ours(moto_s3, through):
    """The exclusive create of lease.json reaches S3 but its response is lost; the client's retry
    then meets its own lease (412). The run must not refuse itself as 'another run'."""
    bucket = moto_s3.new_bucket("lost")
    url = f"s3://{bucket}/run/lease.json"
    with FaultyProxy(moto_s3.endpoint, lose_response=("PUT", "run/lease.json")) as proxy:
        through(proxy)
        lease = Lease(url, ttl=30)
        try:
            lease.acquire()
            acquired = True
        except LeaseError as exc:
            acquired = False
            refusal = str(exc)
        finally:
            if moto_s3.keys(bucket, "run/lease.json"):
                stored = json.loads(moto_s3.get(bucket, "run/lease.json"))
            else:
                stored = None
        assert proxy.lost == [("PUT", "run/lease.json")]
        if acquired:
            lease.release()
    assert stored is not None and stored["owner"] == lease.owner  # what S3 holds is this run's lease
    assert acquired, f"refused by its own lease: {refusal}"
