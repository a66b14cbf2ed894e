"""Planning a labelling run: pure functions from a listing, the manifest's records and some
Parquet footers to the units of work. No I/O here (label.py does it), so every rule is
unit-tested in milliseconds, at any scale.

1. ``select``: which listed files to (re)label: new, changed (another version than
   recorded), failed or being replaced before; with --relabel, all. Vectorised over Arrow
   columns, so a million recorded files plan in about a second.
2. ``split``: a big file is cut into parts of at most --rows-per-file rows and
   --part-bytes uncompressed bytes, at row-group boundaries, and inside a row group that
   is too big alone. Each part is one output file, named by ``records.part_name``.
3. ``make_units``: the actors' work, at least UNITS_PER_ACTOR units per actor when the rows
   allow, so that every actor is busy from the first second to the last. Each part of a big
   file is a unit; small files (up to PACK_FILE_BYTES, read whole in one request) are packed
   together, so a corpus of many small files pays per pack, not per file, for tasks, model
   batches and scheduling. A night of fewer files than that (``cuts_files``: a handful of
   daily exports on many actors) cuts every file bigger than an even share of the night's
   rows (no fewer than MIN_PART_ROWS), from its footer, into row ranges of that share: two
   files on two actors make eight units, not two units on whichever actor was ready first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from textlabel.predict import is_text_type
from textlabel.records import ESCAPED, FileRecord, Status, owner, part_name, vouched

PACK_FILE_BYTES = 16 << 20  # a file up to this size is read whole and packed with others
PACK_BYTES = 64 << 20  # most bytes of files in one pack
PACK_FILES = 1000  # most files in one pack
UNITS_PER_ACTOR = 4  # units are made small enough to give every actor a few
MIN_PART_ROWS = 1024  # a file is cut no finer than this to spread a small night over many actors
_ESCAPED_INPUT = ESCAPED + r"\.parquet$"  # an input records.part_name escapes (RE2: $ ends the text)


@dataclass(frozen=True)
class Listed:
    """A listed input file version."""

    input: str  # path relative to --input
    path: str  # path on its filesystem
    size: int
    fingerprint: str


@dataclass
class Selection:
    """What a run has to do, before any file is read."""

    pending: list[Listed]  # to (re)label, in listing order
    unchanged: int
    gone: list[str]  # recorded inputs that are no longer listed
    lost: list[str] = field(default_factory=list)  # recorded as labelled, but an output is missing (only when outputs were listed)
    orphans: list[str] = field(default_factory=list)  # output files no record vouches for (only when outputs were listed)
    quarantined: list[str] = field(default_factory=list)  # not retried at this version: they ended their actor


def relative(listing: pa.Table, root: str) -> pa.Table:
    """The listing with ``input`` (each path relative to the --input root) in place of ``path``: a
    million paths cost ~100 MB, and only the pending files' are needed again (``select`` rebuilds them)."""
    rel = pc.utf8_slice_codeunits(listing["path"], len(root.rstrip("/")) + 1)
    return listing.drop_columns(["path"]).append_column("input", rel)


def _missing_outputs(state: pa.Table, present: pa.Array) -> pa.Array:
    """Indices of DONE records with an output that is not present."""
    outputs = state["outputs"].combine_chunks()
    flat = pc.list_flatten(outputs)
    parents = pc.list_parent_indices(outputs)
    missing = pc.unique(parents.filter(pc.invert(pc.is_in(flat, value_set=present))))
    done = pc.equal(state["status"].cast(pa.string()).take(missing), Status.DONE.value)
    return missing.filter(done)


def _same_version(listed: pa.ChunkedArray, recorded: pa.Array) -> pa.Array:
    """Listed and recorded fingerprints agree; a record written before local fingerprints had inode and
    ctime agrees when size and mtime do."""
    same = pc.fill_null(pc.equal(listed, recorded), False)
    older = pc.and_(pc.invert(same), pc.fill_null(pc.starts_with(recorded, "size:"), False))
    if pc.any(older).as_py():  # rare (one night after an upgrade): the regex runs on those rows only
        rows = pc.indices_nonzero(older)
        legacy = pc.replace_substring_regex(listed.take(rows), pattern=":ino:.*$", replacement="")
        matched = np.zeros(len(recorded), dtype=bool)
        matched[rows.to_numpy()[pc.fill_null(pc.equal(legacy, recorded.take(rows)), False).to_numpy(zero_copy_only=False)]] = True
        same = pc.or_(same, pa.array(matched))
    return same


