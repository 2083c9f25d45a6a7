"""Nothing of the user's is lost, deleted or silently wrong: a run writes and deletes only its
own artifacts, never reads what it writes, never creates a bucket, names the object on every
storage failure, refuses to resume over a changed input, finds literal file names with glob
characters, and waits (bounded) for a lease held on another host."""

from __future__ import annotations

import json
import os
import posixpath
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semdedup_core.config import ConfigError, RunConfig
from semdedup_core.run.layout import RunLayout, is_artifact
from semdedup_core.run.lease import Lease, LeaseError
from semdedup_core.run.dag import run_pipeline
from semdedup_core.run.plan import check_output, plan_run, start_run, write_run_json
from semdedup_core.storage import StorageError, atomic_open, expand_input, list_files, parquet_writer, temp_path, write_bytes

from .conftest import ONE_THREAD_ENV, RunResults, single_thread, unit_rows, write_embeddings
from .test_cli import assert_fails_cleanly, cli

REPO = Path(__file__).resolve().parents[1]
CFG = dict(eps=0.1, clusters=3, buckets=2, kmeans_iterations=5, seed=2)
HANG_GUARD_S = 300  # a guard against a hung child only


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (empty when root does not exist)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A folder with two small parquet shards of embeddings."""
    folder = tmp_path_factory.mktemp("safety-data") / "data"
    rng = np.random.default_rng(3)
    for s in range(2):
        write_embeddings(folder / f"part-{s}.parquet", [f"s{s}-{i}" for i in range(30)], unit_rows(rng, 30, 8))
    return folder


# ---------------------------------------------------------------- through the CLI, as a user meets it


def test_fresh_on_a_folder_with_user_files_refuses_and_deletes_nothing(tmp_path, shards):
    proj = tmp_path / "proj"
    (proj / "scores").mkdir(parents=True)
    (proj / "notes.txt").write_text("n")
    (proj / "scores" / "bucket-00000.parquet").write_bytes(b"mine, named like an artifact")  # no run.json of ours
    before = snapshot(proj)
    for flag in ("--fresh", "--reuse-embeddings"):
        proc = cli(["run", str(shards), "--output", str(proj), flag, "--clusters", "2"], tmp_path)
        line = assert_fails_cleanly(proc, tmp_path / "never", str(proj), flag, "nothing was deleted")
        assert "notes.txt" in line or "2 files" in line, line
        assert snapshot(proj) == before
    # a plain run into it is refused too: it is not a run of ours
    proc = cli(["run", str(shards), "--output", str(proj), "--clusters", "2"], tmp_path)
    assert_fails_cleanly(proc, tmp_path / "never", str(proj), "empty or new folder")
    assert snapshot(proj) == before


def test_a_run_json_that_is_not_ours_does_not_make_a_folder_ours(tmp_path, shards):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "run.json").write_text(json.dumps({"format_version": 1, "my": "own file"}))
    (proj / "data.csv").write_text("a,b\n")
    before = snapshot(proj)
    proc = cli(["run", str(shards), "--output", str(proj), "--fresh", "--clusters", "2"], tmp_path)
    assert_fails_cleanly(proc, tmp_path / "never", str(proj), "nothing was deleted")
    assert snapshot(proj) == before


@pytest.mark.parametrize("where", ["same", "inside", "deeper", "holds"])
def test_output_overlapping_an_input_folder_is_refused_with_nothing_written(tmp_path, shards, where):
    data = tmp_path / "data"
    data.mkdir()
    for f in shards.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    out = {"same": data, "inside": data / "out", "deeper": data / "x" / "y", "holds": tmp_path}[where]
    before = snapshot(tmp_path)
    proc = cli(["run", str(data), "--output", str(out), "--fresh", "--clusters", "2"], tmp_path)
    assert_fails_cleanly(proc, tmp_path / "never", str(out), "overlaps the input")
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("prefect-home")} == {k: v for k, v in before.items() if not k.startswith("prefect-home")}


def test_output_under_a_recursive_glob_and_through_a_symlink_is_refused(tmp_path, shards):
    link = tmp_path / "link"
    link.symlink_to(shards, target_is_directory=True)
    for inputs, out in [([str(shards.parent / "**" / "*.parquet")], shards.parent / "sub" / "out"), ([str(shards)], link / "out")]:
        proc = cli(["run", *inputs, "--output", str(out), "--clusters", "2"], tmp_path)
        assert_fails_cleanly(proc, tmp_path / "never", "overlaps the input")
        assert not out.exists()


def test_output_that_is_a_file_or_under_a_file_is_refused(tmp_path, shards):
    target = tmp_path / "results.parquet"
    target.write_bytes(b"user data")
    for out in (target, target / "run"):
        proc = cli(["run", str(shards), "--output", str(out), "--fresh", "--clusters", "2"], tmp_path)
        assert_fails_cleanly(proc, tmp_path / "never", str(out), "is a file")
    assert target.read_bytes() == b"user data"


def test_missing_bucket_is_one_line_and_never_created(moto_s3, tmp_path, shards):
    bucket = f"typo-bucket-{os.getpid()}"
    before = {b["Name"] for b in moto_s3.client.list_buckets()["Buckets"]}
    proc = cli(["run", str(shards), "--output", f"s3://{bucket}/run", "--clusters", "2"], tmp_path)
    assert_fails_cleanly(proc, tmp_path / "never", bucket, "does not exist")
    assert {b["Name"] for b in moto_s3.client.list_buckets()["Buckets"]} == before
    # the library path too: no makedirs creates it on the way
    with pytest.raises(ConfigError, match=bucket):
        plan_run(RunConfig(input=[str(shards)], output=f"s3://{bucket}/run", clusters=2))
    with pytest.raises(StorageError, match=bucket):
        write_bytes(f"s3://{bucket}/run/x.json", b"{}")
    assert {b["Name"] for b in moto_s3.client.list_buckets()["Buckets"]} == before


def test_unreachable_endpoint_is_one_line_naming_the_bucket(moto_s3, tmp_path, shards):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"AWS_ENDPOINT_URL_S3": dead, "SEMDEDUP_STORAGE_ATTEMPTS": "1"}
    proc = cli_env(["run", str(shards), "--output", "s3://some-bucket/run", "--clusters", "2"], tmp_path, env)
    # exit 1: an endpoint that does not answer may be an outage as well as a typo
    line = assert_fails_cleanly(proc, tmp_path / "never", "s3://some-bucket", "failed", code=1)
    assert "Connect" in line or "connect" in line, line


def cli_env(args: list[str], tmp_path: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        return cli(args, tmp_path)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- changed inputs


def rewrite_same_rows(path: Path, seed: int) -> None:
    """Same ids, same row count, other vectors: only the content changed."""
    import pyarrow.parquet as pq

    ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
    stat = path.stat()
    write_embeddings(path, ids, unit_rows(np.random.default_rng(seed), len(ids), 8))
    if path.stat().st_mtime_ns == stat.st_mtime_ns:  # a coarse clock: make the rewrite visible as it would be later
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_changed_input_on_resume_is_refused_naming_it_and_fresh_redoes(tmp_path, shards):
    data = tmp_path / "data"
    data.mkdir()
    for f in shards.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    cfg = RunConfig(input=[str(data)], output=str(out), **CFG)
    with single_thread():
        first = run_pipeline(cfg)
        again = run_pipeline(cfg)  # unchanged inputs: a no-op re-run resumes
    assert again.n_kept == first.n_kept
    recorded = json.loads((out / "run.json").read_text())["fingerprints"]
    assert sorted(recorded) == [str(data / "part-0.parquet"), str(data / "part-1.parquet")]
    before = snapshot(out)
    rewrite_same_rows(data / "part-1.parquet", seed=99)
    config = tmp_path / "same.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in CFG.items()))
    proc = cli(["run", str(data), "--output", str(out), "--config", str(config)], tmp_path)
    assert_fails_cleanly(proc, tmp_path / "never", str(data / "part-1.parquet"), "changed", "--fresh")
    assert snapshot(out) == before
    with single_thread():
        run_pipeline(cfg.model_copy(update={"on_existing": "fresh"}))
        clean = run_pipeline(RunConfig(input=[str(data)], output=str(tmp_path / "clean"), **CFG))
    assert RunResults(out).decisions() == RunResults(tmp_path / "clean").decisions()
    assert clean.n_input == 60


def test_changed_input_on_s3_is_refused_naming_it(moto_s3, tmp_path, shards):
    bucket = moto_s3.new_bucket("changed")
    for f in sorted(shards.iterdir()):
        moto_s3.upload(f, bucket, f"in/{f.name}")
    cfg = RunConfig(input=[f"s3://{bucket}/in/*.parquet"], output=f"s3://{bucket}/out", **CFG)
    with single_thread():
        run_pipeline(cfg)
        run_pipeline(cfg)  # unchanged: resumes
    keys = {k: moto_s3.get(bucket, k) for k in moto_s3.keys(bucket, "out/")}
    changed = tmp_path / "part-0.parquet"
    changed.write_bytes((shards / "part-0.parquet").read_bytes())
    rewrite_same_rows(changed, seed=7)
    moto_s3.upload(changed, bucket, "in/part-0.parquet")
    with pytest.raises(ConfigError) as refused:
        plan_run(cfg)
    assert f"s3://{bucket}/in/part-0.parquet" in str(refused.value) and "--fresh" in str(refused.value)
    assert {k: moto_s3.get(bucket, k) for k in moto_s3.keys(bucket, "out/")} == keys


def test_changed_image_in_a_folder_is_refused(tmp_path, tiny_clip):
    from .conftest import png_bytes, raw_config

    rng = np.random.default_rng(1)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    cfg = raw_config([images], tmp_path / "out", model=tiny_clip)
    with single_thread():
        run_pipeline(cfg)
        run_pipeline(cfg)
    stat = (images / "3.png").stat()
    (images / "3.png").write_bytes(png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    os.utime(images / "3.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(ConfigError, match="changed") as refused:
        plan_run(cfg)
    assert str(images) in str(refused.value)


# ---------------------------------------------------------------- literal names with glob characters


def test_a_file_name_with_glob_characters_is_found_literally(tmp_path, shards):
    folder = tmp_path / "odd"
    folder.mkdir()
    literal = folder / "part[1].parquet"
    literal.write_bytes((shards / "part-0.parquet").read_bytes())
    (folder / "part1.parquet").write_bytes((shards / "part-1.parquet").read_bytes())  # what the glob would match
    assert list_files(str(literal)) == [str(literal)]
    assert expand_input(str(literal)) == ([str(literal)], None)
    assert list_files(str(folder / "part[0-9].parquet")) == [str(folder / "part1.parquet")]  # a real glob still globs
    plan = plan_run(RunConfig(input=[str(literal)], output=str(tmp_path / "out"), clusters=2))
    assert [s.url for s in plan.shards] == [str(literal)] and plan.n_input == 30
    bracket_dir = tmp_path / "set[a]"
    bracket_dir.mkdir()
    (bracket_dir / "x.parquet").write_bytes(literal.read_bytes())
    assert expand_input(str(bracket_dir)) == ([str(bracket_dir / "x.parquet")], str(bracket_dir))


# ---------------------------------------------------------------- storage errors name the object


def test_streaming_writers_name_the_object_on_storage_errors(tmp_path):
    import pyarrow as pa

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    url = str(blocker / "sub" / "x.parquet")
    with pytest.raises(StorageError, match="blocker/sub/x.parquet"):
        with parquet_writer(url, pa.schema([("a", pa.int64())])) as writer:
            writer.write_table(pa.table({"a": [1]}))
    with pytest.raises(StorageError, match="blocker/sub/x.parquet"):
        write_bytes(url, b"x")
    # an error of the caller's own code passes through unchanged, and no temp file is left
    with pytest.raises(KeyError):
        with atomic_open(str(tmp_path / "ok" / "y.bin")) as fh:
            fh.write(b"partial")
            raise KeyError("caller")
    assert list((tmp_path / "ok").iterdir()) == []


FSIZE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
from semdedup_core.config import RunConfig
from semdedup_core.run.dag import run_pipeline
from semdedup_core.storage import StorageError
try:
    run_pipeline(RunConfig.model_validate_json(sys.argv[1]))
except StorageError as exc:
    print("STORAGE-ERROR", exc)
    sys.exit(3)
"""


