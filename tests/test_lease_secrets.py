"""One run per output (the lease), starting over with --fresh, and credentials that never leave
the environment or the Prefect Secret block: not in output, logs, run.json, artifacts or the
flow run's parameters."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import fsspec.config
import numpy as np
import pytest
import s3fs

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.lease import Lease, LeaseError
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.plan import plan_run

from .conftest import FAKE_AWS_KEY, FAKE_AWS_SECRET, ONE_THREAD_ENV, RunResults, single_thread, unit_rows, write_embeddings

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 300  # a guard against a hung child only
CFG = dict(eps=0.1, clusters=6, buckets=2, kmeans_iterations=10, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Two small seeded shards with planted near copies."""
    folder = tmp_path_factory.mktemp("lease-data")
    rng = np.random.default_rng(77)
    base = unit_rows(rng, 700, 16)
    near = base[:100] + 0.01 * rng.standard_normal((100, 16)).astype(np.float32)
    vectors = np.concatenate([base, near / np.linalg.norm(near, axis=1, keepdims=True)])
    ids = [f"ls-{i:04d}" for i in range(len(vectors))]
    perm = rng.permutation(len(vectors))
    files = [write_embeddings(folder / f"sh-{s}.parquet", [ids[i] for i in part], vectors[part]) for s, part in enumerate(np.array_split(perm, 2))]
    return {"files": files, "glob": str(folder / "sh-*.parquet"), "ids": ids}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def tree_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the lease