def select(listing: pa.Table, state: pa.Table, relabel: bool = False, present: pa.Array | None = None,
           root: str = "", retry_failed: bool = False) -> Selection:
    """The files to label: every listed file not recorded DONE (nor QUARANTINED, unless ``retry_failed``) at its
    listed version (with --relabel, all).

    ``listing``: columns input, size, fingerprint (relative()); ``root``: the --input path the inputs are
    relative to. ``state``: the manifest's records.
    ``present``: the output files found (relative to --output), when the outputs were listed;
    then DONE files missing an output are labelled again, and unvouched outputs are reported.
    """
    at = pc.index_in(listing["input"], value_set=state["input"])  # each listed file's record, in listing order
    recorded = state["fingerprint"].take(at).combine_chunks() if state.num_rows else pa.nulls(listing.num_rows, pa.string())
    status = state["status"].take(at).cast(pa.string()) if state.num_rows else pa.nulls(listing.num_rows, pa.string())
    unchanged = pc.and_(_same_version(listing["fingerprint"], recorded), pc.fill_null(pc.equal(status, Status.DONE.value), False))
    if relabel:
        unchanged = pc.and_(unchanged, False)
    poison = pc.and_(_same_version(listing["fingerprint"], recorded),
                     pc.fill_null(pc.equal(status, Status.QUARANTINED.value), False))
    if retry_failed or relabel:
        poison = pc.and_(poison, False)
    quarantined = listing.filter(poison)["input"].to_pylist()
    lost: list[str] = []
    if present is not None:
        lost_rows = pc.and_(unchanged, pc.fill_null(pc.is_in(at, value_set=_missing_outputs(state, present)), False))
        lost = listing.filter(lost_rows)["input"].to_pylist()
        unchanged = pc.and_(unchanged, pc.invert(lost_rows))
    todo = listing.filter(pc.invert(pc.or_(unchanged, poison))).select(["input", "size", "fingerprint"])
    listed = np.zeros(state.num_rows, dtype=bool)
    listed[pc.drop_null(at).to_numpy()] = True
    gone = state.filter(pa.array(~listed))["input"].to_pylist()
    orphans: list[str] = []
    if present is not None:
        orphans = present.filter(pc.invert(pc.is_in(present, value_set=vouched(state)))).to_pylist()
    pending = [Listed(row["input"], f"{root.rstrip('/')}/{row['input']}" if root else row["input"], row["size"],
                      row["fingerprint"]) for row in todo.to_pylist()]
    return Selection(pending, pc.sum(unchanged).as_py() or 0, gone, lost, orphans, quarantined)


@dataclass(frozen=True)
class Misnamed:
    """A record whose outputs are not under the names records.part_name gives them: an older textlabel named an
    input's only output after the input, so a.part-00000.parquet's took the name of a.parquet's first part."""

    record: FileRecord
    names: tuple[str, ...]  # its outputs' names now, in part order


def misnamed(state: pa.Table) -> list[Misnamed]:
    """The records with an output under a name that is another input's (records.owner). Only an input named
    like a part can have one, so the others are passed over in Arrow."""
    if not state.num_rows:
        return []
    found = []
    for row in state.filter(pc.match_substring_regex(state["input"], _ESCAPED_INPUT)).to_pylist():
        record = FileRecord.from_row(row)
        if any(owner(o) not in (None, record.input) for o in record.outputs):
            n = len(record.outputs)
            found.append(Misnamed(record, tuple(part_name(record.input, k, n) for k in range(n))))
    return found


def holders(state: pa.Table, names: list[str]) -> dict[str, list[FileRecord]]:
    """The records (of any status) that list each of ``names`` among their outputs."""
    if not names or not state.num_rows:
        return {}
    outputs = state["outputs"].combine_chunks()
    hit = pc.is_in(pc.list_flatten(outputs), value_set=pa.array(names, pa.string()))
    found: dict[str, list[FileRecord]] = {}
    for row in state.take(pc.unique(pc.list_parent_indices(outputs).filter(hit))).to_pylist():
        record = FileRecord.from_row(row)
        for name in set(record.outputs) & set(names):
            found.setdefault(name, []).append(record)
    return found