def test_a_full_disk_ends_the_run_with_one_line_naming_the_object(tmp_path, shards):
    """The file-size limit (RLIMIT_FSIZE) makes every write past 64 KiB fail as a full disk or a
    quota would: run.json fits, the streamed partition vectors (250 KiB a shard) do not; the run
    ends in a StorageError naming the object it was writing."""
    rng = np.random.default_rng(8)
    data = tmp_path / "big"
    for s in range(2):
        write_embeddings(data / f"p{s}.parquet", [f"b{s}-{i}" for i in range(2000)], unit_rows(rng, 2000, 32))
    out = tmp_path / "out"
    cfg = RunConfig(input=[str(data)], output=str(out), **CFG)
    env = {**os.environ, **ONE_THREAD_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, cfg.model_dump_json(), str(64 * 1024)], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stdout.strip().splitlines()[-1]
    assert message.startswith("STORAGE-ERROR ") and str(out / "partitions" / "shard-0000") in message and "File too large" in message, message
    assert not [p for p in out.rglob("*") if ".semdedup-tmp-" in p.name]  # the failed write left no temp file


# ---------------------------------------------------------------- the lease of a run on another host


def foreign_lease(url: Path, expires_in: float, owner: str = "crashed-elsewhere") -> dict:
    record = {"owner": owner, "host": "another-node-9", "pid": 4242, "expires": time.time() + expires_in}
    url.parent.mkdir(parents=True, exist_ok=True)
    # Atomically and under the temporary name a real run's atomic write uses (another host's
    # run writes its lease the same way), so a reader never sees it half written.
    tmp = url.with_name(f"{url.name}.semdedup-tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, url)
    return record


def cli_popen(args: list[str], tmp_path: Path, extra: dict[str, str]) -> subprocess.Popen:
    """The CLI as test_cli.cli runs it, streaming its stderr."""
    from .test_cli import _semdedup_cmd

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("COLUMNS", "LINES")}
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    # A loaded machine may need more than the default 20 s to start the ephemeral Prefect server.
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **extra)
    return subprocess.Popen([*_semdedup_cmd(), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_lease_from_another_host_is_waited_for_then_taken_over(tmp_path, shards):
    out = tmp_path / "out"
    record = foreign_lease(out / "lease.json", expires_in=600)
    # SEMDEDUP_LEASE_WAIT=0: refused at once, naming the holder, nothing written
    proc = cli_env(["run", str(shards), "--output", str(out), "--clusters", "2"], tmp_path, {"SEMDEDUP_LEASE_WAIT": "0"})
    assert proc.returncode == 2 and "another-node-9" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(out) == {"lease.json": json.dumps(record).encode()}

    # The holder elsewhere renews its short lease until the new run says it waits, then dies:
    # the run takes the lease over once it has expired, and runs.
    stop = threading.Event()

    def holder() -> None:
        while not stop.wait(0.2):
            foreign_lease(out / "lease.json", expires_in=3)

    renewer = threading.Thread(target=holder)
    foreign_lease(out / "lease.json", expires_in=3)
    renewer.start()
    child = cli_popen(["run", str(shards), "--output", str(out), "--clusters", "2"], tmp_path, {"SEMDEDUP_LEASE_WAIT": str(HANG_GUARD_S)})
    stderr: list[str] = []
    try:
        for line in child.stderr:
            stderr.append(line)
            if "waiting up to" in line:
                break
    finally:
        stop.set()
        renewer.join()
    try:
        rest, more = child.communicate(timeout=HANG_GUARD_S)
    finally:
        if child.poll() is None:
            child.kill()
    stderr.append(more)
    assert child.returncode == 0, rest + "".join(stderr)
    waited = [line for line in "".join(stderr).splitlines() if "waiting up to" in line]
    assert len(waited) == 1 and "another-node-9" in waited[0] and str(out / "lease.json") in waited[0], stderr
    assert json.loads((out / "result" / "summary.json").read_text())["n_input"] == 60
    assert not (out / "lease.json").exists()


def test_a_renewing_holder_on_another_host_still_ends_in_a_lease_error(tmp_path, monkeypatch):
    url = tmp_path / "out" / "lease.json"
    foreign_lease(url, expires_in=3)
    stop = threading.Event()

    def renew() -> None:  # a live run elsewhere: keeps its lease fresh
        while not stop.wait(0.2):
            foreign_lease(url, expires_in=3, owner="live-elsewhere")

    monkeypatch.setenv("SEMDEDUP_LEASE_WAIT", "6")
    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(LeaseError, match="live-elsewhere"):
            Lease(str(url), ttl=1).acquire()
    finally:
        stop.set()
        renewer.join()
    assert json.loads(url.read_text())["owner"] == "live-elsewhere"  # never touched


# ---------------------------------------------------------------- property-based: what fresh deletes, what overlaps

NAME = st.text(alphabet="abcxyzé ü-_.", min_size=1, max_size=8).filter(lambda s: s not in (".", "..") and not s.startswith("."))
USER_FOLDER = st.sampled_from(["", "scores", "result", "embeddings", "dataset", "notes", "partitions/extra", "report"])
NEAR_MISSES = st.sampled_from(
    [
        "bucket-1.parquet", "shard-0001.parquet", "run.json.bak", "kept.parquet.old", "index.htm", "Summary.json",
        "x.tmp-0123", "centroids.npy.tmp-abc", "fit.json.semdedup-tmp-" + "0" * 31, "fit.json.semdedup-tmp-" + "A" * 32,
        "notes.txt.semdedup-tmp-" + "0" * 32, "shard-00001.parquet.semdedup-tmp-" + "g" * 32,
    ]
)


def artifact_names(layout: RunLayout, n: int) -> list[str]:
    urls = [layout.scores(n), layout.scores_done(n), layout.partition(n), layout.partition_vectors(n), layout.partition_manifest(n), layout.partition_failed(n)]
    urls += [layout.embeddings(n), layout.embeddings_done(n), layout.scan(n), layout.written(n), layout.dataset("part-0.parquet"), layout.removed_dataset(f"images-{n:05d}.txt")]
    urls += [layout.centroids, layout.clustering_stats, layout.partition_index, layout.kept, layout.removed, layout.failed, layout.summary, layout.report]
    urls += [layout.tuning_result, layout.exact_duplicates, layout.cluster_sizes]
    return [posixpath.relpath(u, layout.root) for u in urls]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    ours=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 24), st.booleans()), max_size=12),
    users=st.lists(st.tuples(USER_FOLDER, st.one_of(NAME, NEAR_MISSES)), min_size=1, max_size=8),
    reuse=st.booleans(),
)
def test_fresh_deletes_exactly_our_artifacts(shards, ours, users, reuse):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = RunConfig(input=[str(shards)], output=str(out), **CFG)
        write_run_json(plan_run(cfg))  # a run of ours was here
        layout = RunLayout(str(out))
        expected_kept = {"run.json"}
        for n, pick, as_temp in ours:
            names = artifact_names(layout, n)
            rel = names[pick % len(names)]
            if as_temp:
                rel = posixpath.relpath(temp_path(str(out / rel)), str(out))
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(b"ours")
            if reuse and not as_temp and rel.split("/")[0] in ("scan", "exact", "embeddings"):
                expected_kept.add(rel)
        user_files = {}
        for folder, name in users:
            rel = posixpath.join(folder, name) if folder else name
            if rel in expected_kept or (out / rel).exists() or any(p.is_file() for p in (out / rel).parents if p != out and str(p).startswith(str(out))):
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(f"user {rel}".encode())
            user_files[rel] = f"user {rel}".encode()
        plan = plan_run(cfg.model_copy(update={"on_existing": "reuse-embeddings" if reuse else "fresh"}))
        start_run(plan)
        left = snapshot(out)
        assert {k: v for k, v in left.items() if k in user_files} == user_files  # every user file, untouched
        assert set(left) == set(user_files) | expected_kept
        for rel in user_files:  # folders holding user files stay
            assert (out / rel).parent.is_dir()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ours=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 24)), max_size=8),
    others=st.lists(st.tuples(USER_FOLDER, st.one_of(NAME, NEAR_MISSES)), min_size=1, max_size=10),
)
def test_temp_file_cleanup_removes_only_our_temp_files(shards, ours, others):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = RunConfig(input=[str(shards)], output=str(out), **CFG)
        plan = plan_run(cfg)
        write_run_json(plan)
        layout = RunLayout(str(out))
        ours_left = set()
        for n, pick in ours:
            names = artifact_names(layout, n)
            rel = posixpath.relpath(temp_path(str(out / names[pick % len(names)])), str(out))
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(b"interrupted")
            ours_left.add(rel)
        before = snapshot(out)
        user = {}
        for folder, name in others:
            rel = posixpath.join(folder, name) if folder else name
            if rel in before or rel == "run.json":
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(b"user")
            user[rel] = b"user"
        start_run(plan)  # a resume: drops interrupted temp files of ours, nothing else
        left = snapshot(out)
        assert not ours_left & set(left)
        assert {k: left.get(k) for k in user} == user


