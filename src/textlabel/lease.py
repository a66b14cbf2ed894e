"""One run per output prefix: a lease object, ``OUTPUT/_lease.json``.

A run takes the lease with a conditional create (S3 ``If-None-Match: *``; ``O_EXCL`` on a
local disk) before it reads the manifest, renews it every third of its time to live with
a conditional replace (S3 ``If-Match`` on the ETag it holds), and deletes it when it ends
with everything committed. Another run finding the lease refuses to start (exit 2) unless
the lease can be taken over:

- it has expired (the holder stopped renewing; clocks are assumed within a minute);
- its holder is provably dead: its driver process on this host is gone, or its Ray job has
  ended (so "submit the same command again" after a killed night works at once);
- its holder released it after a crash, with records possibly uncommitted.

A takeover is itself a conditional replace of the lease it read, so two runs racing for
an expired lease cannot both win. A run taking over (or finding a crash's release) knows
the last run did not end cleanly and sweeps the output prefix (label.py). Whether the
store honours conditional writes is probed when the lease is taken; a store that ignores
them is refused (``--no-lease`` runs without a lease: then keep runs apart yourself).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from textlabel import conditional, storage

logger = logging.getLogger(__name__)

NAME = "_lease.json"
HELD, DIRTY = "held", "released-dirty"


class LeaseHeld(RuntimeError):
    """Another live run holds the output prefix (exit code 2)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over: it must not commit anything more."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_started(pid: int) -> float | None:
    """When a process started (seconds since boot, from /proc), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _ray_job() -> str | None:
    """The submission id of the Ray job this driver runs in, if any."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return json.loads(config)["metadata"]["job_submission_id"] if config else None
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class LeaseRecord:
    """Who holds an output prefix, since when, until when."""

    run: str
    host: str
    boot_id: str
    pid: int
    pid_started: float | None
    ray_job: str | None
    since: float
    expires_at: float
    state: str = HELD
    renewals: int = 0

    @classmethod
    def mine(cls, run: str, now: float, ttl: float) -> "LeaseRecord":
        return cls(run, socket.gethostname(), _boot_id(), os.getpid(), process_started(os.getpid()), _ray_job(),
                   now, now + ttl)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord":
        return cls(**json.loads(data))

    def describe(self) -> str:
        fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))  # noqa: E731
        job = f", Ray job {self.ray_job}" if self.ray_job else ""
        return f"run {self.run} (host {self.host}, pid {self.pid}{job}, since {fmt(self.since)}, expires {fmt(self.expires_at)})"


def liveness(rec: LeaseRecord) -> tuple[bool | None, str]:
    """Whether a lease's holder is alive (True), provably dead (False) or unknown from here (None)."""
    if rec.host == socket.gethostname() and rec.boot_id == _boot_id():
        started = process_started(rec.pid)
        if started is not None and (rec.pid_started is None or abs(started - rec.pid_started) < 1):
            return True, f"its driver process {rec.pid} is running on this host"
        return False, f"its driver process {rec.pid} on this host is gone"
    if rec.ray_job and _ray_job():
        status = _ray_job_status(rec.ray_job)
        if status in ("STOPPED", "SUCCEEDED", "FAILED"):
            return False, f"its Ray job {rec.ray_job} has ended ({status})"
        if status:
            return True, f"its Ray job {rec.ray_job} is {status}"
    return None, "its holder runs elsewhere"


def _ray_job_status(job: str) -> str | None:
    """A Ray job's status on the cluster this job runs on (None when it cannot be asked in 10 s)."""
    found: list[str] = []

    def ask() -> None:
        try:
            from ray.job_submission import JobSubmissionClient

            found.append(str(JobSubmissionClient().get_job_status(job)).rsplit(".", 1)[-1])
        except Exception as exc:  # no dashboard, no permission, ...: unknown, not dead
            logger.debug("could not ask for Ray job %s: %s", job, exc)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(10)
    return found[0] if found else None


def takeover_reason(current: LeaseRecord, now: float,
                    alive: Callable[[LeaseRecord], tuple[bool | None, str]] = liveness) -> str | None:
    """Why ``current`` may be taken over now, or None when it must be respected."""
    if current.state == DIRTY:
        return f"run {current.run} released it after a crash"
    if now >= current.expires_at:
        return f"it expired {now - current.expires_at:.0f} s ago (run {current.run} stopped renewing it)"
    verdict, why = alive(current)
    return f"{why} (run {current.run})" if verdict is False else None


