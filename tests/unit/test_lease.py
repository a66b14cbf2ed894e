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


HERE = lease.Here("node-a", "boot-a", "pid:[4026531836]", started=lambda pid: {4242: 12.0}.get(pid))


@pytest.mark.parametrize("record, verdict", [
    (holder(host="node-a", boot_id="boot-a", pid_ns="pid:[4026531836]"), True),  # its process runs here
    (holder(host="node-a", boot_id="boot-a", pid_ns="pid:[4026531836]", pid=4243), False),  # gone
    (holder(host="node-a", boot_id="boot-a", pid_ns="pid:[4026531836]", pid_started=11.0), False),  # pid reused
    # A container on the host's network: same hostname and boot, its own pids. Its pid 4242 says nothing here.
    (holder(host="node-a", boot_id="boot-a", pid_ns="pid:[4026532999]", pid=4243), None),
    (holder(host="node-a", boot_id="boot-a", pid=4243), None),  # written by a textlabel that did not record it
    (holder(host="node-a", boot_id="", pid_ns="", pid=4243), None),  # no /proc there (macOS): nothing provable
    (holder(host="node-a", boot_id="boot-b", pid_ns="pid:[4026531836]", pid=4243), None),  # the host rebooted
    (holder(pid=4243), None),  # another host
])
def test_a_holder_is_dead_only_when_its_pid_proves_it(record, verdict):
    assert lease.liveness(record, HERE)[0] is verdict


def test_without_proc_a_holder_on_this_host_is_unknown_not_dead():
    no_proc = lease.Here("node-a", "", "", started=lambda pid: None)
    record = holder(host="node-a", boot_id="", pid_ns="")
    verdict, why = lease.liveness(record, no_proc)
    assert verdict is None and "another PID namespace" in why
    assert lease.takeover_reason(record, NOW, lambda r: lease.liveness(r, no_proc)) is None  # waits for expiry


def test_a_ray_job_that_ended_proves_its_driver_dead(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_me"}}))
    record = holder(ray_job="raysubmit_old")
    assert lease.liveness(record, HERE, ray_status=lambda job: "FAILED")[0] is False
    assert lease.liveness(record, HERE, ray_status=lambda job: "RUNNING")[0] is True
    assert lease.liveness(record, HERE, ray_status=lambda job: None)[0] is None  # the cluster did not answer


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
    with pytest.raises(lease.LeaseLost, match="now held by run run-2"):
        stuck.fence("a commit")  # its next write proves nothing: the lease is another run's
    stuck.release(clean=True)  # a release after the loss leaves the new holder's lease alone
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["run"] == "run-2"
    taker.release(clean=True)
    assert not (tmp_path / "out" / "_lease.json").exists()


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


class Store:
    """The lease's store on a local disk, with a switch that makes its writes hang (a stuck request)."""

    def __init__(self, loc):
        self.disk = conditional.LocalStore(loc)
        self.hang = False

    def __getattr__(self, name):
        return getattr(self.disk, name)

    def replace(self, data, token):
        while self.hang:
            time.sleep(0.01)
        return self.disk.replace(data, token)


def _held(tmp_path, ttl=300.0):
    out = storage.resolve(str(tmp_path / "out"))
    taken, _ = lease.acquire(out, "run-1", ttl=ttl)
    taken._stop.set()  # no renewal thread in these tests: each write is the test's
    taken._thread.join()
    store = Store(out.join(lease.NAME))
    taken.store = store
    return taken, store, tmp_path / "out" / "_lease.json"


def test_each_fence_is_a_conditional_write_and_a_replaced_lease_is_lost_naming_its_holder(tmp_path):
    held, store, path = _held(tmp_path)
    held.fence("a commit")
    assert json.loads(path.read_text())["renewals"] == 1  # proven by a write, not assumed
    other = {**json.loads(path.read_text()), "run": "run-2", "host": "node-b"}
    path.write_text(json.dumps(other))  # a takeover this run did not see (clocks, a stalled renewal)
    with pytest.raises(lease.LeaseLost) as lost:
        held.fence("compaction")
    assert "now held by run run-2 (host node-b" in str(lost.value) and "rerun the same command" in str(lost.value)
    with pytest.raises(lease.LeaseLost):
        held.check()  # and it stays lost
    held.release(clean=True)
    assert json.loads(path.read_text()) == other  # the new holder's lease is left as it is


def test_a_lease_deleted_under_a_run_is_lost(tmp_path):
    held, store, path = _held(tmp_path)
    path.unlink()
    with pytest.raises(lease.LeaseLost, match="deleted"):
        held.fence("the summary")


def test_a_stuck_store_is_waited_for_only_while_the_last_renewal_still_proves_the_lease(tmp_path, caplog):
    clock = [1000.0]
    held, store, path = _held(tmp_path, ttl=4.0)
    held._clock, held._proven = (lambda: clock[0]), 1000.0
    store.hang = True
    clock[0] = 1001.0  # renewed 1 s ago: under SAFE (2 s) of the time to live
    held.fence("a commit")  # the write could not finish in time, but the last renewal is recent enough
    assert "still proves it" in caplog.text
    clock[0] = 1002.5  # 2.5 s without a proof: another run may take over soon
    with pytest.raises(lease.LeaseLost, match="could not be renewed for 2 s before a commit"):
        held.fence("a commit")
    store.hang = False


def test_a_renewal_of_ours_that_landed_unseen_is_still_ours_and_release_deletes_it(tmp_path):
    held, store, path = _held(tmp_path)
    late = {**json.loads(path.read_text()), "renewals": 7}  # a renewal past its deadline that took effect later
    path.write_text(json.dumps(late))
    held.fence("a commit")  # not a conflict: the record under the unknown token is this run's
    assert json.loads(path.read_text())["renewals"] == 1
    path.write_text(json.dumps(late))
    held.release(clean=True)
    assert not path.exists()


def test_a_lease_from_another_textlabel_version_still_reads():
    record = holder()
    data = json.loads(record.to_bytes())
    del data["pid_ns"]
    data["field_from_the_future"] = 1
    assert lease.LeaseRecord.from_bytes(json.dumps(data).encode()) == record


def test_no_lease_still_refuses_while_another_run_holds_a_live_lease(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    lease.refuse_if_held(out)  # nobody there
    held, _ = lease.acquire(out, "run-1", ttl=300)
    with pytest.raises(lease.LeaseHeld, match="--no-lease, but --output .* is held by run run-1"):
        lease.refuse_if_held(out)
    held.release(clean=False)  # released after a crash: nobody is writing there now
    lease.refuse_if_held(out)


def test_every_store_call_has_a_deadline():
    with pytest.raises(TimeoutError, match="no answer from the store in 0.1 s"):
        lease.within(0.1, lambda: time.sleep(5))
    assert lease.within(1, lambda: 42) == 42
    with pytest.raises(ValueError):
        lease.within(1, lambda: int("x"))