def test_second_run_is_refused_while_the_lease_is_held(data, tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(input=[data["glob"]], output=str(out), **CFG)
    lease_url = str(out / "lease.json")

    def assert_refusal_names_holder(exc: LeaseError, holder: Lease) -> None:
        message = str(exc)
        assert lease_url in message and holder.owner in message and f"pid {os.getpid()}" in message, message

    # A fresh output: nothing but the holder's lease is ever written.
    with Lease(lease_url, ttl=30) as holder:
        before = tree(out)
        assert list(before) == ["lease.json"]
        with pytest.raises(LeaseError) as planned:
            plan_run(cfg)
        assert_refusal_names_holder(planned.value, holder)
        with single_thread(), pytest.raises(LeaseError) as ran:
            run_pipeline(cfg)
        assert_refusal_names_holder(ran.value, holder)
        assert tree(out) == before
    assert not (out / "lease.json").exists()  # released

    # Once free, it runs; the run gives its lease back.
    with single_thread():
        run_pipeline(cfg)
    assert not (out / "lease.json").exists()

    # A finished run at the output: a concurrent re-run (resume) is refused too and touches nothing.
    before = tree_times(out)
    with Lease(lease_url, ttl=30) as holder:
        with single_thread(), pytest.raises(LeaseError) as ran:
            run_pipeline(cfg)
        assert_refusal_names_holder(ran.value, holder)
    assert tree_times(out) == before


@pytest.fixture(params=["local", "s3"])
def lease_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out" / "lease.json")
    moto_s3 = request.getfixturevalue("moto_s3")
    return f"s3://{moto_s3.new_bucket('lease')}/out/lease.json"


def read_lease(url: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def write_lease(url: str, record: dict) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())


def test_lease_is_exclusive(lease_url):
    first = Lease(lease_url, ttl=30).acquire()
    try:
        with pytest.raises(LeaseError) as refused:
            Lease(lease_url, ttl=30).acquire()
        assert first.owner in str(refused.value) and lease_url in str(refused.value)
        assert read_lease(lease_url)["owner"] == first.owner
    finally:
        first.release()
    assert read_lease(lease_url) is None

    # Sixteen runs starting at the same moment: exactly one gets it, the others are refused.
    barrier = threading.Barrier(16)
    won: list[Lease] = []
    lost: list[str] = []
    errors: list[BaseException] = []

    def contend() -> None:
        lease = Lease(lease_url, ttl=30)
        barrier.wait(timeout=60)
        try:
            won.append(lease.acquire())
        except LeaseError as exc:
            lost.append(str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        assert len(won) == 1 and len(lost) == 15, (won, lost)
        assert read_lease(lease_url)["owner"] == won[0].owner
        assert all(won[0].owner in message for message in lost)
    finally:
        for lease in won:
            lease.release()
    assert read_lease(lease_url) is None


def test_lease_is_created_whole_and_a_corrupt_one_is_taken_over(tmp_path):
    """Leases are created whole (temp file + hard link locally, one conditional PUT on S3), so
    no reader ever sees a half-written one; a lease.json that cannot be parsed is therefore
    corrupt, counts as expired, and the next run takes it over instead of crashing."""
    from semdedup_core.run.lease import check_free

    out = tmp_path / "out"
    out.mkdir()
    url = str(out / "lease.json")
    holder = Lease(url, ttl=30).acquire()
    try:
        assert json.loads((out / "lease.json").read_bytes())["owner"] == holder.owner
        assert sorted(p.name for p in out.iterdir()) == ["lease.json"]  # no temp file left
    finally:
        holder.release()
    (out / "lease.json").write_bytes(b"")  # e.g. a disk that lost the data
    check_free(url)  # not held
    taker = Lease(url, ttl=30).acquire()
    try:
        assert taker.took_over == {}
        assert json.loads((out / "lease.json").read_bytes())["owner"] == taker.owner
    finally:
        taker.release()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_stale_lease_is_taken_over(lease_url):
    import socket

    # Expired: its run stopped renewing long ago.
    expired = {"owner": "dead-run-expired", "host": "node-that-died", "pid": 4242, "expires": time.time() - 5}
    write_lease(lease_url, expired)
    lease = Lease(lease_url, ttl=30).acquire()
    assert lease.took_over == expired
    assert read_lease(lease_url)["owner"] == lease.owner
    lease.release()
    assert read_lease(lease_url) is None

    # Unexpired, but its holder was a process of this host that no longer exists.
    dead = {"owner": "dead-run-local", "host": socket.gethostname(), "pid": _dead_pid(), "expires": time.time() + 600}
    write_lease(lease_url, dead)
    lease = Lease(lease_url, ttl=30).acquire()
    assert lease.took_over == dead
    lease.release()

    # Unexpired and held elsewhere: nothing here can tell that run is dead, so it is refused.
    elsewhere = {"owner": "live-run-elsewhere", "host": "another-node", "pid": 4242, "expires": time.time() + 600}
    write_lease(lease_url, elsewhere)
    with pytest.raises(LeaseError) as refused:
        Lease(lease_url, ttl=30).acquire()
    assert "live-run-elsewhere" in str(refused.value) and "another-node" in str(refused.value)
    assert read_lease(lease_url) == elsewhere


def test_renewal_moves_the_expiry_forward(lease_url):
    ttl = 0.9
    lease = Lease(lease_url, ttl=ttl).acquire()
    try:
        first = read_lease(lease_url)
        deadline = time.monotonic() + 30
        while (current := read_lease(lease_url))["expires"] == first["expires"]:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        assert current["owner"] == first["owner"] == lease.owner
        assert current["expires"] > first["expires"]
        # Long past the first expiry, it is still live: renewal keeps it.
        time.sleep(max(0.0, first["expires"] - time.time()) + 2 * ttl)
        assert read_lease(lease_url)["expires"] > first["expires"] + ttl
        with pytest.raises(LeaseError):
            Lease(lease_url, ttl=30).acquire()
    finally:
        lease.release()
    assert read_lease(lease_url) is None


# ---------------------------------------------------------------- starting over


def test_fresh_deletes_an_old_run_with_a_different_config_and_nothing_else(data, tmp_path):
    out = tmp_path / "run"
    with single_thread():
        run_pipeline(RunConfig(input=[data["glob"]], output=str(out), **{**CFG, "eps": 0.3, "buckets": 3}))
    (out / "notes-from-the-old-run.txt").write_text("stale")
    assert len(list((out / "scores").glob("*.parquet"))) == 3
    new = {**CFG, "eps": 0.05, "buckets": 2}
    with single_thread(), pytest.raises(ConfigError) as refused:
        run_pipeline(RunConfig(input=[data["glob"]], output=str(out), **new))
    assert "eps" in str(refused.value) and "buckets" in str(refused.value)
    with single_thread():
        summary = run_pipeline(RunConfig(input=[data["glob"]], output=str(out), on_existing="fresh", **new))
    assert summary.eps == 0.05 and summary.buckets == 2
    assert (out / "notes-from-the-old-run.txt").read_text() == "stale"  # not ours: never deleted
    assert sorted(p.name for p in (out / "scores").glob("*.parquet")) == ["bucket-00000.parquet", "bucket-00001.parquet"]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["eps"] == 0.05 and run["buckets"] == 2
    assert not (out / "lease.json").exists()
    # exactly what the new config gives in an empty folder
    clean = tmp_path / "clean"
    with single_thread():
        run_pipeline(RunConfig(input=[data["glob"]], output=str(clean), **new))
    assert RunResults(out).decisions() == RunResults(clean).decisions()


# ---------------------------------------------------------------- secrets


def secret_variants(*values: str) -> list[bytes]:
    """The values as they could appear: raw, URL-quoted and JSON-escaped."""
    out = set()
    for v in values:
        out |= {v, quote(v, safe=""), json.dumps(v)[1:-1]}
    return sorted(x.encode() for x in out)


def assert_no_secret(blob: bytes | str, where: str, *values: str) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    for variant in secret_variants(*values):
        assert variant not in data, f"{variant!r} found in {where}"


def assert_bucket_clean(moto_s3, bucket: str, prefix: str, *values: str) -> int:
    keys = moto_s3.keys(bucket, prefix)
    for key in keys:
        assert_no_secret(moto_s3.get(bucket, key), f"s3://{bucket}/{key}", *values)
    return len(keys)


def prefect_backend_dump() -> str:
    """Every flow run (parameters, state messages), task run, artifact and log the Prefect
    backend holds, as text."""
    from prefect.client.orchestration import get_client

    parts = []
    with get_client(sync_client=True) as client:
        for read in (client.read_flow_runs, client.read_task_runs):
            offset = 0
            while batch := read(limit=100, offset=offset):
                parts.extend(item.model_dump_json() for item in batch)
                offset += len(batch)
        offset = 0
        while batch := client.read_artifacts(limit=100, offset=offset):
            parts.extend(item.model_dump_json() for item in batch)
            offset += len(batch)
        offset = 0
        while batch := client.read_logs(limit=100, offset=offset):
            parts.extend(item.model_dump_json() for item in batch)
            offset += len(batch)
    return "\n".join(parts)


def upload(moto_s3, data: dict, bucket: str) -> str:
    for f in data["files"]:
        moto_s3.upload(f, bucket, f"in/{f.name}")
    return f"s3://{bucket}/in/sh-*.parquet"


def cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("COLUMNS", "LINES")}
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    # A loaded machine may need more than the default 20 s to start the ephemeral Prefect server.
    env.update(ONE_THREAD_ENV, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    script = shutil.which("semdedup", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "flows.cli"]
    return subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)


@pytest.mark.e2e
def test_cli_verbose_run_on_s3_leaks_no_credentials_and_fresh_replaces_the_old_run(moto_s3, data, tmp_path):
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_AWS_SECRET  # the run's only credentials
    bucket = moto_s3.new_bucket("cli")
    source = upload(moto_s3, data, bucket)
    out = f"s3://{bucket}/run"
    with single_thread():  # an old run with another config at the same output
        run_pipeline(RunConfig(input=[source], output=out, **{**CFG, "eps": 0.3, "buckets": 3}))
    assert len([k for k in moto_s3.keys(bucket, "run/scores/") if k.endswith(".parquet")]) == 3

    proc = cli(["run", source, "--output", out, "--eps", "0.05", "--clusters", "6", "--buckets", "2", "--seed", "1", "--workers", "2", "--fresh", "--verbose"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    console = proc.stdout + proc.stderr
    assert "Completed" in console and "semdedup" in console  # Prefect's logs were shown
    assert_no_secret(console, "the CLI's output", FAKE_AWS_KEY, FAKE_AWS_SECRET)
    assert assert_bucket_clean(moto_s3, bucket, "run/", FAKE_AWS_KEY, FAKE_AWS_SECRET) > 10

    # --fresh replaced the old run
    run = json.loads(moto_s3.get(bucket, "run/run.json"))
    assert run["config"]["eps"] == 0.05 and run["buckets"] == 2
    assert sorted(k for k in moto_s3.keys(bucket, "run/scores/") if k.endswith(".parquet")) == ["run/scores/bucket-00000.parquet", "run/scores/bucket-00001.parquet"]
    RunResults(out, moto_s3).check_accounting(data["ids"])


@pytest.mark.e2e
def test_flow_run_keeps_environment_credentials_out_of_prefect_and_the_output(prefect_harness, moto_s3, data):
    from flows.dedup_flow import semdedup_flow

    bucket = moto_s3.new_bucket("envcreds")
    out = f"s3://{bucket}/run"
    summary = semdedup_flow(config=RunConfig(input=[upload(moto_s3, data, bucket)], output=out, workers=2, **CFG))
    assert summary.n_input == len(data["ids"])
    RunResults(out, moto_s3).check_accounting(data["ids"])
    assert assert_bucket_clean(moto_s3, bucket, "run/", FAKE_AWS_KEY, FAKE_AWS_SECRET) > 10
    dump = prefect_backend_dump()
    assert out in dump and "semdedup run summary" in dump  # the flow run's parameters and artifact are there
    assert_no_secret(dump, "the Prefect backend", FAKE_AWS_KEY, FAKE_AWS_SECRET)


@pytest.mark.e2e
def test_credentials_only_from_a_prefect_secret_block(prefect_harness, moto_s3, data, monkeypatch):
    from prefect.blocks.system import Secret

    from flows.dedup_flow import semdedup_flow

    key, secret = "AKIABLOCKONLYKEY0042", "blockONLYsecret/zz+Q81wX"
    bucket = moto_s3.new_bucket("block")
    source = upload(moto_s3, data, bucket)
    Secret(value=json.dumps({"key": key, "secret": secret, "client_kwargs": {"endpoint_url": moto_s3.endpoint, "region_name": "us-east-1"}})).save(
        "semdedup-test-s3", overwrite=True
    )
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(fsspec.config, "conf", copy.deepcopy(fsspec.config.conf))  # the block's options stay in this test
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        out = f"s3://{bucket}/run"
        summary = semdedup_flow(config=RunConfig(input=[source], output=out, storage_block="semdedup-test-s3", workers=2, **CFG))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    # It ran against moto: the endpoint came from the block only.
    assert summary.n_input == len(data["ids"])
    results = RunResults(out, moto_s3)
    results.check_accounting(data["ids"])
    run = json.loads(moto_s3.get(bucket, "run/run.json"))
    assert run["config"]["input"] == [source]
    assert assert_bucket_clean(moto_s3, bucket, "run/", key, secret) > 10
    assert_no_secret(prefect_backend_dump(), "the Prefect backend", key, secret)


CRED_KEY, CRED_SECRET = "AKIAURLKEY77", "url-secret-Zq9"
CRED_URL = f"s3://{CRED_KEY}:{CRED_SECRET}@bucket/x"


@pytest.mark.parametrize("field", ["input", "output"])
def test_credentials_in_a_url_are_refused_by_run_config_without_echoing_them(field, tmp_path):
    kwargs = {"input": [str(tmp_path / "*.parquet")], "output": str(tmp_path / "out")}
    kwargs[field] = [CRED_URL] if field == "input" else CRED_URL
    with pytest.raises(ValueError) as refused:
        RunConfig(**kwargs)
    assert "credentials" in str(refused.value)
    assert_no_secret(str(refused.value), f"the error refusing a credential URL in {field}", CRED_SECRET)
    with pytest.raises(ConfigError) as loaded:
        RunConfig.load(**kwargs)
    assert "credentials" in str(loaded.value) and "\n" not in str(loaded.value)
    assert_no_secret(str(loaded.value), f"RunConfig.load's error for {field}", CRED_SECRET)


def test_cli_refuses_credentials_in_a_url_in_one_line_without_echoing_them(tmp_path):
    proc = cli(["run", CRED_URL, "--output", str(tmp_path / "out")], tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "credentials" in lines[0], proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, "the CLI's refusal", CRED_SECRET)
    assert not (tmp_path / "out").exists()
