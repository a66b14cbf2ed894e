"""Committing file records off the labelling loop: batched, in a thread of their own.

The driver hands each finished file's record to ``Committer.add`` and goes back to its
results at once. A thread writes the pending records as one manifest segment when
``every`` records are waiting or the oldest has waited ``seconds`` (and at ``close``), at
most ``every`` a segment,
then deletes the outputs those records stopped vouching for (a relabelled file's old
parts, a failed file's written parts): only after the record that makes them unvouched
is durable. A kill loses at most the records not yet written; their outputs carry their
input, version, part and model in their Parquet metadata, and the next run adopts or
redoes them (label.py). Before each write the lease is checked: a run that lost its
lease to another never commits again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from textlabel import storage
from textlabel.manifest import Manifest
from textlabel.records import FileRecord

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    record: FileRecord
    delete: list[str]  # output names (relative to --output) to delete once the record is durable


@dataclass
class Committer:
    """``add`` records from the result loop; ``close`` flushes the rest and raises any commit error.

    One thread writes, so segments are written (and numbered) in the order records were added.
    """

    manifest: Manifest
    every: int = 500
    seconds: float = 10.0
    check: Callable[[], None] = lambda: None  # raises when the run may no longer commit (lease lost)
    committed: list[FileRecord] = field(default_factory=list)
    commits: int = 0
    _pending: list[_Pending] = field(default_factory=list)
    _oldest: float | None = None
    _flushing: int = 0
    _writing: bool = False
    _closing: bool = False
    _error: BaseException | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="textlabel-committer", daemon=True)
        self._thread.start()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"committing the manifest failed: {self._error}") from self._error

    def add(self, record: FileRecord, delete: list[str] | None = None) -> None:
        """Queue one file's record (never blocks on storage); raises if an earlier commit failed."""
        with self._cond:
            self._raise()
            self._pending.append(_Pending(record, list(delete or [])))
            self._oldest = self._oldest or time.monotonic()
            if len(self._pending) in (1, self.every):  # the first starts the clock; a full batch goes now
                self._cond.notify_all()

    def flush(self) -> None:
        """Write everything queued so far, now, and wait until it is durable."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            while (self._pending or self._writing) and self._error is None:
                self._cond.wait()
            self._flushing -= 1
            self._raise()

    def close(self) -> None:
        """Flush every queued record and stop the thread; raises the first commit error."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._raise()

    def _due(self) -> bool:
        if not self._pending:
            return False
        full = len(self._pending) >= self.every or time.monotonic() - self._oldest >= self.seconds
        return full or self._closing or self._flushing > 0

    def _loop(self) -> None:
        with self._cond:
            while True:
                while not self._due() and not (self._closing and not self._pending):
                    wait = None if self._oldest is None else max(0.0, self.seconds - (time.monotonic() - self._oldest))
                    self._cond.wait(wait)
                if not self._pending:
                    return
                batch, self._pending = self._pending[:self.every], self._pending[self.every:]
                self._oldest = time.monotonic() if self._pending else None
                self._writing = True
                self.commits += 1
                self._cond.release()  # add() goes on while this batch is written
                try:
                    self._write(batch, self.commits)
                except BaseException as exc:  # kept for add()/flush()/close(); nothing after it commits
                    self._error = exc
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self._cond.notify_all()
                if self._error is not None:
                    return

    def _write(self, batch: list[_Pending], seq: int) -> None:
        self.check()
        self.manifest.write_segment([p.record for p in batch], seq)
        stale = [self.manifest.out.join(*name.split("/")).path for p in batch for name in p.delete]
        storage.delete_many(self.manifest.out.fs, stale)
        self.committed += [p.record for p in batch]
        logger.debug("committed %d records (segment %d), deleted %d stale outputs", len(batch), seq, len(stale))
