"""Chaos nights: a growing corpus labelled night after night under a seeded, randomized fault schedule.

    .venv/bin/python benchmarks/chaos_nights.py --nights 20 --seed 7
    .venv/bin/python benchmarks/chaos_nights.py --nights 3 --seed 7 --json-out chaos.json

In the style of Jepsen and FoundationDB's simulation: everything random comes from --seed (the corpus and
the faults; the same seed draws the same schedule), every fault is injected at an event (an S3 request the
server sees), never after a guessed sleep, and after every night the invariants a reader of the output
relies on are checked from the store itself, counted, not assumed.

One S3 server (moto, textlabel.demo.local_s3, whose request hook injects the faults), one local Ray for the
whole benchmark (its workers inherit the server's address) and a tiny random BERT. Each night:

1. the corpus grows (s3://chaos/in/): 1-3 new files of 10-80 rows (ids unique over the whole run), now and
   then a file with a cell that is not UTF-8, one with a zero-row row group, an input named like a part
   beside the file whose parts it mimics (cut by --rows-per-file), an empty file; sometimes an existing input
   is replaced by a new version (new ids). Files over --part-bytes are split on the driver and read in pinned
   ranged reads; the others are packed and read whole;
2. the night's faults are drawn, each armed until it fires once (in any run of the night): the driver
   SIGKILLed at its Nth request; the predictor actor SIGKILLed at the first output PUT; K consecutive requests
   answered 503 SlowDown; an actor's whole-file GET held past --part-timeout; the lease overwritten by a run
   on node-b at the first output PUT (expired before the rerun, as if node-b died); an input rewritten at an
   actor's whole-file GET, or at the input's first GET (the driver's footer read, when it reads one);
3. `python jobs/label.py` runs as a nightly scheduler runs it: again while it exits 75 or was killed (a
   killed driver's actors are waited out first), at most MAX_RUNS times; a run that exits 0 or 3 ends the night;
4. the invariants are checked (``check``, ``_after_run``); the first broken one stops the benchmark with its
   seed, night and run, and what broke.

The invariants, after every night: every row of every present input is in the output exactly once, at its
input's current version; or its file is recorded failed, stale or quarantined with a reason, or was replaced
during the last run (which counted it as changed: the next run labels it). Every record that vouches for
outputs has them, and no visible output lacks a record (a reader would see its rows). The rows that are not
UTF-8, and only they, are skipped as invalid_utf8, without a label. After each run: one whose lease was taken
exits 75; one that exits 0 or 3 leaves no _lease.json, had its held read trip --part-timeout, and counts a file
replaced during it as changed.

Exit status: 0 when every invariant held, 1 (and the JSON's "broken") when one did not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from textlabel import storage
from textlabel.lease import NAME as LEASE, LeaseRecord
from textlabel.manifest import Manifest
from textlabel.scratch import easy_rows

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "chaos"
INPUT, OUTPUT = f"s3://{BUCKET}/in", f"s3://{BUCKET}/out"
MAX_RUNS = 5  # runs a night before the scheduler gives up (each fault ends at most one run)
KINDS = ("driver_kill", "actor_kill", "slowdown", "held_read", "lease_stolen", "file_replaced")
CHANCE = {"driver_kill": 0.4, "actor_kill": 0.3, "slowdown": 0.4, "held_read": 0.25, "lease_stolen": 0.3,
          "file_replaced": 0.3}
SPECIALS = {"bad_utf8": 0.3, "zero_group": 0.25, "partlike": 0.2, "empty": 0.15}
KEPT = ("failed", "stale", "quarantined")  # a file recorded so, with its reason, is accounted for unlabelled


class Broken(AssertionError):
    """An invariant does not hold."""


@dataclass(frozen=True)
class Settings:
    """The job's options that the faults play against."""

    rows_per_file: int = 40  # files over this are cut into parts: most nights have some
    part_bytes: int = 2400  # files over this many bytes are split on the driver and read in parts (pinned), not whole
    part_timeout: float = 3.0  # a held read trips it
    max_attempts: int = 4  # a deliberately killed actor is not what quarantines a file
    hold_seconds: float = 6.0  # how long a held read is held: past --part-timeout
    run_timeout: float = 300.0  # a run taking longer is killed and counts as broken (a hang)


