"""What an older textlabel or a killed run left under --output.

Every run first moves the outputs an older textlabel named as another input's outputs may
be named now (records.part_name): a.part-00000.parquet's output was a.part-00000.parquet,
the name of a.parquet's first part. Each is copied to its new name, its record then vouches
for that, and only then is the old file deleted; no file is labelled again for it.

Only a run that took over a dead or crashed run's lease (or runs without a lease, or is
asked to with --verify-outputs) lists the output prefix: a clean night needs no listing
of what it wrote before. Output files no record vouches for are either *adopted* (their
Parquet metadata shows every part of one labelling of a pending file's current version
by this model: only the record was lost) or *stray* (deleted before labelling starts).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textlabel import data as data_lib
from textlabel import model as model_lib
from textlabel import plan, storage
from textlabel.records import OUTPUT_META, VOUCHING, FileRecord, Status, adopted_record, now, owner

if TYPE_CHECKING:
    from textlabel.label import Night

logger = logging.getLogger(__name__)


def present_outputs(out: storage.Location, manifest_found: bool) -> pa.Array:
    """The output files under ``out`` (relative to it); a prefix with Parquet but no manifest is not ours."""
    names = storage.list_table(out, ".parquet")["path"]
    present = pc.utf8_slice_codeunits(names, len(out.path.rstrip("/")) + 1).combine_chunks()
    if len(present) and not manifest_found:
        raise data_lib.DataError(f"--output {out.url} holds Parquet files but no textlabel manifest (_manifest/); "
                                 "write labels to a prefix of their own")
    return present


def facts(meta: dict[bytes, bytes] | None) -> dict[str, str] | None:
    """The ``textlabel.*`` facts of an output's Parquet metadata (None for a file textlabel did not write)."""
    prefix = OUTPUT_META.encode()
    if not meta or prefix + b"input" not in meta:
        return None
    return {k[len(prefix):].decode(): v.decode() for k, v in meta.items() if k.startswith(prefix)}


def read_facts(out: storage.Location, name: str) -> dict[str, str] | None:
    try:
        with out.fs.open_input_file(out.join(*name.split("/")).path) as fh:
            return facts(pq.read_metadata(fh).metadata)
    except Exception:  # unreadable: not ours to keep
        return None


def adopt(out: storage.Location, selection: plan.Selection, model: str, relabel: bool) -> tuple[list[FileRecord], list[str]]:
    """Adopt what can be adopted (removing those files from ``selection.pending``); returns the adopted
    records and the stray outputs (to delete), half-written local temporary files among them."""
    stray = [p[len(out.path.rstrip("/")) + 1:] for p in storage.local_temp_files(out)]
    orphans = selection.orphans
    with ThreadPoolExecutor(16) as pool:
        found = dict(zip(orphans, pool.map(lambda n: read_facts(out, n), orphans)))
    pending = {f.input: f for f in selection.pending}
    by_input: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for name, fact in found.items():
        if fact and fact["input"] in pending and not relabel:
            if model_lib.same_model(fact.get("model", ""), model):  # an older textlabel's name for this model
                fact = {**fact, "model": model}
            by_input.setdefault(fact["input"], []).append((name, fact))
    adopted = [r for name, outputs in by_input.items()
               if (r := adopted_record(dataclasses.asdict(pending[name]), outputs, model))]
    kept = {o for r in adopted for o in r.outputs}
    done = {r.input for r in adopted}
    selection.pending = [f for f in selection.pending if f.input not in done]
    return adopted, stray + [n for n in orphans if n not in kept]


@dataclass
class Renaming:
    """How misnamed outputs move, in the order it is done: the copies, one manifest segment of ``records``, the
    deletes."""

    copies: list[tuple[str, str]] = field(default_factory=list)  # (old name, new name)
    records: list[FileRecord] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # old names no record vouches for once ``records`` are written
    taken: list[str] = field(default_factory=list)  # names still vouched for under an older textlabel's name
    lost: list[str] = field(default_factory=list)  # inputs whose labels the old collision overwrote: labelled again


def _holds(fact: dict[str, str] | None, name: str, part: int, parts: int) -> bool:
    return bool(fact) and fact.get("input") == name and fact.get("part") == f"{part}/{parts}"


