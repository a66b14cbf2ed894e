"""The run summary: ``OUTPUT/_summary.json`` (the latest run) and ``OUTPUT/_runs/<run>.json`` (each run)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from textlabel import storage
from textlabel.records import VOUCHING, FileRecord, Status, now
from textlabel.redact import redact_values

if TYPE_CHECKING:
    from textlabel.label import Night

logger = logging.getLogger(__name__)

SUMMARY = "_summary.json"
RUNS = "_runs"
LISTED = 1000  # names listed per kind; counts are always whole


@dataclass
class Tally:
    """What a run did, as it happens."""

    started_at: str = ""
    taken_over: str | None = None  # why the lease was taken over, if it was
    swept: bool = False  # the output prefix was listed (after an unclean end, or --verify-outputs)
    units: int = 0
    manifest: str | None = None  # "compacted", "merged" or None
    orphans_deleted: int = 0
    adopted: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    records: list[FileRecord] = field(default_factory=list)
    pool: dict | None = None  # the predictor pool and why (pool.Pool)
    inference: Counter = field(default_factory=Counter)  # summed predictor figures of every unit
    labels: list[dict] | None = None  # per task: drift.task_stats summed over the files labelled
    drift: dict | None = None  # nights.record's result

    def add(self, record: FileRecord) -> None:
        self.records.append(record)

    def add_stats(self, stats: dict[str, float] | None) -> None:
        self.inference.update(stats or {})


def _inference(totals: Counter) -> dict[str, float] | None:
    """The model's side of the run: real tokens against padded ones, and how long it waited for input."""
    if not totals:
        return None
    busy = totals["model_seconds"] + totals["input_wait_seconds"]
    return {**{k: round(v, 3) if isinstance(v, float) else v for k, v in sorted(totals.items())},
            "padding_share": round(1 - totals["real_tokens"] / totals["padded_tokens"], 4) if totals["padded_tokens"] else 0.0,
            "input_wait_share": round(totals["input_wait_seconds"] / busy, 4) if busy else 0.0,
            "real_tokens_per_model_second": round(totals["real_tokens"] / totals["model_seconds"]) if totals["model_seconds"] else 0}


def _capped(names: list[str]) -> list[str]:
    return sorted(names)[:LISTED]


def _totals(state: pa.Table) -> tuple[int, int]:
    keep = state.filter(pc.is_in(state["status"].cast(pa.string()), pa.array(VOUCHING)))
    files = pc.sum(pc.list_value_length(keep["outputs"])).as_py() or 0
    return files, pc.sum(keep["rows_out"]).as_py() or 0


def build(night: "Night", seconds: float, crashed: str | None) -> dict[str, Any]:
    """The summary of a run from its tally and the manifest."""
    t, sel, cfg = night.tally, night.selection, night.cfg
    done = [r for r in t.records if r.status == Status.DONE]
    failed = [r for r in t.records if r.status in (Status.FAILED, Status.STALE, Status.QUARANTINED)]
    skipped: Counter = Counter()
    for r in done:
        skipped.update(r.rows_skipped)
    rows_out = sum(r.rows_out for r in done)
    output_files, output_rows = _totals(night.manifest.current())
    return {
        "run": night.run, "started_at": t.started_at, "finished_at": now(), "input": cfg.input, "output": cfg.output,
        "model": night.model_id, "model_path": cfg.model, "relabel": cfg.relabel,
        **({"registered_model": night.registered.record()} if night.registered is not None else {}),
        "files_found": night.listing.num_rows, "files_unchanged": sel.unchanged if sel else 0,
        "files_labelled": len(done), "files_adopted": len(t.adopted), "files_failed": len(failed),
        "failed": {r.input: r.error for r in sorted(failed, key=lambda r: r.input)[:LISTED]},
        "files_kept_old_labels": _capped([r.input for r in failed if r.status == Status.STALE
                                          or (r.status == Status.QUARANTINED and r.outputs)]),
        "files_quarantined": _capped(sorted({r.input for r in failed if r.status == Status.QUARANTINED}
                                            | set(sel.quarantined if sel else []))),
        "files_with_other_columns": {r.input: r.note for r in sorted(done, key=lambda r: r.input) if r.note}
        if len(done) <= LISTED else {}, "files_changed_during_run": _capped(t.changed),
        "inputs_gone": _capped(sel.gone if sel and not t.pruned else []), "inputs_gone_count": len(sel.gone) if sel else 0,
        "inputs_pruned": len(t.pruned), "outputs_missing_relabelled": _capped(sel.lost if sel else []),
        "orphans_deleted": t.orphans_deleted, "outputs_swept": t.swept, "lease_taken_over": t.taken_over,
        "rows_in": sum(r.rows_in for r in done), "rows_out": rows_out,
        "rows_labelled": rows_out - sum(skipped.values()), "rows_skipped_total": sum(skipped.values()),
        "rows_skipped": dict(skipped), "rows_truncated": sum(r.rows_truncated for r in done),
        "long_texts": cfg.long_texts, "rows_chunked": t.inference.get("chunked_rows", 0),
        "chunks_dropped": t.inference.get("chunks_dropped", 0),
        "min_score": cfg.min_score, "drift": t.drift,
        "output_files": output_files, "output_rows": output_rows, "units": t.units, "pool": t.pool,
        "inference": _inference(t.inference),
        "commits": night.committer.commits if night.committer else 0, "manifest": t.manifest,
        "seconds": round(seconds, 2), "rows_per_second": round(rows_out / seconds, 1) if seconds else 0.0,
        "crashed": crashed,
    }


def write_summary(night: "Night", seconds: float, crashed: str | None) -> dict[str, Any]:
    """Write the summary (the latest, and this run's own) and log its gist. URI credentials in it (the options,
    a registered model's source, an error's text) are redacted (redact.py)."""
    summary = redact_values(build(night, seconds, crashed))
    storage.write_json(night.out.join(SUMMARY), summary)
    storage.write_json(night.out.join(RUNS, f"{night.run}.json"), summary)
    logger.info("run %s: %d files labelled (%d rows, %.0f rows/s), %d adopted, %d unchanged, %d failed; %d rows skipped "
                "%s, %d truncated, %d chunked; summary in %s", night.run, summary["files_labelled"], summary["rows_out"],
                summary["rows_per_second"], summary["files_adopted"], summary["files_unchanged"], summary["files_failed"],
                summary["rows_skipped_total"], summary["rows_skipped"] or "", summary["rows_truncated"],
                summary["rows_chunked"], night.out.join(SUMMARY).url)
    if summary["drift"] and summary["drift"].get("rows"):
        d = summary["drift"]
        logger.info("drift: %s; against %s (max %s)%s", "; ".join(
            f"{k}: PSI " + (", ".join(f"{v:.3f} vs {r.replace('_', ' ')}" for r, v in t["psi"].items()) or "- (no reference yet)")
            + f", mean score {t['mean_score']:.3f}" for k, t in d["tasks"].items()), d["primary"] or "nothing yet",
            d["max_drift"], " FLAGGED" if d["flagged"] else "")
    return summary
