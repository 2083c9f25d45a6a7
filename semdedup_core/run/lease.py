"""One run at a time per output: a lease object with an expiry, renewed while the run lives.

``{output}/lease.json`` is created exclusively (O_EXCL on local disks, ``If-None-Match: *``
on S3), so of two runs starting together exactly one gets it. The holder renews it in a
background thread; a run that dies stops renewing, and once the lease has expired the
next run takes it over (at once when the holder was a process on this host that no
longer exists). A holder on another host cannot be checked from here: a run waits for its
lease to expire or be released, for a bounded time (``SEMDEDUP_LEASE_WAIT`` seconds, default
twice the TTL; 0: refuse at once). A run whose lease is held by a live process of this host,
or by one that keeps renewing past the wait, is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from semdedup_core.config import ConfigError
from semdedup_core.storage import create_exclusive, read_json, remove, write_json

DEFAULT_TTL_SECONDS = float(os.environ.get("SEMDEDUP_LEASE_TTL", "120"))
# How far past a waited-for lease's expiry to look again (clocks of two hosts differ a little).
_EXPIRY_MARGIN_S = 1.0
_RACES = 3  # leases released or taken over between our create and read, before giving up
log = logging.getLogger(__name__)


class LeaseError(RuntimeError):
    """The output is in use by another live run."""


def describe_holder(record: dict) -> str:
    left = record.get("expires", 0) - time.time()
    return f"run {record.get('owner', '?')} on {record.get('host', '?')} pid {record.get('pid', '?')}, lease valid for {max(0.0, left):.0f} more seconds"


def wait_bound(ttl: float) -> float:
    """Seconds a run waits for a lease held on another host: SEMDEDUP_LEASE_WAIT, else 2 x TTL."""
    value = os.environ.get("SEMDEDUP_LEASE_WAIT", "").strip()
    if not value:
        return 2 * ttl
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"SEMDEDUP_LEASE_WAIT={value!r}: expected a number of seconds >= 0")
    return seconds


def _alive_here(record: dict) -> bool:
    """Held by a process of this host that still exists: it renews, waiting is pointless."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _worth_waiting(record: dict, until: float) -> bool:
    """Whether a live lease may expire before ``until`` (time.time()) and free the output."""
    return not _alive_here(record) and record.get("expires", 0) <= until


def is_live(record: dict) -> bool:
    """Unexpired, and not held by a process of this host that has died (e.g. kill -9)."""
    if record.get("expires", 0) <= time.time():
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return _alive_here(record)
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


def _refusal(url: str, record: dict) -> LeaseError:
    return LeaseError(f"{url} is held by another {describe_holder(record)}; wait for it, or for the lease to expire if that run died")


def check_free(url: str, ttl: float = DEFAULT_TTL_SECONDS) -> None:
    """Raise LeaseError if a live lease is held at ``url`` that a run starting now would not
    wait out (a read-only check)."""
    record = read_lease(url)
    if record is not None and is_live(record) and not _worth_waiting(record, time.time() + wait_bound(ttl)):
        raise _refusal(url, record)


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
        deadline = time.time() + wait_bound(self.ttl)
        announced = False
        races = 0
        while not create_exclusive(self.url, json.dumps(self._record()).encode()):
            current = read_lease(self.url)
            if current is not None and current.get("owner") == self.owner:
                break  # our create went through but its answer was lost, and a retry saw it
            if current is None or not is_live(current):
                races += 1
                if races > _RACES:
                    raise LeaseError(f"{self.url}: could not take the lease (other runs keep taking it)")
                # Stale: its run stopped renewing or its process is gone. Re-check just before deleting, so a lease
                # that another run renewed or took over in the meantime is left alone.
                if current is not None and (read_lease(self.url) or {}).get("owner") == current.get("owner"):
                    self.took_over = current
                    remove(self.url)
                continue
            if not _worth_waiting(current, deadline):
                raise _refusal(self.url, current)
            if not announced:
                log.warning("%s is held by %s on another host; waiting up to %.0f s for it to expire or be released", self.url, describe_holder(current), deadline - time.time())
                announced = True
            poll = max(0.2, min(5.0, self.ttl / 4))
            time.sleep(max(0.0, min(current["expires"] + _EXPIRY_MARGIN_S - time.time(), poll, deadline - time.time())))
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
