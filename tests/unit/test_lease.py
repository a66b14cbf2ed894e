"""The lease that keeps one run per output prefix: its rules as pure functions, and on a local disk
(O_EXCL and a compare-and-swap under flock). The S3 side is in test_nightly.py, against the S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from textlabel import conditional, lease, storage

NOW = 1_800_000_000.0


def holder(**changes) -> lease.LeaseRecord:
    base = lease.LeaseRecord("run-a", "node-b", "boot-b", 4242, 12.0, None, NOW - 60, NOW + 240)
    return lease.LeaseRecord(**{**base.__dict__, **changes})


@pytest.mark.parametrize("record, verdict, expected", [
    (holder(), (True, "alive"), None),
    (holder(), (None, "elsewhere"), None),  # cannot tell: respected until it expires
    (holder(), (False, "its driver process 4242 on this host is gone"), "its driver process 4242 on this host is gone (run run-a)"),
    (holder(expires_at=NOW - 30), (True, "alive"), "it expired 30 s ago (run run-a stopped renewing it)"),
    (holder(state=lease.DIRTY), (True, "alive"), "run run-a released it after a crash"),
])
def test_who_may_take_a_lease_over(record, verdict, expected):
    assert lease.takeover_reason(record, NOW, lambda _: verdict) == expected


def test_a_holder_on_this_host_is_alive_while_its_process_runs():
    me = lease.LeaseRecord.mine("run-me", NOW, 300)
    assert lease.liveness(me)[0] is True
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record = lease.LeaseRecord(**{**me.__dict__, "pid": child.pid, "pid_started": lease.process_started(child.pid)})
    assert lease.liveness(record)[0] is True
    child.kill()
    child.wait()
    assert lease.liveness(record) == (False, f"its driver process {child.pid} on this host is gone")
    reused = lease.LeaseRecord(**{**me.__dict__, "pid_started": me.pid_started - 100})  # same pid, another process
    assert lease.liveness(reused)[0] is False
    assert lease.liveness(holder())[0] is None  # another host, no Ray job to ask


def test_a_second_run_is_refused_with_the_holders_name_then_takes_over_a_dead_or_released_lease(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    first, why = lease.acquire(out, "run-1", ttl=300)
    assert why is None and json.loads((tmp_path / "out" / "_lease.json").read_text())["run"] == "run-1"
    with pytest.raises(lease.LeaseHeld) as held:
        lease.acquire(out, "run-2", ttl=300)
    message = str(held.value)
    assert "is held by run run-1 (host " in message and f"pid {os.getpid()}" in message and "expires" in message
    first.release(clean=False)  # a crash: released, but dirty
    second, why = lease.acquire(out, "run-2", ttl=300)
    assert why == "run run-1 released it after a crash"
    second.release(clean=True)
    assert not (tmp_path / "out" / "_lease.json").exists()


def test_an_expired_lease_is_taken_over_and_its_holder_can_no_longer_commit(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    stuck, _ = lease.acquire(out, "run-1", ttl=300)
    stuck._stop.set()  # a holder that stopped renewing (a hung driver on another node, say)
    record = json.loads((tmp_path / "out" / "_lease.json").read_text())
    (tmp_path / "out" / "_lease.json").unlink()
    elsewhere = {**record, "host": "node-b", "expires_at": time.time() - 1}
    conditional.LocalStore(out.join(lease.NAME)).create(json.dumps(elsewhere).encode())
    taker, why = lease.acquire(out, "run-2", ttl=300)
    assert why.startswith("it expired")
    stuck._write(expires_at=time.time() + 300)  # its next renewal finds the lease taken
    with pytest.raises(lease.LeaseLost, match="run run-2"):
        stuck.check()
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["run"] == "run-2"
    taker.release(clean=True)


def test_the_lease_is_renewed_while_the_run_lives(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    held, _ = lease.acquire(out, "run-1", ttl=0.3)
    first = json.loads((tmp_path / "out" / "_lease.json").read_text())["expires_at"]
    deadline = time.monotonic() + 30
    while json.loads((tmp_path / "out" / "_lease.json").read_text())["renewals"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["expires_at"] > first
    held.check()
    held.release(clean=True)