SEGMENT = st.text(alphabet="abcé ü-_", min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    a=SEGMENT, b=SEGMENT, c=SEGMENT,
    kind=st.sampled_from(["file", "folder", "glob", "recursive-glob"]),
    relation=st.sampled_from(["same", "inside", "deeper", "holds", "sibling", "name-prefix", "matched-name", "via-symlink", "dotted"]),
)
def test_overlapping_outputs_are_refused_and_disjoint_ones_accepted(shards, a, b, c, kind, relation):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        folder = base / a / b
        folder.mkdir(parents=True)
        data_file = folder / "x.parquet"
        data_file.write_bytes((shards / "part-0.parquet").read_bytes())
        (base / "link").symlink_to(folder, target_is_directory=True)
        entry = {"file": str(data_file), "folder": str(folder), "glob": str(folder / "*.parquet"), "recursive-glob": str(folder / "**" / "*.parquet")}[kind]
        outputs = {
            "same": folder if kind != "file" else data_file,
            "inside": folder / c,
            "deeper": folder / c / "run",
            "holds": base / a,
            "sibling": base / a / (b + c),
            "name-prefix": base / a / (b + "2"),
            "matched-name": folder / f"{c}.parquet",
            "via-symlink": base / "link" / c,
            "dotted": Path(f"{base}/{a}/./{b}/../{b}/{c}"),
        }
        output = outputs[relation]
        # What the input reads: the file; the folder and all below it; the folder's *.parquet
        # (and what lies inside anything so named); everything below the folder for **.
        under_folder = relation in ("same", "inside", "deeper", "matched-name", "via-symlink", "dotted")
        overlap = {
            "file": relation in ("same", "holds") or (relation == "matched-name" and c == "x"),
            "folder": under_folder or relation == "holds",
            "glob": relation in ("same", "holds", "matched-name"),
            "recursive-glob": under_folder or relation == "holds",
        }[kind]
        cfg = RunConfig(input=[entry], output=str(output), clusters=2)
        if overlap:
            with pytest.raises(ConfigError, match="overlaps the input"):
                check_output(cfg)
        else:
            check_output(cfg)
        assert data_file.read_bytes() == (shards / "part-0.parquet").read_bytes()