# The corpus: what each input holds, as this benchmark wrote it (the truth the invariants are checked against).

@dataclass
class Version:
    """One version of an input: its ids in order, the ids whose text is not UTF-8, what kind of file it is."""

    ids: list[int]
    bad: set[int] = field(default_factory=set)
    kind: str = "plain"


def _texts(n: int, seed: int) -> list[str]:
    return easy_rows(n, seed=seed)["text"].to_pylist() if n else []


def _encode(ids: list[int], texts: list[bytes], groups: list[int]) -> bytes:
    """A Parquet file of (id, text) with row groups of the sizes given (a 0: a row group of zero rows)."""
    table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.binary()).view(pa.string())})
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema) as writer:
        start = 0
        for n in groups or [0]:
            writer.write_table(table.slice(start, n))
            start += n
    return sink.getvalue().to_pybytes()


class Corpus:
    """The inputs on S3 and their truth; ``grow`` adds a night's files."""

    def __init__(self, seed: int, settings: Settings):
        self.rng = random.Random(f"{seed}-corpus")
        self.settings = settings
        self.files: dict[str, Version] = {}
        self.next_id = 0

    def put(self, name: str, rows: int, kind: str = "plain") -> str:
        """Write a new version of input ``name`` (fresh ids); returns what was written, in words."""
        ids = list(range(self.next_id, self.next_id + rows))
        self.next_id += rows
        texts = [t.encode() for t in _texts(rows, self.rng.randrange(1 << 30))]
        version, groups = Version(ids, kind=kind), [rows]
        if kind == "bad_utf8":
            k = self.rng.randrange(rows)
            texts[k] = b"a great \xff\xfe film"
            version.bad = {ids[k]}
        elif kind == "zero_group":  # rows, a row group of none, more rows
            k = self.rng.randint(1, rows - 1)
            groups = [k, 0, rows - k]
        elif kind == "cut":  # row groups of half --rows-per-file: cut into parts at their boundaries
            half = self.settings.rows_per_file // 2
            groups = [min(half, rows - s) for s in range(0, rows, half)]
        storage.write_bytes(storage.resolve(f"{INPUT}/{name}"), _encode(ids, texts, groups))
        self.files[name] = version
        return f"{name}({kind},{rows})" if kind != "plain" else f"{name}({rows})"

    def grow(self, night: int) -> list[str]:
        """Tonight's new files, maybe a special one of each kind, maybe one input replaced."""
        rng, day = self.rng, f"day-{night:03d}"
        done = [self.put(f"{day}/part-{j}.parquet", rng.randint(10, 80)) for j in range(rng.randint(1, 3))]
        for kind, chance in SPECIALS.items():
            if rng.random() >= chance:
                continue
            if kind == "partlike":  # x.parquet cut into x.part-00000.parquet, ..., beside an input of that name
                done.append(self.put(f"{day}/x.parquet", 2 * self.settings.rows_per_file + rng.randint(1, 20), "cut"))
                done.append(self.put(f"{day}/x.part-00000.parquet", rng.randint(10, 30), "partlike"))
            else:
                done.append(self.put(f"{day}/{kind}.parquet", {"empty": 0}.get(kind, rng.randint(10, 40)), kind))
        old = sorted(n for n in self.files if not n.startswith(day))
        if old and rng.random() < 0.3:
            done.append("replaced " + self.put(rng.choice(old), rng.randint(10, 100)))
        return done


# The faults: the S3 server's request hook fires them, each once, at its event.

@dataclass
class Fault:
    """A fault armed for tonight; ``at`` is the request of a run it fires at (driver_kill, slowdown)."""

    kind: str
    at: int = 0
    count: int = 0  # slowdown: consecutive 503 answers
    phase: str = "read"  # file_replaced: at an actor's whole read ("read"), or at the input's first GET ("listed":
    # the driver's footer read when it reads one, between the listing and the labelling)
    fired_in: int = 0  # the run it fired in (1-based), 0 while armed
    detail: str = ""
    target: str = ""  # the input a held read or a replacement hit