class Lease:
    """A held lease, renewed by a thread until ``release``."""

    def __init__(self, store: Any, record: LeaseRecord, token: str, ttl: float, url: str):
        self.store, self.record, self.token, self.ttl, self.url = store, record, token, ttl, url
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_forever, name="textlabel-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost when another run has taken the prefix over."""
        if self.lost:
            raise LeaseLost(f"{self.url}: this run's lease was taken over ({self.lost}); it stops without committing more")

    def _write(self, **changes: Any) -> None:
        with self._lock:
            if self.lost:
                return
            record = LeaseRecord(**{**asdict(self.record), **changes, "renewals": self.record.renewals + 1})
            try:
                self.token = _replace(self.store, record, self.token)
                self.record = record
            except conditional.Conflict:
                held = self.store.read()
                self.lost = LeaseRecord.from_bytes(held[0]).describe() if held else "it was deleted"

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._write(expires_at=time.time() + self.ttl)
            except Exception as exc:  # a store hiccup: the next renewal tries again, well before expiry
                logger.warning("could not renew the lease on %s: %s", self.url, exc)

    def release(self, clean: bool) -> None:
        """Stop renewing; delete the lease (clean: every record committed) or mark it released after a crash."""
        self._stop.set()
        self._thread.join()
        if self.lost:
            return
        try:
            if clean:
                self.store.delete()
            else:
                self._write(state=DIRTY, expires_at=time.time())
        except Exception as exc:
            logger.warning("could not release the lease on %s (%s); the next run takes it over once it expires", self.url, exc)


def _replace(store: Any, record: LeaseRecord, token: str) -> str:
    """A conditional replace; a retried write that had already taken effect counts as done."""
    try:
        return store.replace(record.to_bytes(), token)
    except conditional.Conflict:
        held = store.read()
        if held and LeaseRecord.from_bytes(held[0]) == record:
            return held[1]
        raise


def _probe(store: Any, record: LeaseRecord, token: str, url: str) -> None:
    """Refuse a store that ignores conditional writes (they would let two runs hold one prefix)."""
    problems = []
    try:
        store.create(record.to_bytes())
        problems.append("If-None-Match")
    except FileExistsError:
        pass
    try:
        store.replace(record.to_bytes(), '"textlabel-probe"')
        problems.append("If-Match")
    except conditional.Conflict:
        pass
    if problems:
        store.delete()
        raise storage.StorageError(
            f"{url}: this object store ignores conditional writes ({' and '.join(problems)}), so it cannot keep two "
            "runs off one --output; pass --no-lease and make sure only one run writes to it at a time")


def acquire(out: storage.Location, run: str, ttl: float, now: Callable[[], float] = time.time) -> tuple[Lease, str | None]:
    """Take the lease on ``out`` for ``run``; returns it and, when it was taken over, why.

    Raises LeaseHeld, naming the holder, when a live run holds it.
    """
    store, url = conditional.store_for(out.join(NAME)), out.join(NAME).url
    mine = LeaseRecord.mine(run, now(), ttl)
    taken_over = None
    for _ in range(5):  # a lease deleted between our create and our read: try again
        try:
            token = store.create(mine.to_bytes())
            break
        except FileExistsError:
            held = store.read()
        if held is None:
            continue
        current = LeaseRecord.from_bytes(held[0])
        if current.run == run:  # our own create, retried after it took effect
            token = held[1]
            break
        taken_over = takeover_reason(current, now())
        if taken_over is None:
            raise LeaseHeld(f"--output {out.url} is held by {current.describe()}. Wait for it to finish, or if it is "
                            f"dead, for the lease to expire; a lease in {url} with a past expiry is taken over")
        try:
            token = _replace(store, mine, held[1])
            break
        except conditional.Conflict:
            continue  # another run took it first: look again
    else:
        raise LeaseHeld(f"--output {out.url}: could not take the lease {url} after several tries; another run is starting")
    if isinstance(store, conditional.S3Store):  # O_EXCL and flock are honoured by every local disk
        _probe(store, mine, token, url)
    if taken_over:
        logger.warning("took over the lease on %s: %s", out.url, taken_over)
    return Lease(store, mine, token, ttl, url), taken_over