def renaming(found: list[plan.Misnamed], held: dict[str, list[FileRecord]], facts: dict[str, dict[str, str] | None],
             at: str) -> Renaming:
    """How each misnamed record's outputs move, from their files' Parquet metadata (``facts``, by old name).

    Its files hold its labels: copied to the new names, which the record then vouches for; another record that
    vouched for one of those files too (the old collision) stops vouching (LABELLING): it held these labels.
    A new name still vouched for by another record (its old name): left for a later run, ``taken``.
    A file holds another input's labels, or is gone: the record stops vouching for the names that are not its
    own (LABELLING), and the file is labelled again when it is next pending. ``held``: plan.holders of every
    old and new name.
    """
    updates: dict[str, FileRecord] = {}
    for m in found:
        rec = m.record
        moves = [(k, old, new) for k, (old, new) in enumerate(zip(rec.outputs, m.names)) if old != new]
        own = [o for o in rec.outputs if owner(o) in (None, rec.input)]
        others = {h.input for _, _, new in moves for h in held.get(new, []) if h.status.value in VOUCHING} - {rec.input}
        if rec.status.value not in VOUCHING:
            updates[rec.input] = replace(rec, outputs=own, recorded_at=at)
        elif others:
            continue
        elif all(_holds(facts.get(old), rec.input, k, len(m.names)) for k, old, _ in moves):
            updates[rec.input] = replace(rec, outputs=list(m.names), recorded_at=at)
        else:
            updates[rec.input] = replace(rec, status=Status.LABELLING, outputs=own, recorded_at=at)
    moved = {m.record.input: m for m in found if updates.get(m.record.input, m.record).outputs == list(m.names)}
    for m in moved.values():  # another record vouching for a moved file vouched for this one's labels
        for h in (h for o in m.record.outputs for h in held.get(o, []) if h.input != m.record.input):
            if h.status.value in VOUCHING and h.input not in moved:
                kept = [o for o in h.outputs if owner(o) in (None, h.input)]
                updates[h.input] = replace(h, status=Status.LABELLING, outputs=kept, recorded_at=at)
    before = {h.input: h for hs in held.values() for h in hs} | {m.record.input: m.record for m in found}
    vouched = {o for r in (before | updates).values() if r.status.value in VOUCHING for o in r.outputs}
    dropped = {o for name, r in updates.items() for o in set(before[name].outputs) - set(r.outputs)}
    copies = [(old, new) for m in moved.values() for old, new in zip(m.record.outputs, m.names) if old != new]
    taken = [o for m in found if m.record.input not in updates for o in m.record.outputs
             if owner(o) not in (None, m.record.input)]
    lost = [r.input for r in updates.values() if r.status == Status.LABELLING and before[r.input].status.value in VOUCHING]
    return Renaming(copies, list(updates.values()), sorted(dropped - vouched), taken, lost)


def move_misnamed(night: "Night") -> dict[str, str]:
    """Give the outputs an older textlabel misnamed their names now (renaming), without labelling them again:
    copies, then the records, then the deletes, so a kill between any two leaves every record vouching only for
    files that hold its labels. Returns the pending files that wait for a name still taken (plan.collisions)."""
    manifest, selection = night.manifest, night.selection
    found = plan.misnamed(manifest.state)
    if not found or (manifest.input and manifest.input.rstrip("/") != night.cfg.input.rstrip("/")):
        return {}  # nothing to move, or another corpus's labels: the run is refused (label._check_manifest)
    out = manifest.out
    held = plan.holders(manifest.state, sorted({n for m in found for n in (*m.record.outputs, *m.names)}))
    olds = sorted({o for m in found for o, new in zip(m.record.outputs, m.names) if o != new})
    with ThreadPoolExecutor(16) as pool:
        facts = dict(zip(olds, pool.map(lambda n: read_facts(out, n), olds)))
    moving = renaming(found, held, facts, now())
    if moving.records:
        night.wrote = True  # a crash from here on leaves the lease dirty: the next run sweeps what is left
        fence = night.lease.fence if night.lease else (lambda what: None)
        fence("moving misnamed outputs")
        for old, new in moving.copies:
            storage.write_bytes(out.join(*new.split("/")), storage.read_bytes(out.join(*old.split("/"))))
        fence("recording the moved outputs")
        manifest.write_segment(moving.records, 0)  # before the committer's first (1)
        storage.delete_many(out.fs, [out.join(*n.split("/")).path for n in moving.delete])
        logger.warning("moved %d output file(s) from names an older textlabel gave them, which another input's outputs "
                       "may have now, to names of their own", len(moving.copies))
        if moving.lost:
            logger.warning("%d file(s) whose labels an older textlabel overwrote with another input's (both named alike) "
                           "are labelled again on the next run: %s", len(moving.lost), ", ".join(moving.lost[:20]))
    gone = {new for _, new in moving.copies} | set(moving.delete)
    selection.orphans = [o for o in selection.orphans if o not in gone]
    return plan.collisions(selection.pending, moving.taken)
