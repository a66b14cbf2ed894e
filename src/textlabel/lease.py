"""One run per output prefix: a lease object, ``OUTPUT/_lease.json``.

A run takes the lease with a conditional create (S3 ``If-None-Match: *``; ``O_EXCL`` on a
local disk) before it reads the manifest, renews it every third of its time to live with
a conditional replace (S3 ``If-Match`` on the ETag it holds), and deletes it when it ends
with everything committed, with a conditional delete, so a release never removes another
run's lease. Another run finding the lease refuses to start (exit 2) unless the lease can
be taken over:

- it has expired (the holder stopped renewing; clocks are assumed within a minute);
- its holder is provably dead: its driver's pid is gone (or belongs to a newer process) in
  the same PID namespace of the same boot of the same host, or its Ray job has ended
  according to the cluster that ran it. Anything else is unknown and waits for expiry:
  containers sharing the host's network share its hostname and boot id, not its pids;
- its holder released it after a crash, with records possibly uncommitted.

A takeover is itself a conditional replace of the lease it read, so two runs racing for
an expired lease cannot both win. A run taking over (or finding a crash's release) knows
the last run did not end cleanly and sweeps the output prefix (label.py).

**Fencing.** A run proves it still holds the lease before each write that others rely on
(a commit batch, the sweep's deletes, compaction, the drift history, the summary):
``Lease.fence`` renews it with a conditional write at that moment, or, if that write
cannot finish, accepts a renewal that began less than SAFE of the time to live ago
(monotonic clock). Every store call has a deadline shorter than the time left. A renewal
that finds the lease replaced or gone means the lease is lost: LeaseLost names the new
holder, and the run commits nothing more.

Whether the store honours conditional writes is probed when the lease is taken; a store
that ignores them is refused (``--no-lease`` runs without a lease: then keep runs apart
yourself; it still refuses to start while another run holds a live lease).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from textlabel import conditional, storage

logger = logging.getLogger(__name__)

NAME = "_lease.json"
HELD, DIRTY, RELEASED = "held", "released-dirty", "released"
SAFE = 0.5  # a renewal younger than this share of the time to live still proves the lease (the rest: clock skew)
LOST_AFTER = 0.8  # no renewal for this share of it: another run may soon take it over, so stop


class LeaseHeld(RuntimeError):
    """Another live run holds the output prefix (exit code 2)."""


class LeaseLost(RuntimeError):
    """This run no longer holds its lease (taken over, or not renewable in time): it writes nothing more.
    Transient: the same command, rerun, finishes the night."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``), or "" where /proc cannot tell."""
    try:
        return os.readlink("/proc/self/ns/pid")
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
    pid_ns: str = ""  # the holder's PID namespace: its pid means something only inside it

    @classmethod
    def mine(cls, run: str, now: float, ttl: float) -> "LeaseRecord":
        return cls(run, socket.gethostname(), _boot_id(), os.getpid(), process_started(os.getpid()), _ray_job(),
                   now, now + ttl, pid_ns=pid_namespace())

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord":
        known = {f.name for f in fields(cls)}  # a lease written by an older or newer textlabel
        return cls(**{k: v for k, v in json.loads(data).items() if k in known})

    def describe(self) -> str:
        fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))  # noqa: E731
        job = f", Ray job {self.ray_job}" if self.ray_job else ""
        return f"run {self.run} (host {self.host}, pid {self.pid}{job}, since {fmt(self.since)}, expires {fmt(self.expires_at)})"


@dataclass(frozen=True)
class Here:
    """What this process can see of its host: enough to judge a holder's pid, and no more."""

    host: str
    boot_id: str
    pid_ns: str
    started: Callable[[int], float | None] = process_started  # a pid's start time in this namespace, None if gone

    @classmethod
    def now(cls) -> "Here":
        return cls(socket.gethostname(), _boot_id(), pid_namespace())


