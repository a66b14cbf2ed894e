"""After a run that did not end cleanly: what a killed run left under --output.

Only a run that took over a dead or crashed run's lease (or runs without a lease, or is
asked to with --verify-outputs) lists the output prefix: a clean night needs no listing
of what it wrote before. Output files no record vouches for are either *adopted* (their
Parquet metadata shows every part of one labelling of a pending file's current version
by this model: only the record was lost) or *stray* (deleted before labelling starts).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textlabel import data as data_lib
from textlabel import plan, storage
from textlabel.records import OUTPUT_META, FileRecord, adopted_record

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
            by_input.setdefault(fact["input"], []).append((name, fact))
    adopted = [r for name, outputs in by_input.items()
               if (r := adopted_record(dataclasses.asdict(pending[name]), outputs, model))]
    kept = {o for r in adopted for o in r.outputs}
    done = {r.input for r in adopted}
    selection.pending = [f for f in selection.pending if f.input not in done]
    return adopted, stray + [n for n in orphans if n not in kept]