def collisions(pending: list[Listed], taken: list[str]) -> dict[str, str]:
    """A defence: the pending inputs that own (records.owner) a name another input's record still vouches for,
    under the name an older textlabel gave it, wait until those labels have moved (sweep.move_misnamed)."""
    owners = {owner(name): name for name in taken}
    return {f.input: f"its output name {owners[f.input]} still holds another input's labels under the name an older "
            "textlabel gave them; they move to a name of their own first, and this file is labelled on the next run"
            for f in pending if f.input in owners}


@dataclass(frozen=True)
class Footer:
    """What a Parquet footer says that planning needs."""

    columns: tuple[str, ...]
    groups: tuple[tuple[int, int], ...]  # (rows, uncompressed bytes) per row group
    types: tuple[pa.DataType, ...] = ()  # each column's Arrow type (empty: not known)

    @property
    def rows(self) -> int:
        return sum(r for r, _ in self.groups)

    @classmethod
    def of(cls, meta) -> "Footer":
        """From a pyarrow.parquet.FileMetaData."""
        groups = tuple((meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups))
        schema = meta.schema.to_arrow_schema()
        return cls(tuple(schema.names), groups, tuple(schema.types))


def check_footer(footer: Footer, text_column: str, added: list[str]) -> str | None:
    """Why a file cannot be labelled, from its footer alone, or None. A file of zero rows can: its output is empty."""
    if text_column not in footer.columns:
        return f"no column {text_column!r} (columns: {', '.join(footer.columns)}); pass --text-column"
    kind = footer.types[footer.columns.index(text_column)] if footer.types else pa.string()
    if not (is_text_type(kind) or pa.types.is_null(kind)):  # a null column: every row null_text
        return f"column {text_column!r} is {kind}, not text (string or binary); pass --text-column naming a text column"
    clash = [c for c in added if c in footer.columns]
    if clash:
        return f"already has column(s) {', '.join(clash)}; pass --label-prefix (e.g. pred_)"
    return None


def read_problem(exc: Exception) -> str:
    """Why a file could not be read, for its failed record: corrupt Parquet, or the storage error."""
    if isinstance(exc, pa.ArrowInvalid):  # corrupt, cut short, not Parquet
        return f"unreadable Parquet: {exc}"
    return f"could not read it: {type(exc).__name__}: {exc}"  # access denied, retries exhausted, ...


def columns_note(columns: tuple[str, ...] | list[str], reference: tuple[str, ...] | list[str] | None) -> str | None:
    """A note when a file's columns are not the reference file's (it is labelled all the same)."""
    if reference is None or list(columns) == list(reference):
        return None
    extra = [n for n in columns if n not in reference]
    missing = [n for n in reference if n not in columns]
    if not extra and not missing:
        return "columns in another order than the run's first file"
    return "columns differ from the run's first file: " + "; ".join(
        s for s in (f"extra {extra}" if extra else "", f"missing {missing}" if missing else "") if s)


@dataclass(frozen=True)
class PartSpec:
    """Rows [start, stop) of a file, in the row groups ``groups``: part ``index`` of ``count``."""

    index: int
    count: int
    start: int
    stop: int
    groups: tuple[int, ...]


