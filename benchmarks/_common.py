"""Shared helpers for the benchmarks: seeded synthetic embeddings, RSS readings, table output.

Only the standard library, numpy and pyarrow (all installed by the project) are used here;
torch and the project are imported by the scripts themselves.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

GiB = 2**30
MiB = 2**20


# ---------------------------------------------------------------- synthetic data


def _unit_rows_inplace(x: np.ndarray) -> None:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    x /= norms[:, None]


def synth_embeddings(
    n: int,
    dim: int,
    seed: int,
    topics: int = 1,
    spread: float = 0.5,
    topic_sigma: float = 1.0,
    planted: float = 0.05,
    exact: float = 0.005,
    chunk: int = 65536,
) -> np.ndarray:
    """Seeded unit-norm float32 (n, dim) embeddings that look like a clustered dataset.

    * ``topics`` random unit directions; each row belongs to one topic (topic popularity is
      lognormal with ``topic_sigma``, so cluster sizes are unequal as in real data) and is
      ``sqrt(spread) * topic + sqrt(1 - spread) * noise``: rows of one topic have pairwise
      cosine ~``spread``.
    * ``planted`` share of rows are overwritten with near-copies of another random row, at a
      cosine distance drawn log-uniformly from [1e-4, 0.2] (so every eps in that range removes
      some of them).
    * ``exact`` share of rows are bitwise copies of another row (exercises the kernel's
      first-copy mask).

    Generated in chunks straight into the float32 result: peak memory is the result plus one
    chunk, which keeps the memory benchmark honest.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    centers = rng.standard_normal((topics, dim), dtype=np.float32)
    _unit_rows_inplace(centers)
    if topics > 1:
        weights = rng.lognormal(0.0, topic_sigma, topics)
        weights /= weights.sum()
    a, b = np.float32(np.sqrt(spread)), np.float32(np.sqrt((1.0 - spread) / dim))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        block = out[lo:hi]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= b
        if topics > 1:
            topic = rng.choice(topics, size=hi - lo, p=weights)
            block += a * centers[topic]
        else:
            block += a * centers[0]
        _unit_rows_inplace(block)
    n_planted = int(round(planted * n))
    if n_planted:
        dst = rng.choice(n, size=n_planted, replace=False)
        src = rng.integers(0, n, size=n_planted)
        dist = np.exp(rng.uniform(np.log(1e-4), np.log(0.2), size=n_planted)).astype(np.float32)
        for lo in range(0, n_planted, chunk):
            hi = min(lo + chunk, n_planted)
            noise = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            noise *= np.sqrt(2.0 * dist[lo:hi] / dim).astype(np.float32)[:, None]
            noise += out[src[lo:hi]]
            _unit_rows_inplace(noise)
            out[dst[lo:hi]] = noise
    n_exact = int(round(exact * n))
    if n_exact:
        dst = rng.choice(n, size=n_exact, replace=False)
        src = rng.integers(0, n, size=n_exact)
        for lo in range(0, n_exact, chunk):
            hi = min(lo + chunk, n_exact)
            out[dst[lo:hi]] = out[src[lo:hi]]
    return out


def hard_ordered(y: np.ndarray) -> np.ndarray:
    """Rows of one cluster in the paper's (hard) keep order, centroid = normalised mean."""
    from semdedup_core.dedup.ordering import hard_order

    c = y.mean(axis=0, dtype=np.float64)
    c = (c / np.linalg.norm(c)).astype(np.float32)
    return np.ascontiguousarray(y[hard_order(y @ c)])


# ---------------------------------------------------------------- memory


def proc_status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes, None if unavailable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def maxrss_bytes() -> int:
    """getrusage(RUSAGE_SELF).ru_maxrss in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_pids() -> list[int]:
    """Direct children of this process (e.g. Prefect's ephemeral API server)."""
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return sorted(set(pids))


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / GiB:.3f}"


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MiB:.0f}"


# ---------------------------------------------------------------- noise from other processes


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy (all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()  # this process (all threads) + its waited-for children
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """Average number of cores used by OTHER processes during a ``with`` block.

    The machine is shared: a measurement taken while someone else used a core is not
    comparable. Benchmarks record this next to every timing; > ~0.1 means contention.
    """

    def __enter__(self) -> ForeignLoad:
        self._t, self._busy, self._own = time.monotonic(), _busy_seconds(), _own_seconds()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._t
        busy = _busy_seconds()
        if busy is None or self._busy is None or wall <= 0:
            return
        foreign = (busy - self._busy) - (_own_seconds() - self._own)
        self.cores = round(max(0.0, foreign) / wall, 3)


# ---------------------------------------------------------------- machine / output


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "mem_total_gib": round(mem / GiB, 1) if mem else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable, *sys.argv]),
        "loadavg_start": os.getloadavg(),
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("numpy", "torch", "faiss-cpu", "pyarrow", "prefect"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def emit_result(tag: str, result: dict) -> None:
    """A child process reports its measurements as one tagged JSON line on stdout."""
    print(tag + json.dumps(result), flush=True)


def run_tagged_child(cmd: list[str], role: str, tag: str) -> tuple[dict, float, float | None]:
    """Run a benchmark child; (its tagged result, wall seconds, other processes' cores meanwhile)."""
    print(f"  [{role}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    with ForeignLoad() as load:  # the machine is shared: record others' CPU use meanwhile
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    found = [line for line in proc.stdout.splitlines() if line.startswith(tag)]
    if proc.returncode != 0 or not found:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise SystemExit(f"{role} subprocess failed (exit {proc.returncode})")
    return json.loads(found[-1][len(tag) :]), wall, load.cores


def print_table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
