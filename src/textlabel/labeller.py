"""The predictor actor: labels units of work (plan.Unit) into output files.

A unit's rows flow through one pipeline, whatever files they come from: read (a pack's
small files concurrently, one GET each; a big file's part through a handle pinned to its
listed version), cut into windows of WINDOW_ROWS rows (with --long-texts chunk, also at
most about WINDOW_TEXT_BYTES of text; many small files share a window, so their rows share
model batches), read and tokenized one window ahead of the model in a thread, labelled
(predict.Predictor: token-budget batches), and gathered per output file, which is written
in one atomic PUT by a writer thread as soon as its last row is labelled. Each output's
Parquet metadata records its input, the version read, its part and rows, the model, the
counts and how long texts were read (--long-texts), so a later run can adopt an output
whose record a kill lost. A file of zero rows gets an output of its columns and the
labels', without rows.

Bad bytes cost their row, not their file: a cell that is not text gets a skip reason
(predict.texts_of). An error while one file's rows are tokenized or labelled fails that
output alone, unwritten (so its file keeps its old labels); the other files of its window
are labelled all the same. A file replaced during a pinned read is changed, not failed.

A unit whose actor keeps dying (out of memory, a crash in native code) is not retried
forever: the ``Tracker`` actor counts attempts; from the second, a pack's files run one
by one so that only the culprit fails, after --max-attempts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textlabel import drift, predict, storage
from textlabel.plan import Footer, Item, PartSpec, Unit, check_footer, columns_note, read_problem, split
from textlabel.records import OUTPUT_META, ItemResult, part_name

logger = logging.getLogger(__name__)

WINDOW_ROWS = 8192  # rows tokenized together, then sorted by length into token-budget batches
# With --long-texts chunk, also at most about this many bytes of text a window: a long row becomes up to
# --max-chunks model windows, and a window's token ids are Python lists (about 36 bytes a token).
WINDOW_TEXT_BYTES = 4 << 20
READ_BYTES = 16 << 20  # about this many uncompressed bytes per read batch of a big part
READ_THREADS = 8  # concurrent whole-file reads of a pack
WRITE_THREADS = 4


@dataclass
class LabellerSpec:
    """What every actor needs to know (sent once, at construction)."""

    model: str | None
    model_id: str
    input: str
    run: str
    output: str
    text_column: str
    label_prefix: str
    added_columns: list[str]
    reference_columns: list[str] | None
    max_length: int
    predictor: dict[str, Any]  # predict.Predictor's options
    rows_per_file: int
    part_bytes: int
    max_attempts: int
    long_texts: dict[str, Any] = field(default_factory=dict)  # chunking.LongTexts' fields
    min_scores: list[list[float] | None] | None = None  # per task, a --min-score per class
    hooks: dict[str, str] = field(default_factory=dict)  # test-only fault hooks (TEXTLABEL_TEST_HOOKS)


@dataclass
class _Attempt:
    """A unit (or a file of a split pack) running on an actor: who runs it, and its last sign of progress."""

    actor: Any
    last: float
    doing: str
    killed: bool = False
    who: str = ""  # the actor's id, for its busy time
    began: float = 0.0


class Tracker:
    """Ray actor on the driver's side: the attempts of each unit (or of each file of a pack that ended its actor),
    the progress of those running, and finished files' results, so a retried unit skips what is done and gives
    up on what keeps ending its actor. An attempt is an actor that ended while holding the unit: a start of a
    unit whose last attempt never ended. ``overdue`` names the attempts without progress for --part-timeout."""

    def __init__(self, part_timeout: float = 1800.0) -> None:
        self.part_timeout = part_timeout
        self.running: dict[str, _Attempt] = {}
        self.deaths: Counter = Counter()
        self.why: dict[str, str] = {}  # how a unit's last attempt ended, when the driver knows (a timeout)
        self.finished: dict[str, list[str]] = {}
        self.actors = 0  # actors that reached their constructor: the pool was scheduled
        self.began = time.monotonic()  # the pool was asked for
        self.pool: dict[str, dict[str, Any]] = {}  # per actor: when it arrived, was ready, got work; busy seconds

    def _since(self) -> float:
        return round(time.monotonic() - self.began, 2)

    def arrived(self, who: str = "") -> None:
        self.actors += 1
        if who:
            actor = self.pool.setdefault(who, {"arrived_s": self._since(), "ready_s": None, "first_unit_s": None,
                                               "units": 0, "busy_s": 0.0, "starts": 0})
            actor["starts"] += 1  # more than one: Ray restarted it (it died)

    def ready(self, who: str, facts: dict[str, Any]) -> None:
        """An actor loaded its model: when, and what it runs on (runtime.host_facts)."""
        self.pool.setdefault(who, {"arrived_s": None, "first_unit_s": None, "units": 0, "busy_s": 0.0, "starts": 1})
        self.pool[who] |= {"ready_s": self._since(), **facts}

    def report(self) -> dict[str, Any]:
        """The pool over the night so far: per actor, its times (seconds since the pool was asked for), units
        and busy share (seconds holding a unit over the night's labelling seconds)."""
        night = max(self._since(), 1e-9)
        actors = [{"actor": who[:12], **a, "busy_s": round(a["busy_s"], 2), "busy_share": round(a["busy_s"] / night, 4)}
                  for who, a in sorted(self.pool.items(), key=lambda kv: (kv[1]["ready_s"] is None, kv[1]["ready_s"] or 0))]
        return {"labelling_s": round(night, 2), "actors": actors,
                "busy_share_min": min((a["busy_share"] for a in actors), default=0.0)}

    def started(self) -> int:
        return self.actors

    def start(self, key: str, actor: Any = None, doing: str = "", who: str = "") -> tuple[int, str | None, dict[str, list[str]]]:
        """A unit starts on ``actor`` (``who``: its id): its attempts so far, how the last ended, and its finished
        files' results."""
        if key in self.running:  # its last attempt never ended: its actor died, or was killed for a timeout
            self.deaths[key] += 1
        now = time.monotonic()
        self.running[key] = _Attempt(actor, now, doing, who=who, began=now)
        figures = self.pool.get(who)
        if figures is not None and "/" not in key and figures["first_unit_s"] is None:
            figures["first_unit_s"] = self._since()
        self.progress(key, doing)  # a file of a split pack starting: its pack moves
        prefix = key + "/"
        return self.deaths[key], self.why.get(key), {k: v for k, v in self.finished.items() if k.startswith(prefix)}

    def progress(self, key: str, doing: str) -> None:
        """A unit moved; a file of a split pack moves its pack too (key "7/a.parquet" is a file of unit 7)."""
        for k in (key, key.split("/", 1)[0]):
            attempt = self.running.get(k)
            if attempt is not None and not attempt.killed:
                attempt.last, attempt.doing = time.monotonic(), doing

    def end(self, key: str) -> None:
        attempt = self.running.pop(key, None)
        figures = self.pool.get(attempt.who) if attempt is not None else None
        if figures is not None and "/" not in key:  # a unit (not a file of a pack run one by one inside it)
            figures["units"] += 1
            figures["busy_s"] += time.monotonic() - attempt.began

    def finish(self, key: str, results: list[str]) -> None:
        self.finished[key] = results
        self.end(key)

    def overdue(self) -> list[tuple[str, Any, str]]:
        """Attempts without progress for --part-timeout, each returned once: (key, actor, why) for the driver
        to kill the actor; the unit's next start counts the attempt and knows why it ended."""
        now, found = time.monotonic(), {}
        for key, attempt in sorted(self.running.items(), key=lambda kv: -len(kv[0])):  # a pack's file before its pack
            if not attempt.killed and now - attempt.last >= self.part_timeout:
                self.why[key] = f"timed out after {self.part_timeout:g} s without progress while {attempt.doing}"
                found.setdefault(id(attempt.actor), (key, attempt.actor, self.why[key]))
        for attempt in self.running.values():  # one kill an actor: a second would kill its restarted self
            attempt.killed = attempt.killed or id(attempt.actor) in found
        return list(found.values())


@dataclass
class _Out:
    """One output file being assembled."""

    item: Item
    part: PartSpec
    fingerprint: str
    note: str | None
    start: float
    tables: list[pa.Table] = field(default_factory=list)
    rows_in: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    label_stats: list[dict] | None = None  # per task: drift.task_stats of its rows
    error: str | None = None  # why its rows could not be prepared or labelled: it fails alone, unwritten

    @property
    def name(self) -> str:
        return part_name(self.item.input, self.part.index, self.part.count)

    def result(self, **changes: Any) -> ItemResult:
        return ItemResult(self.item.input, self.part.index, self.part.count, self.name, self.fingerprint, self.rows_in,
                          rows_skipped=dict(self.skipped), rows_truncated=self.truncated, note=self.note,
                          label_stats=self.label_stats,
                          seconds=round(time.perf_counter() - self.start, 3), **changes)


@dataclass
class _Labels:
    """A window's rows (or one piece's) scored: the output columns and what an output's counts need."""

    prepared: predict.Prepared
    scored: predict.Scored
    unsure: list[np.ndarray]  # per task: rows under --min-score
    columns: dict[str, pa.Array]
    reasons: list[str | None]  # skip reason per row, low_confidence too


def _rows_of(item: Item, start: int | None = None, stop: int | None = None) -> str:
    """Where in its file an item (or a stretch of it) is, for a person: "rows 0-250000 of big.parquet"."""
    if start is None and item.part:
        start, stop = item.part.start, item.part.stop
    return f"rows {start}-{stop} of {item.input}" if start is not None else item.input


def _failed(item: Item, error: str, changed: bool = False, fingerprint: str | None = None) -> ItemResult:
    part = item.part or PartSpec(0, 1, 0, 0, ())
    return ItemResult(item.input, part.index, part.count, part_name(item.input, part.index, part.count),
                      fingerprint or item.fingerprint, error=error[:2000], changed=changed)


def windows_of(events: Iterator[tuple[str, Any]], text_column: str, max_rows: int,
               max_text_bytes: int | None = None) -> Iterator[list[tuple[str, Any]]]:
    """Reading events cut into windows of about ``max_rows`` rows (and ``max_text_bytes`` bytes of text, when
    given); a window ends after the batch that reaches either, and "end"/"error" events stay in order."""
    window, rows, size = [], 0, 0
    for kind, value in events:
        if kind == "rows":
            rows += value[1].num_rows
            size += value[1].column(text_column).nbytes if max_text_bytes else 0
        window.append((kind, value))
        if rows >= max_rows or (max_text_bytes and size >= max_text_bytes):
            yield window
            window, rows, size = [], 0, 0
    if window:
        yield window


def _content_identity(model_id: str) -> str | None:
    """A model identity that names content (model.identity: a hash, or the packaged model's version), to key
    caches by; None for a hub id, which names no content."""
    return model_id if model_id.startswith("sha256:") or " " in model_id else None


class PartLabeller:
    """Ray Data actor (map_batches): a batch of units (JSON) in, one result row per output file out."""

    def __init__(self, spec: dict[str, Any], tracker: Any = None):
        start = time.perf_counter()
        self.who = ""
        if tracker is not None:  # scheduled: what --schedule-timeout waits for (the model may take a while to load)
            import ray

            self.who = ray.get_runtime_context().get_actor_id() or ""
            tracker.arrived.remote(self.who)
        self.spec = LabellerSpec(**spec)
        s = self.spec
        self._key, self._doing, self._beaten = "", "", 0.0  # the unit labelled, what it does, when last told
        self.predictor = predict.Predictor(s.model, **s.predictor, hooks=s.hooks, identity=_content_identity(s.model_id))
        self.long = predict.LongTexts(**s.long_texts)
        self.min_scores = [None if m is None else np.asarray(m) for m in s.min_scores] if s.min_scores else None
        self.out = storage.resolve(s.output)
        self.src = storage.resolve(s.input)
        self.tracker = tracker
        self.writing: set[str] = set()  # the items of the unit being labelled whose outputs started to be written
        if "multipart_bytes" in s.hooks:  # test hook: upload even a small output in parts
            storage.MULTIPART_BYTES = int(s.hooks["multipart_bytes"])
        self.timings: Counter = Counter(init_seconds=time.perf_counter() - start)  # this actor's, sent with results
        if tracker is not None:
            tracker.ready.remote(self.who, self.predictor.facts())

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [r for text in batch["unit"].to_pylist() for r in self.label_unit(Unit.from_json(text))]
        return pa.table({"result": [r.to_json() for r in results], "input": [r.input for r in results]})

    # Attempts: a unit that killed its actor before is retried carefully, then given up.

    def _start(self, key: str, item: Item) -> tuple[int, str | None, dict[str, list[str]]]:
        if self.tracker is None:
            return 0, None, {}
        import ray

        actor = ray.get_runtime_context().current_actor
        return ray.get(self.tracker.start.remote(key, actor, f"reading {_rows_of(item)}", self.who))

    def _end(self, key: str) -> None:
        if self.tracker is not None:
            self.tracker.end.remote(key)

    def label_unit(self, unit: Unit) -> list[ItemResult]:
        """Label one unit; returns a result per output file (or per failed item)."""
        key = str(unit.id)
        deaths, why, finished = self._start(key, unit.items[0])
        try:
            if deaths == 0:
                return self._attempt(key, unit.items)
            if len(unit.items) == 1:
                give_up = deaths >= self.spec.max_attempts
                return self._give_up(unit.items[0], deaths, why) if give_up else self._attempt(key, unit.items)
            return self._one_by_one(unit, finished)
        finally:
            self._end(key)

    def _one_by_one(self, unit: Unit, finished: dict[str, list[str]]) -> list[ItemResult]:
        """A pack that ended its actor: one file at a time (whatever --max-attempts), so only the culprit fails."""
        results = []
        for item in unit.items:
            key = f"{unit.id}/{item.key}"
            if key in finished:
                results += [ItemResult.from_json(r) for r in finished[key]]
                continue
            deaths, why, _ = self._start(key, item)
            done = self._give_up(item, deaths, why) if deaths >= self.spec.max_attempts else self._attempt(key, [item])
            if self.tracker is not None:
                import ray

                ray.get(self.tracker.finish.remote(key, [r.to_json() for r in done]))
            results += done
        return results

    def _give_up(self, item: Item, deaths: int, why: str | None = None) -> list[ItemResult]:
        where = f"rows {item.part.start}-{item.part.stop} of this file" if item.part else "this file"
        if why:
            error = (f"{why}; {deaths} attempt(s): the read or the model hangs there? (see the Ray logs); quarantined "
                     "until the file changes: fix it or raise --part-timeout, or rerun with --retry-failed")
        else:
            error = (f"the predictor process died {deaths} times while labelling {where}: out of memory, or a crash in "
                     "the tokenizer or model? (see the Ray logs); quarantined until the file changes: fix it or lower "
                     "--part-bytes, or rerun with --retry-failed")
        return [dataclasses.replace(_failed(item, error), poison=True)]

    def _attempt(self, key: str, items: list[Item]) -> list[ItemResult]:
        self._key, self._beaten = key, 0.0
        return self._guarded(items)

    def _beat(self, doing: str | None = None, force: bool = False) -> None:
        """Tell the tracker this unit progresses, and what it does now (at most once a second unless ``force``;
        never waits for an answer): what --part-timeout watches."""
        self._doing = doing or self._doing
        now = time.monotonic()
        if self.tracker is not None and (force or now - self._beaten >= 1.0):
            self._beaten = now
            self.tracker.progress.remote(self._key, self._doing)

    def _guarded(self, items: list[Item]) -> list[ItemResult]:
        """Label items; an unexpected error fails them (an output whose write had started may be written: not
        trusted; a file with none keeps its old labels)."""
        self.writing = set()
        try:
            return self._label(items)
        except Exception as exc:
            logger.exception("labelling %d file(s) failed", len(items))
            return [dataclasses.replace(_failed(i, f"{type(exc).__name__}: {exc}"), maybe_written=i.key in self.writing)
                    for i in items]

    # Reading: events of (output, rows), (output, end) and (item, error).

    def _loc(self, item: Item) -> storage.Location:
        return storage.Location(item.path, self.src.fs, item.path)

    def _open(self, item: Item, parquet: pq.ParquetFile, fingerprint: str) -> list[_Out] | str:
        footer = Footer.of(parquet.metadata)
        problem = check_footer(footer, self.spec.text_column, self.spec.added_columns)
        if problem:
            return problem
        note = columns_note(footer.columns, self.spec.reference_columns)
        parts = [item.part] if item.part else split(footer, self.spec.rows_per_file, self.spec.part_bytes)
        now = time.perf_counter()
        return [_Out(item, p, fingerprint, note, now) for p in parts]

    def _rows(self, parquet: pq.ParquetFile, out: _Out) -> Iterator[tuple[str, Any]]:
        if not out.part.groups:  # a file of zero rows: its output has the columns, labels' too, and no rows
            yield "rows", (out, pa.RecordBatch.from_pylist([], schema=parquet.schema_arrow))
            return
        meta = parquet.metadata
        row = sum(meta.row_group(g).num_rows for g in range(out.part.groups[0]))
        for g in out.part.groups:
            group = meta.row_group(g)
            if group.num_rows == 0:  # holds nothing (plan.split leaves such groups out; a part planned before may not)
                continue
            size = max(1, min(WINDOW_ROWS, READ_BYTES * max(1, group.num_rows) // max(1, group.total_byte_size)))
            for batch in parquet.iter_batches(batch_size=size, row_groups=[g], use_threads=False):
                lo, hi = max(out.part.start - row, 0), min(out.part.stop - row, batch.num_rows)
                if hi > lo:
                    yield "rows", (out, batch.slice(lo, hi - lo))
                row += batch.num_rows
                if row >= out.part.stop:
                    return

    def _read_item(self, item: Item, fetched: tuple[bytes, str] | Exception | None) -> Iterator[tuple[str, Any]]:
        """Events for one item; ``fetched``: a pack file's bytes and the version read (or why not). A failure
        gives one error per part not yet read (or one for the item when its parts are not known yet)."""
        handle, outs, ended = None, [], 0
        try:
            if isinstance(fetched, Exception):
                raise fetched
            if fetched is None:
                handle = storage.open_versioned(self._loc(item), item.fingerprint)
                parquet, fingerprint = pq.ParquetFile(handle), item.fingerprint
            else:
                parquet, fingerprint = pq.ParquetFile(pa.BufferReader(fetched[0])), fetched[1]
            opened = self._open(item, parquet, fingerprint)
            if isinstance(opened, str):
                yield "error", _failed(item, opened, fingerprint=fingerprint)
                return
            outs = opened
            for out in outs:
                yield from self._rows(parquet, out)
                if handle is not None and not storage.still_version(handle, fingerprint):
                    raise storage.VersionChanged(f"{item.path}: rewritten while it was read")
                yield "end", out
                ended += 1
        except Exception as exc:  # this file fails, not the run; unless it was replaced during the read
            changed = storage.replaced(exc) or (handle is not None and not storage.still_version(handle, item.fingerprint))
            reason = str(exc) if isinstance(exc, storage.VersionChanged) else read_problem(exc)
            for out in outs[ended:] or [None]:
                yield "error", out.result(error=reason[:2000], changed=changed) if out else _failed(item, reason, changed)
        finally:
            if handle is not None:
                handle.close()

    def _events(self, items: list[Item]) -> Iterator[tuple[str, Any]]:
        whole = [i for i in items if i.part is None]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            fetched = pool.map(self._fetch, whole)  # runs ahead: every small file of the pack in flight
            for item in items:
                for kind, value in self._read_item(item, next(fetched) if item.part is None else None):
                    if kind == "rows":
                        out, batch = value
                        self._beat(f"reading {_rows_of(item, out.part.start, out.part.stop)}")
                    yield kind, value

    def _fetch(self, item: Item) -> tuple[bytes, str] | Exception:
        try:
            return storage.read_versioned(self._loc(item))
        except Exception as exc:  # reported by _read_item for this file alone
            return exc

    # The pipeline.

    def _windows(self, items: list[Item]) -> Iterator[list[tuple[str, Any]]]:
        limit = WINDOW_TEXT_BYTES if self.long.chunked else None
        return windows_of(self._events(items), self.spec.text_column, WINDOW_ROWS, limit)

    def _prepare(self, window: list[tuple[str, Any]]) -> tuple[list, list[predict.Prepared]]:
        """A window's rows tokenized (runs beside the model), each piece alone: files of one pack may type their
        text column differently, and a piece that fails fails its output alone. The window comes back without
        the rows of outputs that failed; the pieces follow its rows."""
        kept, pieces = [], []
        for kind, value in window:
            if kind == "rows":
                out, batch = value
                if out.error:
                    continue
                try:
                    column = batch.column(self.spec.text_column)
                    self._crash_hook(column)
                    pieces.append(predict.prepare(self.spec.model, column, self.spec.max_length, self.long))
                except Exception as exc:
                    logger.exception("preparing rows of %s failed", out.name)
                    self._fail(out, f"could not prepare its rows: {type(exc).__name__}: {exc}")
                    continue
            kept.append((kind, value))
        return kept, pieces

    def _crash_hook(self, column: pa.Array) -> None:
        marker = self.spec.hooks.get("crash_on_text")
        if marker and predict.is_text_type(column.type) and pc.any(
                pc.match_substring(column.cast(pa.large_binary()), marker)).as_py():
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: an actor that dies on this part every time

    @staticmethod
    def _fail(out: _Out, error: str) -> None:
        """One output's rows could not be prepared or labelled: it fails (unwritten), and with it its file."""
        out.error = out.error or error[:2000]

    def _label(self, items: list[Item]) -> list[ItemResult]:
        results: list[ItemResult] = []
        writes: list[Future] = []
        before = dataclasses.replace(self.predictor.stats)
        timings = self.timings

        def step():  # read a window, then tokenize it: runs ahead, beside the model
            start = time.perf_counter()
            window = next(windows, None)
            read = time.perf_counter()
            timings["read_seconds"] += read - start
            if window is None:
                return None
            prepared = self._prepare(window)
            timings["tokenize_seconds"] += time.perf_counter() - read
            return prepared

        with ThreadPoolExecutor(1) as ahead, ThreadPoolExecutor(WRITE_THREADS) as writer:
            windows = self._windows(items)
            pending = ahead.submit(step)
            while True:
                start = time.perf_counter()
                prepared = pending.result()
                timings["input_wait_seconds"] += time.perf_counter() - start  # the model idle, waiting for input
                if prepared is None:
                    break
                pending = ahead.submit(step)  # read and tokenize the next window while this one runs
                self._apply(*prepared, results, writes, writer)
                self._beat()
            self._beat(f"writing the outputs of {_rows_of(items[-1]) if len(items) == 1 else f'{len(items)} files'}",
                       force=True)
            results += [w.result() for w in writes]
        if results:
            now = self.predictor.stats
            keys = ("rows", "windows", "chunked_rows", "chunks_dropped", "batches", "real_tokens", "padded_tokens",
                    "model_seconds", "rechecked", "oom_splits")
            results[0].stats = {k: getattr(now, k) - getattr(before, k) for k in keys} | dict(timings)
            self.timings = Counter()
        return results

    def _apply(self, window, pieces: list[predict.Prepared], results: list[ItemResult], writes: list[Future],
               writer) -> None:
        labelled = iter(self._labelled(pieces) if pieces else [])
        for kind, value in window:
            if kind == "error":
                results.append(value)
            elif kind == "end":
                self._output_done(value, results, writes, writer)
            else:
                out, batch = value
                labels, offset = next(labelled)
                if isinstance(labels, str):
                    self._fail(out, f"could not label its rows: {labels}")
                elif out.error is None:
                    self._add(out, batch, labels, offset)

    def _labels(self, prepared: predict.Prepared) -> _Labels:
        scored = self.predictor.score(prepared)
        unsure = scored.abstentions(self.min_scores)
        columns = self.predictor.columns(prepared, scored, self.spec.label_prefix, unsure)
        reasons = columns[self.spec.label_prefix + "skip_reason"].to_pylist()  # low_confidence too
        return _Labels(prepared, scored, unsure, columns, reasons)

    def _labelled(self, pieces: list[predict.Prepared]) -> list[tuple[_Labels | str, int]]:
        """Per piece: the labels of its rows and its first row in them, or why it could not be labelled. The
        window's pieces are labelled together (they share model batches); if that fails, each alone, so that
        only the output whose rows fail fails."""
        if len(pieces) > 1:
            try:
                together = self._labels(predict.Prepared.concat(pieces, self.long.chunked))
                return [(together, int(s)) for s in np.cumsum([0] + [len(p) for p in pieces[:-1]])]
            except Exception:
                logger.exception("labelling a window of %d pieces failed; labelling each alone", len(pieces))
        return [self._alone(p) for p in pieces]

    def _alone(self, piece: predict.Prepared) -> tuple[_Labels | str, int]:
        try:
            return self._labels(piece), 0
        except Exception as exc:
            logger.exception("labelling %d rows failed", len(piece))
            return f"{type(exc).__name__}: {exc}", 0

    def _add(self, out: _Out, batch: pa.RecordBatch, labels: _Labels, offset: int) -> None:
        """An output's batch of rows with their labels (from row ``offset`` of ``labels``), and its counts."""
        n = batch.num_rows
        table = pa.Table.from_batches([batch])
        for name, column in labels.columns.items():
            table = table.append_column(name, column.slice(offset, n))
        read = [r is None for r in labels.prepared.reasons[offset:offset + n]]
        out.tables.append(table)
        out.rows_in += n
        out.skipped.update(r for r in labels.reasons[offset:offset + n] if r is not None)
        out.truncated += int(np.asarray(labels.prepared.truncated[offset:offset + n])[read].sum())
        if n:
            out.label_stats = drift.add(out.label_stats, self._stats(labels.scored, labels.unsure, offset, n))

    def _output_done(self, out: _Out, results: list[ItemResult], writes: list[Future], writer) -> None:
        """All of an output's rows are in: written, or failed unwritten."""
        if out.error:
            out.tables = []
            results.append(out.result(error=out.error))
            return
        self.writing.add(out.item.key)
        writes.append(writer.submit(self._write, out))

    def _stats(self, scored: predict.Scored, unsure: list[np.ndarray], offset: int, n: int) -> list[dict]:
        """Per task, drift's figures of rows offset..offset+n of a window (its scored rows)."""
        rows = slice(offset, offset + n)
        present = scored.present[rows]
        return [drift.task_stats(scored.ids[k][rows][present], scored.scores[k][rows][present], len(task.labels),
                                 unsure[k][rows]) for k, task in enumerate(self.predictor.tasks)]

    def _write(self, out: _Out) -> ItemResult:
        start = time.perf_counter()
        try:
            table = pa.concat_tables(out.tables)
            if table.num_rows != out.part.stop - out.part.start:
                raise RuntimeError(f"read {table.num_rows} rows where the footer says {out.part.stop - out.part.start}")
            meta = {"input": out.item.input, "input_version": out.fingerprint, "part": f"{out.part.index}/{out.part.count}",
                    "rows": f"{out.part.start}-{out.part.stop}", "model": self.spec.model_id, "run": self.spec.run,
                    "rows_in": str(out.rows_in), "rows_skipped": json.dumps(dict(out.skipped)),
                    "rows_truncated": str(out.truncated), "long_texts": json.dumps(dataclasses.asdict(self.long)),
                    "label_stats": json.dumps(out.label_stats)}
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{OUTPUT_META + k: v for k, v in meta.items()}})
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            storage.write_bytes(self.out.join(*out.name.split("/")), sink.getvalue())
            out.tables = []
            self.timings["write_seconds"] += time.perf_counter() - start
            return out.result(rows_out=table.num_rows)
        except Exception as exc:  # this output (so its file) fails; the run goes on
            return out.result(error=f"{type(exc).__name__}: {exc}"[:2000])
