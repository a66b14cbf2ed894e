"""The drift history under --output: one entry per night, the reference of the nights after it, and its plot.

``OUTPUT/_report/drift.json`` holds the nights (drift.night_entry), oldest first, written
once by the run that completes a night, under the lease; ``drift.png`` is redrawn from it
each time an entry is written. A night's figures are the sum over the files it labelled: the files of this run
(from its actors' results) and, after a run that did not end cleanly, the files that run
committed before it died, read from their outputs' Parquet metadata. Each file is counted
in exactly one night: a killed run writes no entry, and the rerun that completes its night
writes that night's entry under the killed run's name, so a second rerun replaces it rather
than adding another.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from textlabel import drift, storage, sweep
from textlabel import model as model_lib
from textlabel.records import Status, now

if TYPE_CHECKING:
    from textlabel.label import Night

logger = logging.getLogger(__name__)

HISTORY = ("_report", "drift.json")
PNG = ("_report", "drift.png")


def load(out: storage.Location) -> list[dict]:
    """The recorded nights, oldest first."""
    loc = out.join(*HISTORY)
    return storage.read_json(loc)["nights"] if storage.exists(loc) else []


def tasks(model: str | None) -> list[drift.Task]:
    """The model's tasks as drift compares them, with the training label counts saved with the model."""
    found = model_lib.task_labels(model)
    training = model_lib.training_labels(model) or []
    out = []
    for k, t in enumerate(found):
        counts = training[k]["counts"] if k < len(training) and tuple(training[k]["labels"]) == t.labels else None
        out.append(drift.Task(t.name or "label", list(t.labels), counts if counts and sum(counts) else None))
    return out


def interrupted_runs(state: pa.Table, history: list[dict], run: str) -> list[str]:
    """Runs that committed labels but never completed their night: those after the last night recorded (run
    names start with their UTC start time, so they sort in time). With no history yet, only the latest run
    can be one (older runs on an output labelled before drift was recorded are not nights to fold in)."""
    done = state.filter(pc.equal(state["status"].cast(pa.string()), Status.DONE.value))
    runs = set(pc.unique(done["run"].cast(pa.string())).to_pylist()) - {run, None, ""}
    covered = {r for n in history for r in n["runs"]}
    last = max(covered, default="")
    found = sorted(r for r in runs if r > last and r not in covered)
    return found if history else found[-1:]


def _stats_of(out: storage.Location, name: str) -> list[dict] | None:
    facts = sweep.read_facts(out, name)
    return json.loads(facts["label_stats"]) if facts and facts.get("label_stats") else None


def committed_stats(out: storage.Location, state: pa.Table, runs: list[str]) -> tuple[list[dict] | None, int]:
    """The summed figures of the DONE files ``runs`` recorded, from their outputs' metadata; and how many
    outputs had none (written by a version of textlabel before drift was recorded)."""
    done = state.filter(pc.and_(pc.equal(state["status"].cast(pa.string()), Status.DONE.value),
                                pc.is_in(state["run"].cast(pa.string()), pa.array(runs, pa.string()))))
    names = pc.list_flatten(done["outputs"]).to_pylist() if done.num_rows else []
    total, missing = None, 0
    with ThreadPoolExecutor(16) as pool:
        for stats in pool.map(lambda n: _stats_of(out, n), names):
            missing += stats is None
            total = drift.add(total, stats)
    return total, missing


def record(night: "Night", fence: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Record tonight in the history (and redraw the plot), calling ``fence`` just before writing; returns the
    summary's ``drift``. A night with no rows of its own (and no interrupted run to fold in) reads nothing."""
    cfg, out = night.cfg, night.out
    runs: list[str] = []
    stats = night.tally.labels
    folds = bool(night.taken_over or not cfg.lease)  # the last run may have died with labels committed
    if not folds and (not stats or not sum(stats[0]["counts"])):
        return {"rows": 0, "flagged": False, "max_drift": cfg.max_drift, "note": "no rows labelled tonight"}
    history = load(out)
    if folds:
        state = night.manifest.current()
        runs = interrupted_runs(state, history, night.run)
        if runs:
            found, missing = committed_stats(out, state, runs)
            stats = drift.add(stats, found)
            logger.info("drift: tonight includes the files of interrupted run(s) %s%s", ", ".join(runs),
                        f" ({missing} output(s) without figures)" if missing else "")
    if not stats or not sum(stats[0]["counts"]):
        return {"rows": 0, "flagged": False, "max_drift": cfg.max_drift, "note": "no rows labelled tonight"}
    key = runs[0] if runs else night.run
    known = tasks(cfg.model)
    entry = drift.night_entry(key, runs + [night.run], now(), night.model_id, known, stats)
    prior = [n for n in history if n["night"] != key]
    result = drift.compare(entry, prior, known, cfg.max_drift)
    history = (prior + [entry])[-drift.KEEP:]
    fence()
    storage.write_json(out.join(*HISTORY), {"format": 1, "nights": history})
    storage.write_bytes(out.join(*PNG), drift.history_png(history))
    return result | {"night": key, "history": out.join(*HISTORY).url, "plot": out.join(*PNG).url}
