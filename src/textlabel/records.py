"""The typed records of the labelling job: what one input file's labelling came to, and one output's.

``FileRecord`` is what the manifest keeps per input file (manifest.py stores them as
Parquet rows with ``RECORD_SCHEMA``); ``ItemResult`` is what a predictor actor reports for
one output file (one part of an input file). ``file_record`` folds a file's item results
into its record. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


class Status(str, Enum):
    """Where an input file stands. Only DONE and STALE records vouch for output files."""

    DONE = "done"  # labelled: its outputs hold every row of this version
    FAILED = "failed"  # could not be labelled (reason in error); no outputs
    LABELLING = "labelling"  # being replaced: its old outputs are no longer vouched for
    STALE = "stale"  # a newer version failed (error); the outputs of the version recorded are kept
    PRUNED = "pruned"  # the input is gone and its outputs were deleted (--prune-gone); dropped at compaction
    # This version ended its predictor process --max-attempts times (a crash, out of memory, --part-timeout): not
    # labelled again at this version unless --retry-failed. Its outputs, if any, are an older version's labels, kept.
    QUARANTINED = "quarantined"


VOUCHING = (Status.DONE.value, Status.STALE.value, Status.QUARANTINED.value)
OUTPUT_META = "textlabel."  # prefix of the keys an output file's Parquet metadata records its labelling under


# Output names. An input's output has the input's name, or NAME.part-00001.parquet for each part of an input cut
# into parts. An input whose name already ends like a part's, or like such a name escaped (".part-" and digits,
# then any "~"), gets one more "~" before ".parquet" first: a.part-00000.parquet -> a.part-00000~.parquet. So no
# two inputs can give one output name, whatever the inputs and whichever came first: an unescaped stem never ends
# like a part, an escaped one always ends in "~", and dropping that "~" gives the input back (``owner``).
_SUFFIX = ".parquet"
ESCAPED = r"\.part-[0-9]+~*"  # an input whose stem ends like this (a part's, or one escaped) is escaped
_PARTLIKE = re.compile(ESCAPED + r"\Z")  # \Z, not $: a key may end in a newline
_PART = re.compile(r"(.*)\.part-([0-9]{5,})", re.DOTALL)


def part_name(rel: str, part: int, parts: int) -> str:
    """The output file of part ``part`` of ``parts`` of input ``rel`` (an input's outputs are named after it,
    escaped when it looks like a part: see above)."""
    stem = rel[: -len(_SUFFIX)]
    stem += "~" if _PARTLIKE.search(stem) else ""
    return stem + _SUFFIX if parts == 1 else f"{stem}.part-{part:05d}{_SUFFIX}"


def _unescaped(stem: str) -> str | None:
    """The input whose outputs' stem ``stem`` is, or None when part_name gives no input that stem."""
    if not _PARTLIKE.search(stem):
        return stem + _SUFFIX
    return stem[:-1] + _SUFFIX if stem.endswith("~") else None


def owner(name: str) -> str | None:
    """The input whose output (or part of one) is named ``name``, or None when no input's can be: part_name's
    inverse."""
    if not name.endswith(_SUFFIX):
        return None
    stem = name[: -len(_SUFFIX)]
    found = _unescaped(stem)
    part = _PART.fullmatch(stem) if found is None else None
    if part and (len(part.group(2)) == 5 or part.group(2)[0] != "0"):  # as {:05d} writes a number
        found = _unescaped(part.group(1))
    return found


def now() -> str:
    """UTC now, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class FileRecord:
    """One input file version's labelling, as the manifest keeps it."""

    input: str  # path relative to --input
    fingerprint: str  # the version recorded (S3 ETag, or size/mtime/inode/ctime)
    size: int
    status: Status
    outputs: list[str] = field(default_factory=list)  # relative to --output, part order
    rows_in: int = 0
    rows_out: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)
    rows_truncated: int = 0
    error: str | None = None
    note: str | None = None  # schema note: labelled, but its columns differ from the run's first file
    model: str = ""
    run: str = ""
    seconds: float = 0.0
    recorded_at: str = field(default_factory=now)

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["status"] = self.status.value
        row["rows_skipped"] = json.dumps(self.rows_skipped, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "FileRecord":
        """From a RECORD_SCHEMA row, or a format-1 JSON record (rows_skipped a dict there)."""
        known = {k: row[k] for k in cls.__dataclass_fields__ if k in row}
        skipped = known.get("rows_skipped") or {}
        known["rows_skipped"] = json.loads(skipped) if isinstance(skipped, str) else dict(skipped)
        known["status"] = Status(known["status"])
        known["outputs"] = list(known.get("outputs") or [])
        return cls(**known)


_DICT = pa.dictionary(pa.int32(), pa.string())  # few distinct values over millions of rows
RECORD_SCHEMA = pa.schema([
    ("input", pa.string()), ("fingerprint", pa.string()), ("size", pa.int64()), ("status", _DICT),
    ("outputs", pa.list_(pa.string())), ("rows_in", pa.int64()), ("rows_out", pa.int64()),
    ("rows_skipped", _DICT), ("rows_truncated", pa.int64()), ("error", _DICT), ("note", _DICT),
    ("model", _DICT), ("run", _DICT), ("seconds", pa.float64()), ("recorded_at", pa.string()),
])


def vouched(state: pa.Table) -> pa.Array:
    """Every output file (relative to --output) that a DONE or STALE record of ``state`` vouches for."""
    keep = state.filter(pc.is_in(state["status"].cast(pa.string()), pa.array(VOUCHING)))
    return pc.list_flatten(keep["outputs"]).combine_chunks() if keep.num_rows else pa.array([], pa.string())


def records_table(records: list[FileRecord]) -> pa.Table:
    """Records as an Arrow table of RECORD_SCHEMA."""
    rows = [r.to_row() for r in records]
    return pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in RECORD_SCHEMA}, schema=RECORD_SCHEMA)