def test_fresh_never_deletes_through_a_symlink_in_the_run_folder(tmp_path, shards):
    out = tmp_path / "run"
    cfg = RunConfig(input=[str(shards)], output=str(out), **CFG)
    write_run_json(plan_run(cfg))  # a run of ours was here
    elsewhere = tmp_path / "my-datasets"
    elsewhere.mkdir()
    (elsewhere / "part-0.parquet").write_bytes(b"user's own file, named like a written-back shard")
    (elsewhere / "kept.parquet").write_bytes(b"user")
    (out / "dataset").symlink_to(elsewhere, target_is_directory=True)
    (out / "result").symlink_to(elsewhere, target_is_directory=True)
    (out / "scores").mkdir()
    (out / "scores" / "bucket-00000.parquet").write_bytes(b"ours")
    start_run(plan_run(cfg.model_copy(update={"on_existing": "fresh"})))
    assert snapshot(elsewhere) == {"part-0.parquet": b"user's own file, named like a written-back shard", "kept.parquet": b"user"}
    assert not (out / "scores" / "bucket-00000.parquet").exists()


def test_fresh_on_s3_deletes_only_our_objects(moto_s3, shards):
    bucket = moto_s3.new_bucket("fresh")
    for f in sorted(shards.iterdir()):
        moto_s3.upload(f, bucket, f"in/{f.name}")
    cfg = RunConfig(input=[f"s3://{bucket}/in/*.parquet"], output=f"s3://{bucket}/run", **CFG)
    # someone else's objects under a prefix: a run there is refused, fresh or not, and deletes nothing
    moto_s3.client.put_object(Bucket=bucket, Key="theirs/data.csv", Body=b"a,b")
    for mode in ("resume", "fresh"):
        with pytest.raises(ConfigError, match="holds no semdedup run"):
            plan_run(cfg.model_copy(update={"output": f"s3://{bucket}/theirs", "on_existing": mode}))
    assert moto_s3.get(bucket, "theirs/data.csv") == b"a,b"
    with single_thread():
        run_pipeline(cfg)
    moto_s3.client.put_object(Bucket=bucket, Key="run/notes.txt", Body=b"mine")
    moto_s3.client.put_object(Bucket=bucket, Key="run/scores/bucket-1.parquet", Body=b"mine too")
    with single_thread():
        summary = run_pipeline(cfg.model_copy(update={"eps": 0.3, "on_existing": "fresh"}))
    assert summary.eps == 0.3
    keys = moto_s3.keys(bucket, "run/")
    assert moto_s3.get(bucket, "run/notes.txt") == b"mine" and moto_s3.get(bucket, "run/scores/bucket-1.parquet") == b"mine too"
    assert sorted(k for k in keys if k.startswith("run/scores/bucket-0")) == [f"run/scores/bucket-0000{b}.{e}" for b in range(2) for e in ("json", "parquet")]


