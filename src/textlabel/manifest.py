"""The labelling manifest: which input file versions have been labelled into which output files.

It lives under the output prefix and is the source of truth for incremental runs:

- ``_manifest/<key>.json``: one record per input file, written the moment that file's
  outputs are all in place (so a killed run loses at most the files in flight);
- ``_manifest.json``: every record, folded together at the end of a run (one read for
  the next night's planning), after which the folded per-file records are deleted.

A record written after the last fold is newer than the fold, so loading applies the
per-file records over ``_manifest.json``. Every write is atomic (storage.write_bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from textlabel import storage

logger = logging.getLogger(__name__)

FORMAT = 1
FOLDED = "_manifest.json"
RECORDS = "_manifest"


def record_key(input_rel: str) -> str:
    """The file name of an input file's record (a hash: input paths may hold any character)."""
    return hashlib.sha1(input_rel.encode()).hexdigest()[:24] + ".json"


def _read_record(loc: storage.Location, attempts: int = 3) -> dict[str, Any] | None:
    """One per-file record; None if it is gone (folded by a run meanwhile). A record replaced while
    being read (S3 says it expired) is read again."""
    for attempt in range(attempts):
        try:
            return json.loads(storage.read_bytes(loc))
        except FileNotFoundError:
            return None
        except OSError:
            if attempt == attempts - 1:
                raise
    return None


@dataclass
class Manifest:
    """Records by input path (relative to --input), as loaded from an output prefix."""

    out: storage.Location
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    found: bool = False
    input: str | None = None  # the --input these records are about

    @classmethod
    def load(cls, out: storage.Location) -> "Manifest":
        """Read ``_manifest.json`` and any newer per-file records (none of it: an empty manifest)."""
        manifest = cls(out)
        folded = out.join(FOLDED)
        if storage.exists(folded):
            doc = storage.read_json(folded)
            if doc.get("format") != FORMAT:
                raise storage.StorageError(f"{folded.url}: manifest format {doc.get('format')!r}, this textlabel reads {FORMAT}")
            manifest.files = doc["files"]
            manifest.input = doc.get("input")
            manifest.found = True
        records = out.join(RECORDS)
        if storage.exists(records):
            paths = [f.path for f in storage.list_files(records, ".json")]
            with ThreadPoolExecutor(16) as pool:
                loose = [r for r in pool.map(lambda p: _read_record(storage.Location(p, out.fs, p)), paths) if r]
            for rec in sorted(loose, key=lambda r: r["recorded_at"]):
                manifest.files[rec["input"]] = rec
            manifest.found = manifest.found or bool(paths)
        return manifest

    def outputs(self) -> set[str]:
        """Every output file (relative to --output) that a record vouches for."""
        return {o for rec in self.files.values() if rec["status"] == "done" for o in rec["outputs"]}

    def record(self, rec: dict[str, Any]) -> None:
        """Write one input file's record now (its outputs must already be in place)."""
        storage.write_json(self.out.join(RECORDS, record_key(rec["input"])), rec)
        self.files[rec["input"]] = rec

    def fold(self) -> None:
        """Fold every record into ``_manifest.json``, then delete the per-file records it now holds."""
        storage.write_json(self.out.join(FOLDED), {"format": FORMAT, "input": self.input,
                                                   "files": dict(sorted(self.files.items()))})
        self.found = True
        records = self.out.join(RECORDS)
        done = [f.path for f in storage.list_files(records, ".json")] if storage.exists(records) else []
        storage.delete_many(self.out.fs, done)
