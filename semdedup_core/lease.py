"""One run at a time per output: a lease object with an expiry, renewed while the run lives.

``{output}/lease.json`` is created exclusively (O_EXCL on local disks, ``If-None-Match: *``
on S3), so of two runs starting together exactly one gets it. The holder renews it in a
background thread; a run that dies stops renewing, and once the lease has expired the
next run takes it over (at once when the holder was a process on this host that no
longer exists). A run that finds a live lease held by another is refused.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from .storage import create_exclusive, read_json, remove, write_json

DEFAULT_TTL_SECONDS = float(os.environ.get("SEMDEDUP_LEASE_TTL", "120"))


class LeaseError(RuntimeError):
    """The output is in use by another live run."""


def describe_holder(record: dict) -> str:
    left = record.get("expires", 0) - time.time()
    return f"run {record.get('owner', '?')} on {record.get('host', '?')} pid {record.get('pid', '?')}, lease valid for {max(0.0, left):.0f} more seconds"


def is_live(record: dict) -> bool:
    """Unexpired, and not held by a process of this host that has died (e.g. kill -9)."""
    if record.get("expires", 0) <= time.time():
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
    return True


def read_lease(url: str) -> dict | None:
    """The lease record, None if there is none; an unreadable record counts as expired
    (leases are created whole, so it can only be corrupt, never half written)."""
    try:
        record = read_json(url)
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def check_free(url: str) -> None:
    """Raise LeaseError if a live lease is held at ``url`` (a read-only check)."""
    record = read_lease(url)
    if record is not None and is_live(record):
        raise LeaseError(f"{url} is held by another {describe_holder(record)}; wait for it, or for the lease to expire if that run died")


class Lease:
    """Context manager holding the lease at ``url`` for the duration of a run."""

    def __init__(self, url: str, ttl: float = DEFAULT_TTL_SECONDS):
        self.url = url
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None  # the stale lease replaced, if any

    def _record(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + self.ttl}

    def acquire(self) -> Lease:
        for _ in range(3):
            if create_exclusive(self.url, json.dumps(self._record()).encode()):
                break
            current = read_lease(self.url)
            if current is None:
                continue  # released between our create and read: try again
            if current.get("owner") == self.owner:
                break  # our create went through but its answer was lost, and a retry saw it
            if is_live(current):
                raise LeaseError(f"{self.url} is held by another {describe_holder(current)}; wait for it, or for the lease to expire if that run died")
            # Stale: its run stopped renewing or its process is gone. Re-check just before deleting, so a lease that
            # another run renewed or took over in the meantime is left alone.
            if (read_lease(self.url) or {}).get("owner") == current.get("owner"):
                self.took_over = current
                remove(self.url)
        else:
            raise LeaseError(f"{self.url}: could not take the lease (other runs keep taking it)")
        self._thread = threading.Thread(target=self._renew, name="semdedup-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if (read_lease(self.url) or {}).get("owner") != self.owner:
                    return  # lost it (we were stalled past the expiry); never overwrite another run's lease
                write_json(self.url, self._record())
            except Exception:  # noqa: BLE001 - a missed renewal is retried at the next tick
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (read_lease(self.url) or {}).get("owner") == self.owner:
            remove(self.url)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