def split(footer: Footer, most_rows: int, most_bytes: int) -> list[PartSpec]:
    """Cut a file into parts of at most ``most_rows`` rows and about ``most_bytes`` uncompressed bytes. Row groups
    of zero rows are in no part; a file of zero rows is one part of none (its output: the columns, no rows)."""
    spans: list[tuple[int, int, list[int]]] = []  # (start, stop, groups)
    current: list[int] = []
    start = row = size = 0
    for g, (n, b) in enumerate(footer.groups):
        if n == 0:
            continue
        if current and (row + n - start > most_rows or size + b > most_bytes):
            spans.append((start, row, current))
            current, start, size = [], row, 0
        cuts = min(max(1, n), max(1, -(-n // most_rows), -(-b // max(1, most_bytes))))
        if cuts > 1:  # one row group too big alone: slices of it
            spans += [(row + n * k // cuts, row + n * (k + 1) // cuts, [g]) for k in range(cuts)]
            start = row + n
        else:
            current.append(g)
            size += b
        row += n
    if current or not spans:
        spans.append((start, row, current))
    return [PartSpec(k, len(spans), a, z, tuple(gs)) for k, (a, z, gs) in enumerate(spans)]


@dataclass
class Item:
    """One input file, or one part of it, for an actor to label."""

    input: str
    path: str
    size: int
    fingerprint: str
    part: PartSpec | None = None  # None: the whole file, read in one request (and split by the actor if big)
    weight: int = 0  # about how many bytes of the file this item reads (for ordering)

    @property
    def key(self) -> str:
        return f"{self.input}#{self.part.index if self.part else '*'}"


@dataclass
class Unit:
    """The actors' unit of work: a pack of small files, or one part of a big one."""

    id: int
    items: list[Item]

    @property
    def bytes(self) -> int:
        return sum(i.weight for i in self.items)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        doc = json.loads(text)
        items = [Item(**{**i, "part": PartSpec(**{**i["part"], "groups": tuple(i["part"]["groups"])}) if i["part"] else None})
                 for i in doc["items"]]
        return cls(doc["id"], items)


def _packs(files: list[Listed], actors: int) -> list[list[Listed]]:
    """Consecutive runs of files, balanced by bytes: enough packs for every actor to have a few, none over
    PACK_BYTES or PACK_FILES."""
    if not files:
        return []
    total = sum(f.size for f in files)
    count = min(len(files), max(UNITS_PER_ACTOR * actors, -(-total // PACK_BYTES), -(-len(files) // PACK_FILES)))
    packs: list[list[Listed]] = [[]]
    done = 0
    for f in files:
        full = len(packs[-1]) >= PACK_FILES or done + f.size > total * len(packs) / count
        if packs[-1] and full and len(packs) < count:
            packs.append([])
        packs[-1].append(f)
        done += f.size
    return packs


def is_big(f: Listed, most_bytes: int) -> bool:
    """A file that is split into parts on the driver (from its footer), not read whole in a pack."""
    return f.size > min(PACK_FILE_BYTES, most_bytes)


def cuts_files(files: int, actors: int) -> bool:
    """Whether a night of ``files`` pending files on ``actors`` actors cuts every file into row ranges (so the
    driver reads every pending footer): when packing whole files could not give each actor UNITS_PER_ACTOR units."""
    return 0 < files < UNITS_PER_ACTOR * max(1, actors)


def make_units(pending: list[Listed], footers: dict[str, Footer], most_rows: int, most_bytes: int,
               actors: int) -> list[Unit]:
    """The units for the pending files on a pool of ``actors``: one per part of each big file (is_big: its footer
    must be in ``footers``), packs of the rest; or, when there are too few files for that to give every actor
    UNITS_PER_ACTOR units (cuts_files), one per row range of every file whose footer shows more rows than an
    even share of the night's (at least MIN_PART_ROWS, at most ``most_rows``), each about that share; files
    with fewer stay whole, packed. Biggest first, so the night
    does not end waiting on one big part."""
    cut = {f.input for f in pending if is_big(f, most_bytes)}
    rows_each = most_rows
    if cuts_files(len(pending), actors):
        known = [f.input for f in pending if f.input in footers]
        total = sum(footers[f].rows for f in known)
        rows_each = min(most_rows, max(MIN_PART_ROWS, -(-total // (UNITS_PER_ACTOR * max(1, actors)))))
        cut |= {f for f in known if footers[f].rows > rows_each}  # a file too small to cut stays whole: one GET
    units: list[list[Item]] = []
    for f in pending:
        if f.input in cut:
            rows = max(1, footers[f.input].rows)
            units += [[Item(f.input, f.path, f.size, f.fingerprint, p, f.size * (p.stop - p.start) // rows)]
                      for p in split(footers[f.input], rows_each, most_bytes)]
    small = [f for f in pending if f.input not in cut]
    units += [[Item(f.input, f.path, f.size, f.fingerprint, None, f.size) for f in pack] for pack in _packs(small, actors)]
    made = [Unit(0, items) for items in units]
    made.sort(key=lambda u: -u.bytes)
    for k, u in enumerate(made):
        u.id = k
    return made