def liveness(rec: LeaseRecord, here: Here | None = None,
             ray_status: Callable[[str], str | None] | None = None) -> tuple[bool | None, str]:
    """Whether a lease's holder is alive (True), provably dead (False) or unknown from here (None).

    A pid is evidence only in the PID namespace of the same boot of the same host; a hostname alone is not
    (containers on the host's network share it). Without /proc nothing is provable from the pid.
    """
    here = here or Here.now()
    same_boot = rec.host == here.host and bool(rec.boot_id) and rec.boot_id == here.boot_id
    if same_boot and rec.pid_ns and rec.pid_ns == here.pid_ns:
        started = here.started(rec.pid)
        if started is not None and (rec.pid_started is None or abs(started - rec.pid_started) < 1):
            return True, f"its driver process {rec.pid} is running on this host"
        return False, f"its driver process {rec.pid} on this host is gone"
    if rec.ray_job and _ray_job():
        status = (ray_status or _ray_job_status)(rec.ray_job)
        if status in ("STOPPED", "SUCCEEDED", "FAILED"):
            return False, f"its Ray job {rec.ray_job} has ended ({status})"
        if status:
            return True, f"its Ray job {rec.ray_job} is {status}"
    if rec.host == here.host:
        return None, ("its holder runs on a host of this name, but in another PID namespace or boot (a container on "
                      "the host's network?) or where /proc cannot tell")
    return None, "its holder runs elsewhere"


def _ray_job_status(job: str) -> str | None:
    """A Ray job's status on the cluster this job runs on (None when it cannot be asked in 10 s)."""

    def ask() -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient().get_job_status(job)).rsplit(".", 1)[-1]

    try:
        return within(10, ask)
    except Exception as exc:  # no dashboard, no permission, no answer: unknown, not dead
        logger.debug("could not ask for Ray job %s: %s", job, exc)
        return None


T = TypeVar("T")