@dataclass
class ItemResult:
    """What an actor did with one item: one output file (a part of an input file), or why not."""

    input: str
    part: int
    parts: int
    output: str
    fingerprint: str  # the version actually read
    rows_in: int = 0
    rows_out: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)
    rows_truncated: int = 0
    error: str | None = None
    changed: bool = False  # the file was replaced while being read: not labelled at any version
    maybe_written: bool = False  # failed after its output may have been written (an unexpected error)
    poison: bool = False  # given up after it ended its actor --max-attempts times: the file is quarantined
    stats: dict[str, float] | None = None  # the model's work for the whole unit (on one result of each unit)
    note: str | None = None
    seconds: float = 0.0
    label_stats: list[dict] | None = None  # per task: drift.task_stats of the output's rows

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ItemResult":
        return cls(**json.loads(text))


@dataclass
class FileOutcome:
    """A file's results folded together: its new record, or None when it changed during the run."""

    record: FileRecord | None
    written: list[str]  # outputs this run wrote for it (removed again if the record does not vouch for them)
    changed: bool = False  # read at another version than listed (labelled at that one, or not at all)


def file_record(listed: dict[str, Any], results: list[ItemResult], model: str, run: str) -> FileOutcome:
    """Fold one input file's item results (all its parts) into its new record.

    ``listed``: the file as listed (input, size, fingerprint). A file is DONE when every
    part was labelled from one and the same version (which may be newer than the listing:
    a file replaced before it was read is labelled at its new version).
    """
    results = sorted(results, key=lambda r: r.part)
    written = [r.output for r in results if (r.error is None and not r.changed) or r.maybe_written]
    versions = {r.fingerprint for r in results}
    changed = any(r.changed for r in results) or len(versions) > 1
    if changed:  # parts of two versions, or a pinned read refused: the next run labels the new one
        return FileOutcome(None, written, changed=True)
    version = versions.pop() if versions else listed["fingerprint"]
    errors = [r.error for r in results if r.error]
    skipped: dict[str, int] = {}
    for r in results:
        for reason, n in r.rows_skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    status = Status.DONE if not errors else Status.QUARANTINED if any(r.poison for r in results) else Status.FAILED
    record = FileRecord(
        input=listed["input"], fingerprint=version, size=listed["size"],
        status=status, error=errors[0] if errors else None,
        outputs=[] if errors else [r.output for r in results], rows_in=sum(r.rows_in for r in results),
        rows_out=0 if errors else sum(r.rows_out for r in results), rows_skipped={} if errors else skipped,
        rows_truncated=0 if errors else sum(r.rows_truncated for r in results),
        note=next((r.note for r in results if r.note), None), model=model, run=run,
        seconds=round(sum(r.seconds for r in results), 3),
    )
    return FileOutcome(record, written, changed=version != listed["fingerprint"])


def keep_old_labels(failed: FileRecord, previous: FileRecord | None, written: list[str]) -> FileRecord:
    """A changed file whose new version failed keeps the labels of the version before, as STALE, unless
    a part of the new version already replaced one of its outputs. A quarantined version keeps them too, under its
    own version (so it is not retried at it)."""
    if previous is None or previous.status.value not in VOUCHING or set(written) & set(previous.outputs):
        return failed
    if failed.status == Status.QUARANTINED:
        return dataclasses.replace(failed, outputs=list(previous.outputs))
    return FileRecord(**{**asdict(previous), "status": Status.STALE, "error": failed.error, "run": failed.run,
                         "recorded_at": failed.recorded_at})


def adopted_record(listed: dict[str, Any], outputs: list[tuple[str, dict[str, str]]], model: str) -> FileRecord | None:
    """The record of a file whose outputs a killed run wrote but never recorded, from those outputs' Parquet
    metadata (``textlabel.*`` keys, prefix removed): only when they are every part of one labelling of the
    file's current version by this model, under the names that labelling gives them; else None."""
    facts = sorted((tuple(map(int, m["part"].split("/"))), name, m) for name, m in outputs)
    count = facts[0][0][1] if facts else 0
    if [f[0] for f in facts] != [(k, count) for k in range(count)]:
        return None
    for (k, n), name, m in facts:
        if m["input_version"] != listed["fingerprint"] or m["model"] != model or name != part_name(listed["input"], k, n):
            return None
    skipped: dict[str, int] = {}
    for _, _, m in facts:
        for reason, n in json.loads(m["rows_skipped"]).items():
            skipped[reason] = skipped.get(reason, 0) + n
    rows = sum(int(m["rows_in"]) for _, _, m in facts)
    return FileRecord(listed["input"], listed["fingerprint"], listed["size"], Status.DONE, [name for _, name, _ in facts],
                      rows, rows, skipped, sum(int(m["rows_truncated"]) for _, _, m in facts), model=model,
                      run=facts[0][2]["run"])
