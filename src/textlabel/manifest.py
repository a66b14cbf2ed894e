"""The labelling manifest: which input file versions are labelled into which output files.

It lives under ``OUTPUT/_manifest/`` as Parquet (records.RECORD_SCHEMA, one row per input
file) and is the source of truth for incremental runs. Its cost follows the night, not the
history:

- ``snapshot-E-RUN.parquet``: every record as of the end of run epoch E (a compact, columnar,
  dictionary-encoded table: about 60 bytes a record on disk, benchmarks/nightly_scale.py);
- ``segment-E-SEQ-RUN.parquet``: the records one commit of run epoch E wrote (commit.py
  batches them); at the end of a run its segments are merged into ``segment-E-merged-RUN.parquet``.

RUN is the run's id: two runs that start from one epoch (one of them fenced out by the
lease but not yet aware of it) never write the same name. Names written before runs were
named in them have no ``-RUN`` and are read as ever.

Each run takes the epoch after the highest it finds. Loading reads the newest snapshot and
applies every segment of a later epoch in name order (a later record of an input wins); a
snapshot of epoch E supersedes every segment of epoch E, which it either read or must not
trust (a fenced-out run's). Every night reads exactly that: the newest snapshot and the
segments after it.
When the segments hold more than a quarter of the snapshot's records (or there are more
than MAX_SEGMENTS of them), the run's end compacts them into a new snapshot and deletes
what it replaces: a night that labels N files writes O(N) bytes, amortised; a night with
nothing new writes nothing. Every write is one atomic PUT (or rename), and a kill between
any two of them leaves a state that loads to the same records.

Manifests of format 1 (``_manifest.json`` plus ``_manifest/<hash>.json``) are read and
migrated to a snapshot by the first run that holds the lease.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textlabel import storage
from textlabel.records import RECORD_SCHEMA, FileRecord, Status, records_table
from textlabel.redact import redact

logger = logging.getLogger(__name__)

FORMAT = 2
FOLDER = "_manifest"
LEGACY = "_manifest.json"  # format 1
MAX_SEGMENTS = 64
# The run's id closes a name (older manifests' names have none): two runs that start from one epoch never
# write the same name, even when one of them no longer holds the lease and does not know it yet.
_NAME = re.compile(r"^(snapshot|segment)-(\d{10})(?:-(\d{6}|merged))?(?:-([0-9A-Za-z]+-[0-9a-f]+))?\.parquet$")


def _to_parquet(table: pa.Table, meta: dict[str, str]) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), sink, compression="zstd")
    return sink.getvalue()


def _read_table(loc: storage.Location) -> pa.Table:
    table = pq.read_table(pa.BufferReader(storage.read_bytes(loc)))
    return table.cast(RECORD_SCHEMA.with_metadata(table.schema.metadata))


def _latest(table: pa.Table) -> pa.Table:
    """One row per input: the last one in table order."""
    order = pa.array(range(table.num_rows), pa.int64())
    last = table.append_column("_i", order).group_by("input", use_threads=False).aggregate([("_i", "max")])
    return table.take(last["_i_max"])


def _apply(base: pa.Table, newer: pa.Table) -> pa.Table:
    """``base`` with the (deduplicated) ``newer`` records replacing those of the same inputs."""
    if newer.num_rows == 0:
        return base
    kept = base.filter(pc.invert(pc.is_in(base["input"], newer["input"])))
    return pa.concat_tables([kept, newer])


def _input_of(table: pa.Table) -> str | None:
    return (table.schema.metadata or {}).get(b"textlabel.input", b"").decode() or None


@dataclass
class Manifest:
    """Records by input path (relative to --input), as loaded from an output prefix."""

    out: storage.Location
    state: pa.Table = field(default_factory=lambda: RECORD_SCHEMA.empty_table())  # one row per input
    input: str | None = None  # the --input these records are about
    epoch: int = 1  # this run's epoch
    snapshot_epoch: int | None = None
    snapshot_rows: int = 0
    files: list[str] = field(default_factory=list)  # snapshots and segments the state was read from
    segment_rows: int = 0  # records in segments after the snapshot
    legacy: list[str] = field(default_factory=list)  # format-1 files, deleted once migrated
    updates: dict[str, FileRecord] = field(default_factory=dict)  # committed by this run
    run: str = ""  # this run's id, in the name of every file it writes
    written: list[str] = field(default_factory=list)  # this run's segments

    @property
    def found(self) -> bool:
        """True when the prefix holds a manifest (this run's first commit claims an empty one)."""
        return bool(self.files or self.legacy)

    @classmethod
    def load(cls, out: storage.Location) -> "Manifest":
        """The records under ``out`` (none: an empty manifest): newest snapshot plus later segments."""
        folder = out.join(FOLDER)
        names = [f.path[len(folder.path) + 1:] for f in storage.list_files(folder, "")]  # one LIST; none: no manifest
        parsed = sorted((m.group(1), int(m.group(2)), n) for n in names if (m := _NAME.match(n)))
        snapshots = [(e, n) for kind, e, n in parsed if kind == "snapshot"]
        manifest = cls(out)
        base = max(snapshots) if snapshots else None
        segments = sorted(n for kind, e, n in parsed if kind == "segment" and (base is None or e > base[0]))
        manifest.epoch = 1 + max([e for _, e, _ in parsed], default=0)
        manifest.files = [n for _, _, n in parsed]
        if base:
            manifest.snapshot_epoch = base[0]
            manifest.state = _read_table(folder.join(base[1]))
            manifest.snapshot_rows = manifest.state.num_rows
            manifest.input = _input_of(manifest.state)
        elif storage.exists(out.join(LEGACY)) or any(n.endswith(".json") for n in names):
            manifest.state = manifest._load_legacy([n for n in names if n.endswith(".json")])
        with ThreadPoolExecutor(16) as pool:
            loaded = list(pool.map(lambda n: _read_table(folder.join(n)), segments))
        if loaded:
            manifest.segment_rows = sum(t.num_rows for t in loaded)
            manifest.input = _input_of(loaded[-1]) or manifest.input
            newer = _latest(pa.concat_tables([t.replace_schema_metadata(None) for t in loaded]))
            manifest.state = _apply(manifest.state.replace_schema_metadata(None), newer)
        manifest.state = manifest.state.replace_schema_metadata(None)
        pruned = pc.equal(manifest.state["status"].cast(pa.string()), Status.PRUNED.value)
        if pc.any(pruned).as_py():
            manifest.state = manifest.state.filter(pc.invert(pruned))
        return manifest

    def _load_legacy(self, loose: list[str]) -> pa.Table:
        """Format 1: ``_manifest.json`` with every record, then per-file JSON records newer than it."""
        records: dict[str, FileRecord] = {}
        folded = self.out.join(LEGACY)
        if storage.exists(folded):
            doc = storage.read_json(folded)
            if doc.get("format") != 1:
                raise storage.StorageError(f"{redact(folded.url)}: manifest format {doc.get('format')!r}; this textlabel reads 1 and {FORMAT}")
            self.input = doc.get("input")
            records = {k: FileRecord.from_row(v) for k, v in doc["files"].items()}
            self.legacy.append(folded.path)
        paths = [self.out.join(FOLDER, n) for n in loose]
        with ThreadPoolExecutor(16) as pool:
            docs = list(pool.map(lambda loc: json.loads(storage.read_bytes(loc)), paths))
        for doc in sorted(docs, key=lambda d: d["recorded_at"]):
            records[doc["input"]] = FileRecord.from_row(doc)
        self.legacy += [loc.path for loc in paths]
        logger.info("read a format-1 manifest (%d records); it is migrated to format %d", len(records), FORMAT)
        return records_table(list(records.values()))

    # What the planner and the summary ask of the records.

    def records(self, inputs: list[str]) -> dict[str, FileRecord]:
        """The current records of some inputs (this run's commits included)."""
        found = {k: self.updates[k] for k in inputs if k in self.updates}
        rest = [k for k in inputs if k not in found]
        if rest:
            rows = self.state.filter(pc.is_in(self.state["input"], pa.array(rest, pa.string())))
            found |= {r["input"]: FileRecord.from_row(r) for r in rows.to_pylist()}
        return found

    def current(self) -> pa.Table:
        """The state with this run's commits applied (PRUNED records dropped)."""
        if not self.updates:
            return self.state
        state = _apply(self.state, records_table(list(self.updates.values())))
        if any(r.status == Status.PRUNED for r in self.updates.values()):
            state = state.filter(pc.not_equal(state["status"].cast(pa.string()), Status.PRUNED.value))
        return state

    # Writes: a segment per commit, a claim, and compaction.

    def _meta(self) -> dict[str, str]:
        return {"textlabel.manifest_format": str(FORMAT), "textlabel.input": self.input or ""}

    def _name(self, kind: str, epoch: int, seq: str | None = None) -> str:
        return f"{kind}-{epoch:010d}" + (f"-{seq}" if seq else "") + (f"-{self.run}" if self.run else "") + ".parquet"

    def write_segment(self, records: list[FileRecord], seq: int) -> None:
        """One atomic write of some records (commit.py calls this from its thread)."""
        name = self._name("segment", self.epoch, f"{seq:06d}")
        storage.write_bytes(self.out.join(FOLDER, name), _to_parquet(records_table(records), self._meta()))
        self.files.append(name)
        self.written.append(name)
        for r in records:
            self.updates[r.input] = r

    def claim(self, input_url: str) -> None:
        """Mark the prefix as this corpus's labels before any output is written (an empty snapshot), or
        migrate a format-1 manifest to a snapshot and delete its files."""
        if self.files and not self.legacy:
            return
        self.input = self.input or input_url
        name = self._name("snapshot", self.epoch - 1)
        storage.write_bytes(self.out.join(FOLDER, name), _to_parquet(self.state, self._meta()))
        self.files.append(name)
        self.snapshot_epoch, self.snapshot_rows = self.epoch - 1, self.state.num_rows
        storage.delete_many(self.out.fs, self.legacy)
        self.legacy = []

    def finish(self, compact: bool = False) -> str | None:
        """End of a run: compact into a new snapshot when the segments have grown (or ``compact``), else merge
        this run's segments into one. Returns what was done ("compacted", "merged") or None."""
        mine = list(self.written)
        grown = self.segment_rows + len(self.updates) > self.snapshot_rows // 4
        if mine and (compact or grown or len([n for n in self.files if n.startswith("segment-")]) > MAX_SEGMENTS):
            name = self._name("snapshot", self.epoch)
            storage.write_bytes(self.out.join(FOLDER, name), _to_parquet(self.current(), self._meta()))
            storage.delete_many(self.out.fs, [self.out.join(FOLDER, n).path for n in self.files if n != name])
            self.files, self.written = [name], []
            return "compacted"
        if len(mine) > 1:
            merged = records_table(list(self.updates.values()))
            name = self._name("segment", self.epoch, "merged")
            storage.write_bytes(self.out.join(FOLDER, name), _to_parquet(merged, self._meta()))
            storage.delete_many(self.out.fs, [self.out.join(FOLDER, n).path for n in mine])
            self.files = [n for n in self.files if n not in mine] + [name]
            self.written = [name]
            return "merged"
        return None