def within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``'s result, or TimeoutError after ``seconds``: every wait on a store has a deadline. A call
    still running then goes on in a daemon thread and its late result is dropped."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, name="textlabel-lease-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer from the store in {seconds:.1f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def takeover_reason(current: LeaseRecord, now: float,
                    alive: Callable[[LeaseRecord], tuple[bool | None, str]] = liveness) -> str | None:
    """Why ``current`` may be taken over now, or None when it must be respected."""
    if current.state == RELEASED:
        return f"run {current.run} released it"
    if current.state == DIRTY:
        return f"run {current.run} released it after a crash"
    if now >= current.expires_at:
        return f"it expired {now - current.expires_at:.0f} s ago (run {current.run} stopped renewing it)"
    verdict, why = alive(current)
    return f"{why} (run {current.run})" if verdict is False else None


class Lease:
    """A held lease, renewed by a thread until ``release``; ``fence`` before each write others rely on."""

    def __init__(self, store: Any, record: LeaseRecord, token: str, ttl: float, url: str,
                 deletes: bool = True, clock: Callable[[], float] = time.monotonic):
        self.store, self.record, self.token, self.ttl, self.url = store, record, token, ttl, url
        self.deletes = deletes  # the store honours conditional deletes (else release leaves a RELEASED record)
        self.lost: str | None = None
        self._clock = clock
        self._proven = clock()  # when the last write that proved the lease began (monotonic)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_forever, name="textlabel-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost when this run no longer holds the lease."""
        if self.lost:
            raise LeaseLost(f"{self.url}: this run no longer holds the lease: {self.lost}. It stopped without "
                            "committing more; rerun the same command once that run has finished")

    def fence(self, what: str = "a write") -> None:
        """Prove the lease is still this run's before ``what``: renew it now, or accept a renewal that began
        less than SAFE of its time to live ago when the store cannot answer in time. Raises LeaseLost."""
        self.check()
        try:
            self._renew()
        except Exception as exc:
            age = self._clock() - self._proven
            if age >= self.ttl * SAFE:
                self._lose(f"it could not be renewed for {age:.0f} s before {what} ({exc})")
            else:
                logger.warning("could not renew the lease on %s before %s (%s); its last renewal, %.0f s ago, "
                               "still proves it", self.url, what, exc, age)
        self.check()

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost = why
            logger.error("lost the lease on %s: %s", self.url, why)

    def _renew(self, **changes: Any) -> None:
        """One conditional write of the lease, with a deadline; a conflict marks it lost (other errors raise)."""
        with self._lock:
            if self.lost:
                return
            began = self._clock()
            record = LeaseRecord(**{**asdict(self.record), "expires_at": time.time() + self.ttl, **changes,
                                    "renewals": self.record.renewals + 1})
            deadline = max(0.5, min(self.ttl / 3, self._proven + self.ttl * LOST_AFTER - began))
            try:
                self.token = within(deadline, lambda: _replace(self.store, record, self.token))
            except conditional.Conflict as exc:
                self._lose(f"it is now held by {exc}")
                return
            self.record, self._proven = record, began

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except Exception as exc:  # a store hiccup: the next renewal tries again, unless expiry is near
                age = self._clock() - self._proven
                if age >= self.ttl * LOST_AFTER:
                    self._lose(f"it could not be renewed for {age:.0f} s ({exc}); another run may take it over")
                else:
                    logger.warning("could not renew the lease on %s: %s", self.url, exc)

    def release(self, clean: bool) -> None:
        """Stop renewing; delete the lease (clean: every record committed) or mark it released after a crash.
        Only this run's lease is touched: a lease another run took is left as it is."""
        self._stop.set()
        self._thread.join()
        if self.lost:
            logger.error("did not release the lease on %s: %s", self.url, self.lost)
            return
        try:
            if clean and self.deletes:
                within(max(1.0, self.ttl / 3), lambda: _delete(self.store, self.record.run, self.token))
            else:
                self._renew(state=RELEASED if clean else DIRTY, expires_at=time.time())
        except conditional.Conflict as exc:
            logger.warning("left the lease on %s as it is: %s holds it now", self.url, exc)
        except Exception as exc:
            logger.warning("could not release the lease on %s (%s); the next run takes it over once it expires", self.url, exc)


def _replace(store: Any, record: LeaseRecord, token: str) -> str:
    """A conditional replace of ``record.run``'s lease. A write of ours that took effect unseen (a retried
    request, a renewal past its deadline) left a token we do not know: what holds our run id is still ours.
    Raises Conflict, describing the holder found, when another run holds it or it is gone."""
    try:
        return store.replace(record.to_bytes(), token)
    except (conditional.Conflict, FileNotFoundError):
        held = store.read()
        found = LeaseRecord.from_bytes(held[0]) if held else None
        if found is None or found.run != record.run:
            raise conditional.Conflict(found.describe() if found else "nobody: the lease object was deleted") from None
        if found == record:
            return held[1]
    try:
        return store.replace(record.to_bytes(), held[1])
    except (conditional.Conflict, FileNotFoundError):
        raise conditional.Conflict("another run: the lease changed while it was renewed") from None


def _delete(store: Any, run: str, token: str) -> None:
    """Delete ``run``'s lease only if it is still that run's."""
    try:
        store.delete(token)
    except conditional.Conflict:
        held = store.read()
        found = LeaseRecord.from_bytes(held[0]) if held else None
        if found is None:
            return
        if found.run != run:
            raise conditional.Conflict(found.describe()) from None
        store.delete(held[1])


def _probe(store: Any, record: LeaseRecord, token: str, url: str) -> tuple[str, bool]:
    """Refuse a store that ignores conditional writes (they would let two runs hold one prefix); returns the
    lease's token and whether conditional deletes are honoured (without them, release leaves a RELEASED record)."""
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
    try:
        store.delete('"textlabel-probe"')
    except conditional.Conflict:
        return token, True
    logger.warning("%s: this object store ignores conditional deletes; a finished run leaves a released lease there", url)
    try:
        return store.create(record.to_bytes()), False
    except FileExistsError:  # the probe's delete let another run in
        raise LeaseHeld(f"{url}: another run took the lease while this one probed the store; rerun later") from None


def refuse_if_held(out: storage.Location, now: Callable[[], float] = time.time) -> None:
    """``--no-lease``: still refuse to start beside a run that holds a live lease on ``out``."""
    held = conditional.store_for(out.join(NAME)).read()
    current = LeaseRecord.from_bytes(held[0]) if held else None
    if current is not None and takeover_reason(current, now()) is None:
        raise LeaseHeld(f"--no-lease, but --output {out.url} is held by {current.describe()}: a run without a lease "
                        "would sweep its outputs while it writes them. Wait for it to finish (or its lease to expire)")


def acquire(out: storage.Location, run: str, ttl: float, now: Callable[[], float] = time.time) -> tuple[Lease, str | None]:
    """Take the lease on ``out`` for ``run``; returns it and, when it was taken over from an unclean end, why.

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
        reason = takeover_reason(current, now())
        if reason is None:
            raise LeaseHeld(f"--output {out.url} is held by {current.describe()}. Wait for it to finish, or if it is "
                            f"dead, for the lease to expire; a lease in {url} with a past expiry is taken over")
        try:
            token = _replace(store, mine, held[1])
        except conditional.Conflict:
            continue  # another run took it first: look again
        taken_over = None if current.state == RELEASED else reason
        break
    else:
        raise LeaseHeld(f"--output {out.url}: could not take the lease {url} after several tries; another run is starting")
    deletes = True
    if isinstance(store, conditional.S3Store):  # O_EXCL and flock are honoured by every local disk
        token, deletes = _probe(store, mine, token, url)
    if taken_over:
        logger.warning("took over the lease on %s: %s", out.url, taken_over)
    return Lease(store, mine, token, ttl, url, deletes), taken_over
