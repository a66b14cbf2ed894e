"""Every night ends: the driver's wait on the actor pool, with deadlines.

The driver takes the pool's results from a thread of their own and wakes at least once a
second whatever the pool does, to check what must end the wait:

- the lease is lost (lease.py): stop at once, commit nothing more;
- no actor has reached its constructor ``--schedule-timeout`` seconds after the pool was
  asked for: the cluster lacks what it asks (ScheduleTimeout names both);
- a unit has made no progress (no row read or labelled, no output written) for
  ``--part-timeout`` seconds: its actor is killed. Ray Data restarts it and retries the unit,
  whose next start counts the attempt (labeller.Tracker); after --max-attempts its files are
  recorded failed with the reason, so a hung read costs its files, not the night.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
ASK_SECONDS = 10.0  # the most the driver waits for the tracker actor's answer


class ScheduleTimeout(RuntimeError):
    """No predictor actor could be scheduled in time (transient: rerun once the cluster has the resources)."""


def drain(items: Iterator[T], tick: Callable[[], None], every: float = 1.0) -> Iterator[T]:
    """Yield from ``items`` (consumed in a daemon thread) while calling ``tick`` at least every ``every`` seconds,
    however long the next item takes; ``tick`` raises to end the wait."""
    found: queue.Queue = queue.Queue()

    def feed() -> None:
        try:
            for item in items:
                found.put((True, item))
            found.put((False, None))
        except BaseException as exc:  # handed to the consumer
            found.put((False, exc))

    threading.Thread(target=feed, name="textlabel-results", daemon=True).start()
    while True:
        tick()
        try:
            more, item = found.get(timeout=every)
        except queue.Empty:
            continue
        if not more:
            if item is not None:
                raise item
            return
        yield item


class Watch:
    """The checks ``drain`` runs each second for a labelling night. ``started`` and ``overdue`` ask the tracker
    (labeller.Tracker) how many actors arrived and which units are past --part-timeout; ``kill`` ends an actor."""

    def __init__(self, started: Callable[[], int], overdue: Callable[[], list[tuple[str, Any, str]]],
                 kill: Callable[[Any], None], part_timeout: float, schedule_timeout: float, asked: str,
                 check_lease: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
                 cluster: Callable[[], str] = lambda: _cluster()):
        self.started, self.overdue, self.kill = started, overdue, kill
        self.part_timeout, self.schedule_timeout, self.asked = part_timeout, schedule_timeout, asked
        self.check_lease, self.clock, self.cluster = check_lease, clock, cluster
        self.began = clock()
        self.scheduled = False
        self.killed = 0
        self._next_overdue = self.began

    @classmethod
    def of_tracker(cls, tracker: Any, part_timeout: float, schedule_timeout: float, asked: str,
                   check_lease: Callable[[], None]) -> "Watch":
        """The watch of a night whose tracker is a Ray actor."""
        return cls(lambda: _ask(tracker.started.remote(), 0), lambda: _ask(tracker.overdue.remote(), []), _kill,
                   part_timeout, schedule_timeout, asked, check_lease)

    def tick(self) -> None:
        """Raise when the night must end now; kill the actors of units past --part-timeout."""
        self.check_lease()
        now = self.clock()
        if not self.scheduled:
            self.scheduled = self.started() > 0
            if not self.scheduled and now - self.began >= self.schedule_timeout:
                raise ScheduleTimeout(f"no predictor actor could start in --schedule-timeout {self.schedule_timeout:g} s: "
                                      f"the pool asks for {self.asked}; the cluster has {self.cluster()}. Give the "
                                      "cluster those resources (or ask for fewer: --num-actors, --cpus-per-actor, "
                                      "--use-gpu), then rerun")
        if now >= self._next_overdue:
            self._next_overdue = now + max(0.5, min(10.0, self.part_timeout / 4))
            for key, actor, why in self.overdue():
                logger.warning("unit %s %s: killing its predictor process (Ray restarts it and retries the unit)",
                               key, why)
                self.killed += 1
                self.kill(actor)


def _ask(ref: Any, otherwise: Any) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=ASK_SECONDS)
    except ray.exceptions.GetTimeoutError:
        logger.warning("the tracker actor did not answer in %g s; checking again in a moment", ASK_SECONDS)
        return otherwise


def _kill(actor: Any) -> None:
    import ray

    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=False)
    except Exception as exc:  # already dead: Ray retries its unit anyway
        logger.warning("could not kill a predictor actor: %s", exc)


def _cluster() -> str:
    """What the cluster has, in a person's words: "2 CPUs (0 free), 0 GPUs"."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return ", ".join(f"{total.get(r, 0):g} {r}s ({free.get(r, 0):g} free)" for r in ("CPU", "GPU"))
