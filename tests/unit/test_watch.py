"""Every night ends: the driver's deadlines (watch.py) and the tracker's attempt accounting (labeller.Tracker),
as plain objects: no Ray."""

from __future__ import annotations

import threading
import time

import pytest

from textlabel.labeller import Tracker
from textlabel.lease import LeaseLost
from textlabel.watch import ScheduleTimeout, Watch, drain


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_attempt_is_an_actor_that_ended_holding_the_unit_not_a_start():
    tracker = Tracker(part_timeout=60)
    assert tracker.start("7", "actor-a", "reading big.parquet")[0] == 0
    tracker.end("7")
    assert tracker.start("7", "actor-a", "reading big.parquet")[0] == 0  # started again after it ended: no death
    assert tracker.start("7", "actor-b", "reading big.parquet")[:2] == (1, None)  # its last attempt never ended
    tracker.finish("7/a.parquet", ["result"])
    assert tracker.start("7", "actor-c")[2] == {"7/a.parquet": ["result"]}  # a retried pack skips finished files


def test_a_unit_without_progress_for_the_part_timeout_is_overdue_once_and_its_next_start_says_why(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    tracker = Tracker(part_timeout=30)
    tracker.start("3", "actor-a", "reading rows 0-250000 of big.parquet")
    clock.now += 29
    tracker.progress("3", "reading rows 8192-250000 of big.parquet")
    clock.now += 29
    assert tracker.overdue() == []  # it moved 29 s ago
    clock.now += 1
    assert tracker.overdue() == [("3", "actor-a", "timed out after 30 s without progress while reading rows "
                                                  "8192-250000 of big.parquet")]
    assert tracker.overdue() == []  # killed once
    deaths, why, _ = tracker.start("3", "actor-a2", "reading rows 0-250000 of big.parquet")
    assert deaths == 1 and why.startswith("timed out after 30 s")


def _watch(clock, tracker=None, killed=None, started=lambda: 1, lease=lambda: None):
    tracker = tracker or Tracker(part_timeout=10)
    return Watch(started, tracker.overdue, (killed if killed is not None else []).append, 10, 60, "2 actor(s) of 1 CPU each",
                 lease, clock, cluster=lambda: "2 CPUs (0 free), 0 GPUs")


def test_the_watch_kills_the_actor_of_an_overdue_unit(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    tracker, killed = Tracker(part_timeout=10), []
    watch = _watch(clock, tracker, killed)
    tracker.start("1", "actor-a", "reading part-1.parquet")
    watch.tick()
    assert killed == []
    clock.now += 11
    watch.tick()
    assert killed == ["actor-a"] and watch.killed == 1


def test_a_pool_that_cannot_be_scheduled_ends_the_night_naming_what_it_asks_and_what_there_is():
    clock = Clock()
    watch = _watch(clock, started=lambda: 0)
    watch.tick()
    clock.now += 59
    watch.tick()
    clock.now += 1
    with pytest.raises(ScheduleTimeout) as ended:
        watch.tick()
    assert "asks for 2 actor(s) of 1 CPU each; the cluster has 2 CPUs (0 free), 0 GPUs" in str(ended.value)
    scheduled = _watch(clock, started=lambda: 1)
    clock.now += 600
    scheduled.tick()  # an actor arrived: no schedule deadline any more


def test_a_lost_lease_ends_the_wait_even_while_no_result_comes():
    lost = threading.Event()

    def lease():
        if lost.is_set():
            raise LeaseLost("now held by run r2")

    never = threading.Event()

    def results():
        yield 1
        never.wait(30)  # a pool that hangs
        yield 2

    found = []
    with pytest.raises(LeaseLost):
        for item in drain(results(), lease, every=0.05):
            found.append(item)
            lost.set()
    assert found == [1]
    never.set()


def test_drain_passes_results_and_errors_through():
    assert list(drain(iter([1, 2, 3]), lambda: None, every=0.05)) == [1, 2, 3]

    def broken():
        yield 1
        raise ValueError("a block failed")

    with pytest.raises(ValueError, match="a block failed"):
        list(drain(broken(), lambda: None, every=0.05))


def test_the_pool_report_gives_each_actors_ready_and_first_unit_times_and_busy_share(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    tracker = Tracker(part_timeout=60)
    tracker.arrived("actor-a")
    tracker.arrived("actor-b")
    clock.now += 4
    tracker.ready("actor-a", {"isa": "AVX2 AVX-512 VNNI", "runtime": "onnx"})
    tracker.start("0", "a", "reading", who="actor-a")
    clock.now += 1
    tracker.ready("actor-b", {"isa": "AVX2 AVX-512 VNNI", "runtime": "onnx"})
    tracker.start("1", "b", "reading", who="actor-b")
    clock.now += 5
    tracker.end("0")
    tracker.start("2/x.parquet", "a", "reading", who="actor-a")  # a file of a pack run one by one: not a unit
    tracker.finish("2/x.parquet", [])
    clock.now += 5
    tracker.end("1")
    report = tracker.report()
    assert report["labelling_s"] == 15 and report["busy_share_min"] == pytest.approx(6 / 15, abs=1e-4)
    a, b = report["actors"]
    assert (a["actor"], a["ready_s"], a["first_unit_s"], a["units"], a["busy_s"]) == ("actor-a", 4, 4, 1, 6)
    assert (b["actor"], b["ready_s"], b["first_unit_s"], b["units"], b["busy_s"]) == ("actor-b", 5, 5, 1, 10)
    assert a["isa"] == "AVX2 AVX-512 VNNI" and b["busy_share"] == pytest.approx(10 / 15, abs=1e-4)
