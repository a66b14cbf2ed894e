"""Progress for the people who read a job's log.

A terminal gets Ray Data's progress bars, redrawn in place. A log written to a file or a
pipe (cron, ``ray job logs``) would get a new copy of every bar at every redraw, so there
the bars are turned off and the job logs one line every few seconds instead:

    labelled 4/12 files (37% of the bytes): 1,850 rows, 412 rows/s; 9 s in, about 15 s left
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def interactive(stream=None) -> bool:
    """Whether ``stream`` (stderr by default, where the log goes) is a terminal that redraws bars in place."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class Labelling:
    """How far a labelling run is: its files and their bytes are known up front; rows are counted as parts come back
    (a part of a file counts its share of the file's bytes)."""

    files: int
    bytes: int
    started: float = field(default_factory=time.monotonic)
    files_done: int = 0
    bytes_done: float = 0.0
    rows: int = 0
    failed: int = 0

    def part_done(self, rows: int, size: int, parts: int) -> None:
        self.rows += rows
        self.bytes_done += size / max(parts, 1)

    def file_done(self, failed: bool = False) -> None:
        self.files_done += 1
        self.failed += failed

    def line(self, now: float | None = None) -> str:
        """One line: what is done of what, the rate, the time so far and (once some bytes are done) the time left."""
        elapsed = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        share = min(self.bytes_done / self.bytes, 1.0) if self.bytes else self.files_done / max(self.files, 1)
        text = (f"labelled {self.files_done}/{self.files} files ({share:.0%} of the bytes): {self.rows:,} rows, "
                f"{self.rows / elapsed:,.0f} rows/s; "
                f"{_duration(elapsed)} in")
        if 0 < share < 1:
            text += f", about {_duration(elapsed * (1 - share) / share)} left"
        if self.failed:
            text += f"; {self.failed} file(s) FAILED so far"
        return text


class Ticker:
    """Log ``line()`` every ``every`` seconds on a daemon thread, until stopped (``with Ticker(...):``)."""

    def __init__(self, line: Callable[[], str], every: float, log: Callable[[str], None] | None = None):
        self.line, self.every = line, every
        self.log = log or (lambda text: logger.info("%s", text))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="textlabel-progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.log(self.line())

    def __enter__(self) -> "Ticker":
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.every > 0:
            self.log(self.line())  # the last line: where the run ended


class Every:
    """``due()`` is true once every ``seconds`` (never when ``seconds`` is 0): a gate for progress lines in a loop."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.next = clock() + seconds

    def due(self) -> bool:
        if self.seconds <= 0 or self.clock() < self.next:
            return False
        self.next = self.clock() + self.seconds
        return True