def test_every_location_of_the_layout_is_recognised_as_ours():
    """A new artifact added to RunLayout but not to its patterns would survive --fresh as a
    stale file: every property and per-unit method of the layout must be an artifact."""
    import inspect

    layout = RunLayout("/runs/x")
    names = frozenset({"part-0.parquet"})
    urls = []
    for name, member in inspect.getmembers(RunLayout):
        if name.startswith("_") or name == "root":
            continue
        if isinstance(member, property):
            urls.append(getattr(layout, name))
        elif inspect.isfunction(member):
            arg = {"dataset": "part-0.parquet", "removed_dataset": "part-0.parquet", "plan": "0" * 32}.get(name, 7)
            url = getattr(layout, name)(arg)
            if name == "reference_run":  # a folder holding a run layout of its own: its files are ours
                urls.append(RunLayout(url).embeddings(0))
                assert not is_artifact(posixpath.relpath(posixpath.join(url, "notes.txt"), layout.root), names)
                continue
            urls.append(url)
    assert len(urls) > 25
    for url in urls:
        relative = posixpath.relpath(url, layout.root)
        assert is_artifact(relative, names), relative


def test_refused_credentials_are_one_line_naming_the_object(tmp_path, shards):
    """An S3 endpoint that checks credentials (moto's server with authentication on) refuses
    ours: one line naming the object and the refusal, nothing created."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # a hang guard while the server starts, not a speed check
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("moto_server never accepted a connection")
        extra = {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "AKIAUNKNOWNTOTHESERVER",
            "AWS_SECRET_ACCESS_KEY": "not-a-valid-secret",
            "SEMDEDUP_STORAGE_ATTEMPTS": "1",
        }
        proc = cli_env(["run", str(shards), "--output", "s3://locked-bucket/run", "--clusters", "2"], tmp_path, extra)
    finally:
        server.kill()
        server.wait()
    line = assert_fails_cleanly(proc, tmp_path / "never", "s3://locked-bucket", code=1)
    assert "InvalidAccessKeyId" in line or "Forbidden" in line or "denied" in line.lower(), line
    assert "not-a-valid-secret" not in line


def test_read_only_output_is_refused_before_work(tmp_path, shards):
    """A folder on a read-only filesystem (a read-only tmpfs; root ignores permission bits):
    one line before any work."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only filesystem here (needs root): {mounted.stderr.decode().strip()}")
    try:
        line = assert_fails_cleanly(cli(["run", str(shards), "--output", str(ro / "run"), "--clusters", "2"], tmp_path), ro / "run", "not writable")
        assert str(ro) in line
    finally:
        subprocess.run(["umount", str(ro)], check=True)
