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
whose record a kill lost.

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


class Tracker:
    """Ray actor on the driver's side: how often each unit (or item) was started, and finished items'
    results, so a retried unit skips what is done and gives up on what keeps killing its actor."""

    def __init__(self) -> None:
        self.starts: Counter = Counter()
        self.finished: dict[str, list[str]] = {}

    def start(self, key: str) -> tuple[int, dict[str, list[str]]]:
        self.starts[key] += 1
        prefix = key + "/"
        return self.starts[key], {k: v for k, v in self.finished.items() if k.startswith(prefix)}

    def finish(self, key: str, results: list[str]) -> None:
        self.finished[key] = results


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

    @property
    def name(self) -> str:
        return part_name(self.item.input, self.part.index, self.part.count)

    def result(self, **changes: Any) -> ItemResult:
        return ItemResult(self.item.input, self.part.index, self.part.count, self.name, self.fingerprint, self.rows_in,
                          rows_skipped=dict(self.skipped), rows_truncated=self.truncated, note=self.note,
                          label_stats=self.label_stats,
                          seconds=round(time.perf_counter() - self.start, 3), **changes)


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


class PartLabeller:
    """Ray Data actor (map_batches): a batch of units (JSON) in, one result row per output file out."""

    def __init__(self, spec: dict[str, Any], tracker: Any = None):
        start = time.perf_counter()
        self.spec = LabellerSpec(**spec)
        s = self.spec
        self.predictor = predict.Predictor(s.model, **s.predictor, hooks=s.hooks)
        self.long = predict.LongTexts(**s.long_texts)
        self.min_scores = [None if m is None else np.asarray(m) for m in s.min_scores] if s.min_scores else None
        self.out = storage.resolve(s.output)
        self.src = storage.resolve(s.input)
        self.tracker = tracker
        if "multipart_bytes" in s.hooks:  # test hook: upload even a small output in parts
            storage.MULTIPART_BYTES = int(s.hooks["multipart_bytes"])
        self.timings: Counter = Counter(init_seconds=time.perf_counter() - start)  # this actor's, sent with results

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [r for text in batch["unit"].to_pylist() for r in self.label_unit(Unit.from_json(text))]
        return pa.table({"result": [r.to_json() for r in results], "input": [r.input for r in results]})

    # Attempts: a unit that killed its actor before is retried carefully, then given up.

    def _start(self, key: str) -> tuple[int, dict[str, list[str]]]:
        if self.tracker is None:
            return 1, {}
        import ray

        return ray.get(self.tracker.start.remote(key))

    def label_unit(self, unit: Unit) -> list[ItemResult]:
        """Label one unit; returns a result per output file (or per failed item)."""
        attempt, finished = self._start(str(unit.id))
        if attempt == 1:
            return self._guarded(unit.items)
        if len(unit.items) == 1:
            return self._give_up(unit.items[0], attempt - 1) if attempt > self.spec.max_attempts else self._guarded(unit.items)
        results = []  # a pack that killed its actor: one file at a time, so only the culprit fails
        for item in unit.items:
            key = f"{unit.id}/{item.key}"
            if key in finished:
                results += [ItemResult.from_json(r) for r in finished[key]]
                continue
            tries, _ = self._start(key)
            done = self._give_up(item, tries) if 1 + tries > self.spec.max_attempts else self._guarded([item])
            if self.tracker is not None:
                import ray

                ray.get(self.tracker.finish.remote(key, [r.to_json() for r in done]))
            results += done
        return results

    def _give_up(self, item: Item, deaths: int) -> list[ItemResult]:
        where = f"rows {item.part.start}-{item.part.stop} of this file" if item.part else "this file"
        return [_failed(item, f"the predictor process died {deaths} times while labelling {where}: out of memory, or a "
                              "crash in the tokenizer or model? (see the Ray logs); raise --part-bytes headroom or "
                              "fix the file, then rerun")]

    def _guarded(self, items: list[Item]) -> list[ItemResult]:
        """Label items; an unexpected error fails them (their outputs may be half written: not trusted)."""
        try:
            return self._label(items)
        except Exception as exc:
            logger.exception("labelling %d file(s) failed", len(items))
            return [dataclasses.replace(_failed(i, f"{type(exc).__name__}: {exc}"), maybe_written=True) for i in items]

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
        meta = parquet.metadata
        row = sum(meta.row_group(g).num_rows for g in range(out.part.groups[0]))
        for g in out.part.groups:
            group = meta.row_group(g)
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
            changed = isinstance(exc, storage.VersionChanged) or "pre-conditions" in str(exc) \
                or "PreconditionFailed" in repr(exc.__cause__)
            changed = changed or (handle is not None and not storage.still_version(handle, item.fingerprint))
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
                yield from self._read_item(item, next(fetched) if item.part is None else None)

    def _fetch(self, item: Item) -> tuple[bytes, str] | Exception:
        try:
            return storage.read_versioned(self._loc(item))
        except Exception as exc:  # reported by _read_item for this file alone
            return exc

    # The pipeline.

    def _windows(self, items: list[Item]) -> Iterator[list[tuple[str, Any]]]:
        limit = WINDOW_TEXT_BYTES if self.long.chunked else None
        return windows_of(self._events(items), self.spec.text_column, WINDOW_ROWS, limit)

    def _prepare(self, window: list[tuple[str, Any]]) -> tuple[list, predict.Prepared]:
        """A window's rows tokenized (runs beside the model; files of one pack may type their text column
        differently, so each piece is prepared alone)."""
        pieces = [predict.prepare(self.spec.model, v[1].column(self.spec.text_column), self.spec.max_length, self.long)
                  for k, v in window if k == "rows"]
        marker = self.spec.hooks.get("crash_on_text")
        if marker and any(marker in str(x) for k, v in window if k == "rows" for x in v[1].column(self.spec.text_column).to_pylist()):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: an actor that dies on this part every time
        return window, predict.Prepared.concat(pieces, self.long.chunked)

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
            results += [w.result() for w in writes]
        if results:
            now = self.predictor.stats
            keys = ("rows", "windows", "chunked_rows", "chunks_dropped", "batches", "real_tokens", "padded_tokens",
                    "model_seconds", "rechecked", "oom_splits")
            results[0].stats = {k: getattr(now, k) - getattr(before, k) for k in keys} | dict(timings)
            self.timings = Counter()
        return results

    def _apply(self, window, prepared: predict.Prepared, results: list[ItemResult], writes: list[Future], writer) -> None:
        scored = self.predictor.score(prepared) if len(prepared) else None
        unsure = scored.abstentions(self.min_scores) if scored else []
        columns = self.predictor.columns(prepared, scored, self.spec.label_prefix, unsure) if scored else {}
        reasons = columns[self.spec.label_prefix + "skip_reason"].to_pylist() if scored else []  # low_confidence too
        offset = 0
        for kind, value in window:
            if kind == "error":
                results.append(value)
            elif kind == "end":
                writes.append(writer.submit(self._write, value))
            else:
                out, batch = value
                n = batch.num_rows
                table = pa.Table.from_batches([batch])
                for name, column in columns.items():
                    table = table.append_column(name, column.slice(offset, n))
                read = [r is None for r in prepared.reasons[offset:offset + n]]
                out.tables.append(table)
                out.rows_in += n
                out.skipped.update(r for r in reasons[offset:offset + n] if r is not None)
                out.truncated += int(np.asarray(prepared.truncated[offset:offset + n])[read].sum())
                if scored is not None and n:
                    out.label_stats = drift.add(out.label_stats, self._stats(scored, unsure, offset, n))
                offset += n

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