def draw(rng: random.Random, expected_requests: int) -> list[Fault]:
    """Tonight's faults: each kind by its chance, at least one. Request numbers are drawn as a share of the
    requests a run made lately, so the random stream (the schedule) does not depend on timing."""
    faults = [Fault(k) for k in KINDS if rng.random() < CHANCE[k]] or [Fault(rng.choice(KINDS))]
    for f in faults:
        f.at = 1 + int(rng.random() * expected_requests)
        f.count = rng.randint(2, 4)
        f.phase = rng.choice(("listed", "read"))
    return faults


def predictor_actors() -> list[psutil.Process]:
    """The predictor actors of this process's own Ray (its processes descend from this one)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "PartLabeller" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def lease_of_node_b(night: int, expires_in: float) -> bytes:
    """A lease record of another run, on another host (it cannot be proven dead from here)."""
    now = time.time()
    return LeaseRecord(f"node-b-night-{night}", "node-b", "boot-of-node-b", 4242, None, None, now,
                       now + expires_in).to_bytes()


class Injector:
    """``demo.local_s3``'s on_request: counts a run's requests and fires the armed faults at their events."""

    def __init__(self, corpus: Corpus, settings: Settings):
        self.corpus, self.settings = corpus, settings
        self.faults: list[Fault] = []
        self.night = self.run = self.requests = 0
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # the server answers each request on its own thread

    def arm(self, night: int, faults: list[Fault]) -> None:
        self.night, self.faults, self.run = night, faults, 0

    def started(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self.proc, self.run, self.requests = proc, self.run + 1, 0

    def ended(self) -> None:
        with self._lock:
            self.proc = None

    def __call__(self, method: str, path: str, headers: Mapping[str, str]) -> int | None:
        with self._lock:
            if self.proc is None:  # between runs: the benchmark's own requests
                return None
            self.requests += 1
            fault = self._due(method, path, headers)
            if fault is None:
                return None
            fault.fired_in = fault.fired_in or self.run
            if path.startswith(f"/{BUCKET}/in/"):
                fault.target = fault.target or path[len(f"/{BUCKET}/in/"):]
            proc, n = self.proc, self.requests
        if fault.kind == "slowdown":
            fault.detail = f"{fault.count} x 503 SlowDown from request {fault.at}"
            return 503
        fault.detail = self._fire(fault.kind, proc, path, n, headers)
        return None

    def _due(self, method: str, path: str, headers: Mapping[str, str]) -> Fault | None:
        """The fault this request fires, if any (one a request); a slowdown goes on for its count of requests."""
        read = method == "GET" and path.startswith(f"/{BUCKET}/in/")
        whole_read = read and "Range" not in headers  # an actor reading a small file (the driver reads footers)
        name = path[len(f"/{BUCKET}/out/"):]
        output_put = method == "PUT" and path.startswith(f"/{BUCKET}/out/") and not name.startswith("_")
        for f in self.faults:
            if f.kind == "slowdown" and f.fired_in == self.run and self.requests < f.at + f.count:
                return f
            if f.fired_in:
                continue
            if (f.kind in ("driver_kill", "slowdown") and self.requests == f.at
                    or f.kind == "held_read" and whole_read
                    or f.kind == "file_replaced" and (whole_read if f.phase == "read" else read)
                    or f.kind in ("actor_kill", "lease_stolen") and output_put):
                return f
        return None

    def _fire(self, kind: str, proc: subprocess.Popen, path: str, n: int, headers: Mapping[str, str]) -> str:
        """Do it; returns what was done, in words (off the lock: a rewrite is a request to this server)."""
        if kind == "driver_kill":
            proc.kill()  # SIGKILL: no cleanup runs; the request it was making goes on, as one on the wire does
            return f"at request {n} ({path})"
        if kind == "actor_kill":
            victims = predictor_actors()
            for p in victims:
                p.kill()
            return f"{len(victims)} actor(s) at PUT {path}"
        if kind == "held_read":
            time.sleep(self.settings.hold_seconds)
            return f"GET {path} held {self.settings.hold_seconds:g} s"
        if kind == "lease_stolen":
            storage.write_bytes(storage.resolve(f"{OUTPUT}/{LEASE}"), lease_of_node_b(self.night, 300))
            return f"at PUT {path}"
        name = path[len(f"/{BUCKET}/in/"):]
        how = "whole" if "Range" not in headers else "ranged"
        return f"rewritten at a {how} GET (now {self.corpus.put(name, self.corpus.rng.randint(10, 60))})"


# The invariants.

@dataclass
class Figures:
    """What the output held after a night, against the corpus."""

    files: int = 0
    rows: int = 0  # rows of the present inputs
    labelled: int = 0  # of them, in the output at their input's current version
    lost: int = 0  # of them, neither in the output nor accounted for by a record with a reason
    duplicated: int = 0  # extra copies of an id among the visible output rows
    unlabelled_recorded: int = 0  # rows of inputs recorded failed/stale/quarantined, with the reason
    waiting: int = 0  # rows of inputs replaced during the last run: labelled by the next


_READ: dict[str, tuple[str, pa.Table]] = {}  # output path -> (ETag, its columns): read again only once it changes


def _outputs() -> dict[str, pa.Table]:
    """Every visible output file (names starting with _ are not data) and its id and label columns. An output
    whose ETag is the one read on an earlier night is not read again: the check costs the night's new outputs,
    not the whole history again every night."""
    out = storage.resolve(OUTPUT)
    if not storage.exists(out):
        return {}
    found = {}
    listing = storage.list_table(out, ".parquet")
    for path, etag in zip(listing["path"].to_pylist(), listing["fingerprint"].to_pylist()):
        if _READ.get(path, ("",))[0] != etag:
            _READ[path] = (etag, pq.read_table(path, filesystem=out.fs, columns=["id", "pred_label", "pred_skip_reason"]))
        found[path[len(out.path) + 1:]] = _READ[path][1]
    return found


def _records() -> dict[str, dict]:
    state = Manifest.load(storage.resolve(OUTPUT)).state
    return {r["input"]: r for r in state.select(["input", "fingerprint", "status", "outputs", "error"]).to_pylist()}


def _listing() -> dict[str, str]:
    src = storage.resolve(INPUT)
    table = storage.list_table(src, ".parquet")
    return {p[len(src.path) + 1:]: f for p, f in zip(table["path"].to_pylist(), table["fingerprint"].to_pylist())}


def check(corpus: Corpus, changed_last_run: set[str]) -> tuple[Figures, list[str]]:
    """The invariants after a night; returns the figures and every broken one, in words."""
    listed, records, outputs = _listing(), _records(), _outputs()
    fig, problems = Figures(files=len(corpus.files)), []
    if set(listed) != set(corpus.files):
        problems.append(f"the input listing {sorted(listed)} is not the corpus written {sorted(corpus.files)}")
    seen = Counter(i for t in outputs.values() for i in t["id"].to_pylist())
    fig.duplicated = sum(n - 1 for n in seen.values() if n > 1)
    if fig.duplicated:
        problems.append(f"{fig.duplicated} duplicated row(s), e.g. ids {sorted(i for i, n in seen.items() if n > 1)[:10]}")
    vouched = set()
    for name, rec in records.items():
        status = str(rec["status"])
        if status in ("done", *KEPT):
            vouched.update(rec["outputs"] or [])
            missing = [o for o in rec["outputs"] or [] if o not in outputs]
            if missing:
                problems.append(f"{name}: recorded {status}, but its output(s) {missing} do not exist")
    unvouched = sorted(set(outputs) - vouched)
    if unvouched:
        problems.append(f"output file(s) no record vouches for (a reader sees their rows): {unvouched[:10]}")
    for name, version in sorted(corpus.files.items()):
        fig.rows += len(version.ids)
        _check_input(name, version, records.get(name), listed.get(name), outputs, changed_last_run, fig, problems)
    return fig, problems


def _check_input(name: str, version: Version, rec: dict | None, fingerprint: str | None, outputs: dict[str, pa.Table],
                 changed_last_run: set[str], fig: Figures, problems: list[str]) -> None:
    """One present input: labelled at its current version, exactly its rows; or accounted for by its record."""
    status = str(rec["status"]) if rec else None
    if rec and status == "done" and rec["fingerprint"] == fingerprint:
        got = [t for o in rec["outputs"] or [] if o in outputs for t in [outputs[o]]]
        table = pa.concat_tables(got) if got else pa.table({"id": pa.array([], pa.int64())})
        ids = table["id"].to_pylist()
        lost, foreign = set(version.ids) - set(ids), set(ids) - set(version.ids)
        fig.labelled += len(version.ids) - len(lost)
        fig.lost += len(lost)
        if not rec["outputs"]:  # an empty file too: an output of its columns, without rows
            problems.append(f"{name}: done at its current version, with no output file")
        if lost or foreign:
            problems.append(f"{name}: done at its current version, but its outputs {rec['outputs']} lack {len(lost)} of its "
                            f"{len(version.ids)} rows and hold {len(foreign)} rows of no current version of it")
        if got:
            _check_skips(name, version, table, problems)
    elif rec and status in KEPT and rec["error"]:
        fig.unlabelled_recorded += len(version.ids)
    elif name in changed_last_run:
        fig.waiting += len(version.ids)
    else:
        fig.lost += len(version.ids)
        problems.append(f"{name}: not labelled at its current version {fingerprint} (record: "
                        f"{status} at {rec['fingerprint'] if rec else None}) and no reason recorded: {len(version.ids)} rows lost")


def _check_skips(name: str, version: Version, table: pa.Table, problems: list[str]) -> None:
    """Exactly the rows that are not UTF-8 are skipped, as invalid_utf8, with no label."""
    rows = table.to_pylist()
    skipped = {r["id"] for r in rows if r["pred_skip_reason"] == "invalid_utf8"}
    unlabelled_bad = all(r["pred_label"] is None for r in rows if r["id"] in version.bad)
    if skipped != version.bad or not unlabelled_bad:
        problems.append(f"{name}: rows skipped as invalid_utf8 {sorted(skipped)}, expected {sorted(version.bad)} with no label")


# The nightly scheduler.

class Scheduler:
    """Runs `python jobs/label.py` on the benchmark's Ray, each run's log in a file (as under cron)."""

    def __init__(self, model: str, ray_address: str, settings: Settings, logs: Path, injector: Injector):
        self.settings, self.logs, self.injector = settings, logs, injector
        self.env = {**os.environ, "RAY_ADDRESS": ray_address}
        # --runtime torch: an actor starts about 2 s sooner than with ONNX (the faults are in the control plane);
        # --max-drift 1e9: a random model's label shares mean nothing night to night.
        self.args = [sys.executable, "jobs/label.py", "--model", model, "--input", f"{INPUT}/", "--output", OUTPUT,
                     "--label-prefix", "pred_", "--max-length", "64", "--batch-size", "32", "--num-actors", "1",
                     "--runtime", "torch", "--max-drift", "1e9", "--commit-every", "2",
                     "--rows-per-file", str(settings.rows_per_file),
                     "--part-bytes", str(settings.part_bytes), "--part-timeout", str(settings.part_timeout),
                     "--max-attempts", str(settings.max_attempts), "--progress-seconds", "0"]

    def run(self, night: int, k: int) -> tuple[int, Path]:
        """One run to its end (a killed driver's actors waited out); its exit code (-9: killed) and log."""
        log = self.logs / f"night-{night:03d}-run-{k}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.injector.started(proc)
        try:
            code = proc.wait(timeout=self.settings.run_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise Broken(f"run {k} did not end in {self.settings.run_timeout:g} s (a hang); log {log}") from None
        finally:
            self.injector.ended()
        if code < 0:  # killed: Ray ends its actors; the next run must not start beside them
            deadline = time.monotonic() + 60
            while predictor_actors():
                if time.monotonic() > deadline:
                    raise Broken(f"the killed run {k}'s actors outlived it by a minute")
                time.sleep(0.1)
        return code, log


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _after_run(night: int, k: int, code: int, log: Path, faults: list[Fault]) -> list[str]:
    """What must hold after one run, given the faults that fired in it; clears a stolen lease's holder."""
    fired = {f.kind: f for f in faults if f.fired_in == k}
    problems = []
    if "lease_stolen" in fired:
        if code not in (75, -9):
            problems.append(f"run {k}: its lease was taken by node-b, but it exited {code}, not 75:\n{_tail(log)}")
        # node-b dies: its lease expires; the next run takes it over
        storage.write_bytes(storage.resolve(f"{OUTPUT}/{LEASE}"), lease_of_node_b(night, -1))
    if code in (0, 3):
        if storage.exists(storage.resolve(f"{OUTPUT}/{LEASE}")):
            problems.append(f"run {k} exited {code} but left {LEASE}")
        if "held_read" in fired and "killing its predictor process" not in log.read_text(errors="replace"):
            problems.append(f"run {k}: a read held {fired['held_read'].detail} did not trip --part-timeout")
        summary = storage.read_json(storage.resolve(f"{OUTPUT}/_summary.json"))
        replaced = fired.get("file_replaced")
        if replaced and replaced.target not in summary["files_changed_during_run"]:
            problems.append(f"run {k}: {replaced.target} was {replaced.detail}, but the run does not count it as changed "
                            f"(files_changed_during_run {summary['files_changed_during_run']}; recorded failed: "
                            f"{summary['failed'].get(replaced.target)!r})")
    elif code not in (75, -9):
        problems.append(f"run {k} exited {code} (neither 0, 3, 75 nor killed):\n{_tail(log)}")
    return problems


@dataclass
class Chaos:
    """The whole benchmark's state and figures."""

    seed: int
    settings: Settings
    corpus: Corpus
    injector: Injector
    faults_rng: random.Random
    expected_requests: int = 40  # a run's requests, lately: where request-numbered faults are drawn
    drawn: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)
    exits: Counter = field(default_factory=Counter)
    runs: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0
    seconds: list[float] = field(default_factory=list)
    last: Figures = field(default_factory=Figures)


def _runs(chaos: Chaos, n: int, faults: list[Fault], scheduler: Scheduler) -> tuple[list[int], list[str], list[str]]:
    """The night's runs, as a scheduler makes them: again after a kill or an exit 75. Their exit codes, their
    codes and times in words, and what broke."""
    codes, took, problems = [], [], []
    for k in range(1, MAX_RUNS + 1):
        began = time.perf_counter()
        code, log = scheduler.run(n, k)
        codes.append(code)
        took.append(f"{code} in {time.perf_counter() - began:.0f} s")
        problems += _after_run(n, k, code, log, faults)
        if k == 1 and code in (0, 3) and not any(f.fired_in for f in faults):
            chaos.expected_requests = max(20, chaos.injector.requests)
        if code in (0, 3) or problems:
            return codes, took, problems
    return codes, took, problems + [f"the night did not end in {MAX_RUNS} runs (exits {codes})"]


def _tally(chaos: Chaos, faults: list[Fault], codes: list[int], fig: Figures, seconds: float) -> None:
    chaos.drawn.update(f.kind for f in faults)
    chaos.injected.update(f.kind for f in faults if f.fired_in)
    chaos.exits.update(codes)
    chaos.runs += len(codes)
    chaos.rows_lost += fig.lost
    chaos.rows_duplicated += fig.duplicated
    chaos.last = fig
    chaos.seconds.append(round(seconds, 1))


def night(chaos: Chaos, n: int, scheduler: Scheduler) -> str:
    """One night: grow, draw, run until it ends, check; returns its line. Raises Broken."""
    start = time.perf_counter()
    grown = chaos.corpus.grow(n)
    faults = draw(chaos.faults_rng, chaos.expected_requests)
    chaos.injector.arm(n, faults)
    codes, took, problems = _runs(chaos, n, faults, scheduler)
    changed = set()
    if codes[-1] in (0, 3):  # replaced while it was read: labelled by the next run
        changed = set(storage.read_json(storage.resolve(f"{OUTPUT}/_summary.json"))["files_changed_during_run"])
    fig, broken = check(chaos.corpus, changed)
    _tally(chaos, faults, codes, fig, time.perf_counter() - start)
    said = ", ".join(f"{f.kind} (run {f.fired_in}: {f.detail})" if f.fired_in else f"{f.kind} (not reached)" for f in faults)
    line = (f"night {n}: +{', '.join(grown)}; faults: {said}; runs {len(codes)}: exits {', '.join(took)}; rows {fig.rows}: "
            f"labelled {fig.labelled}, recorded failed {fig.unlabelled_recorded}, waiting {fig.waiting}, lost {fig.lost}, "
            f"duplicated {fig.duplicated}; {chaos.seconds[-1]} s")
    if problems or broken:
        raise Broken(line + "\n  " + "\n  ".join(problems + broken))
    return line


def figures(chaos: Chaos, wall: float, broken: str | None) -> dict:
    """The run's figures, as --json-out writes them."""
    return {"nights": len(chaos.seconds), "seed": chaos.seed, "settings": asdict(chaos.settings),
            "faults_drawn": dict(sorted(chaos.drawn.items())), "faults_injected": dict(sorted(chaos.injected.items())),
            "runs": chaos.runs, "exit_codes": {str(k): v for k, v in sorted(chaos.exits.items())},
            "files": chaos.last.files, "rows": chaos.last.rows, "rows_labelled": chaos.last.labelled,
            "rows_recorded_failed": chaos.last.unlabelled_recorded, "rows_waiting": chaos.last.waiting,
            "rows_lost": chaos.rows_lost, "rows_duplicated": chaos.rows_duplicated,
            "seconds_per_night": chaos.seconds, "wall_s": round(wall, 1), "invariants_held": broken is None,
            "broken": broken}


def run_chaos(nights: int, seed: int, settings: Settings = Settings(), workdir: str | None = None,
              json_out: str | None = None) -> dict:
    """Run the nights on a fresh S3 server and a fresh local Ray (started here); returns the figures. With
    json_out, the figures so far are also written there after every night (a long run cut short keeps them)."""
    import ray

    from textlabel.demo import local_s3
    from textlabel.scratch import packaged_bert

    work = Path(workdir or tempfile.mkdtemp(prefix="textlabel-chaos-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    corpus = Corpus(seed, settings)
    injector = Injector(corpus, settings)
    chaos = Chaos(seed, settings, corpus, injector, random.Random(f"{seed}-faults"))
    start, broken, n = time.perf_counter(), None, 0
    os.environ.pop("RAY_ADDRESS", None)  # this benchmark's own Ray, started after the server: workers inherit it
    with local_s3(buckets=(BUCKET,), on_request=injector):
        context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                           object_store_memory=512 * 1024**2)  # small files: beside the test session's Rays
        try:
            model = packaged_bert(work / "model")
            scheduler = Scheduler(model, context.address_info["gcs_address"], settings, work / "logs", injector)
            for n in range(1, nights + 1):
                print(night(chaos, n, scheduler), flush=True)
                if json_out:
                    Path(json_out).write_text(json.dumps(figures(chaos, time.perf_counter() - start, None), indent=2))
        except Broken as exc:
            broken = f"seed {seed}, night {n}: {exc} (run logs in {work / 'logs'})"
            print("BROKEN " + broken, flush=True)
        finally:
            ray.shutdown()
    return figures(chaos, time.perf_counter() - start, broken)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", help="also write the figures to this file")
    parser.add_argument("--workdir", help="where the model and the runs' logs go (default: a new temporary folder)")
    args = parser.parse_args()
    result = run_chaos(args.nights, args.seed, workdir=args.workdir, json_out=args.json_out)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0 if result["invariants_held"] else 1


if __name__ == "__main__":
    sys.exit(main())
