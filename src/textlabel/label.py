"""The labelling job: incremental, exactly-once labelling of a Parquet corpus that grows every night.

A run, in order:

1. **Lists** the input (one LIST per 1,000 objects, Arrow columns) and **takes the lease**
   on --output (lease.py), so no other run writes there meanwhile.
2. **Loads the manifest** (manifest.py: a snapshot plus small segments) and **plans**
   (plan.py, pure): the files not recorded DONE at their listed version. Only big files'
   footers are read on the driver (to cut them into parts), and a few others' to fail fast
   on a wrong --text-column. A run with nothing new stops here: no Ray, no writes but its
   summary.
3. **Sweeps**, only after a run that did not end cleanly (or with --verify-outputs): output
   files no record vouches for are adopted when their Parquet metadata shows a complete,
   current labelling of a pending file (a kill lost only their record), else deleted.
4. **Labels** the units (packs of small files, parts of big ones) on a Ray Data actor pool
   (labeller.py). Each finished file's record goes to the committer (commit.py), which
   writes records in batches off the result loop and only then deletes outputs they stop
   vouching for.
5. **Finishes**: the last commits, compaction, tonight's entry in the drift history
   (nights.py: the night's class shares against the training labels and the last 7
   nights), the summary, and the lease released; a drifted night then exits 4.

Exactly once: an output is written whole (one PUT or rename) under a name fixed by its
input and part, before any record vouches for it; a record is written only when all of a
file's parts exist; whatever a kill leaves is adopted or redone by the next run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from textlabel import data as data_lib
from textlabel import lease as lease_lib
from textlabel import model as model_lib
from textlabel import drift, nights, plan, predict, progress, storage, sweep, tracking
from textlabel import pool as pool_lib
from textlabel.commit import Committer
from textlabel.config import ConfigError, LabelConfig
from textlabel.labeller import LabellerSpec, PartLabeller, Tracker
from textlabel.manifest import Manifest
from textlabel.records import FileOutcome, FileRecord, ItemResult, Status, file_record, keep_old_labels
from textlabel.summary import Tally, write_summary
from textlabel.watch import Watch, drain

logger = logging.getLogger(__name__)

SAMPLE = 8  # footers read on the driver to fail fast on a wrong option


class FilesFailed(RuntimeError):
    """The run finished every file it could, but some could not be labelled (exit code 3)."""


class DriftFlagged(RuntimeError):
    """Every label is committed, but tonight's labels moved past --max-drift from the reference (exit code 4)."""


@dataclass
class Night:
    """One run's state, passed between its steps."""

    cfg: LabelConfig
    run: str
    src: storage.Location
    out: storage.Location
    root: str
    listing: pa.Table
    manifest: Manifest | None = None
    lease: lease_lib.Lease | None = None
    taken_over: str | None = None
    selection: plan.Selection | None = None
    footers: dict[str, plan.Footer] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # input -> reason, found before labelling
    model_id: str = ""
    registered: Any = None  # tracking.Registered: --model named a registered model version
    min_scores: list[list[float] | None] | None = None  # --min-score per task, one threshold a class
    added: list[str] = field(default_factory=list)
    previous: dict[str, FileRecord] = field(default_factory=dict)  # pending files' records before this run
    tally: Tally = field(default_factory=Tally)
    adopted: list[FileRecord] = field(default_factory=list)  # a killed run's complete outputs, taken as they are
    stray: list[str] = field(default_factory=list)  # outputs no record vouches for, deleted before labelling
    units: list[plan.Unit] = field(default_factory=list)
    pool: pool_lib.Pool | None = None
    committer: Committer | None = None
    wrote: bool = False  # outputs may have been written: a crash now leaves the lease dirty


def _listing(cfg: LabelConfig) -> tuple[storage.Location, str, pa.Table]:
    src = storage.resolve(cfg.input)
    listing = storage.list_table(src, ".parquet")
    if listing.num_rows == 0:
        raise data_lib.DataError(f"--input {cfg.input}: no *.parquet files there; check the prefix (is tonight's corpus in place?)")
    single = listing.num_rows == 1 and listing["path"][0].as_py() == src.path.rstrip("/")
    root = src.path.rsplit("/", 1)[0] if single else src.path
    return src, root, plan.relative(listing, root)


def _check_manifest(night: Night) -> None:
    """One --output holds one corpus's labels, from one model unless told otherwise. A model is known by its
    content (model.identity); a record from before that names it by path and weights, and the same weights are
    taken for the same model (model.same_model): such records stay as they are until their file is relabelled."""
    cfg, manifest = night.cfg, night.manifest
    if manifest.input and manifest.input.rstrip("/") != cfg.input.rstrip("/"):
        raise ConfigError([f"--output {cfg.output} holds the labels of --input {manifest.input}, not {cfg.input}; "
                           "give each corpus its own --output"])
    if cfg.relabel or cfg.keep_old_labels:
        return
    state = manifest.state
    done = state.filter(pa.compute.equal(state["status"].cast(pa.string()), Status.DONE.value))
    others = sorted(m for m in pa.compute.unique(done["model"].cast(pa.string())).to_pylist()
                    if not model_lib.same_model(m, night.model_id))
    if others:
        raise ConfigError([
            f"--output {cfg.output} holds labels from another model ({others[0]}); this run's is {night.model_id}. "
            "Pass --relabel to relabel every file with this model, --keep-old-labels to label only new files "
            "with it, or write to a new --output"])


def _footer(fs, listed: plan.Listed) -> plan.Footer | Exception:
    try:
        with fs.open_input_file(listed.path) as fh:
            return plan.Footer.of(pq.ParquetFile(fh).metadata)
    except Exception as exc:  # this file fails (or waits for the next run), not the run
        return exc


def _read_footers(night: Night, wanted: list[plan.Listed] | None = None) -> None:
    """Footers of ``wanted``; by default of the big pending files (to split them) and of a spread sample of the
    rest (to fail fast). A file replaced since the listing is left to the next run; one unreadable fails."""
    pending = night.selection.pending
    if wanted is None:
        big = [f for f in pending if plan.is_big(f, night.cfg.part_bytes)]
        step = max(1, len(pending) // SAMPLE)
        wanted = big + pending[::step][:SAMPLE]
    todo = {f.input: f for f in wanted if f.input not in night.footers and f.input not in night.failed}
    with ThreadPoolExecutor(16) as pool:
        found = dict(zip(todo, pool.map(lambda f: _footer(night.src.fs, f), todo.values())))
    replaced = set()
    for name, footer in found.items():
        if not isinstance(footer, Exception):
            night.footers[name] = footer
        elif storage.replaced(footer):  # replaced since the listing: the next run labels the new version
            replaced.add(name)
        else:
            night.failed[name] = plan.read_problem(footer)
    if replaced:
        night.selection.pending = [f for f in pending if f.input not in replaced]
        night.tally.changed += sorted(replaced)
        logger.info("%d file(s) replaced since the listing are left to the next run: %s", len(replaced),
                    ", ".join(sorted(replaced)[:20]))


def _check_footers(night: Night) -> None:
    """Fail the files whose footer rules them out; refuse the run when that is every file (a wrong option)."""
    for name, footer in night.footers.items():
        problem = plan.check_footer(footer, night.cfg.text_column, night.added)
        if problem:
            night.failed[name] = problem
    checked = set(night.footers) | set(night.failed)
    if night.failed and checked == set(night.failed) and not night.selection.unchanged:
        first = next(f.input for f in night.selection.pending if f.input in night.failed)
        raise data_lib.DataError(f"no input file can be labelled; the first, {first}: {night.failed[first]}")


def _thresholds(cfg: LabelConfig) -> list[list[float] | None] | None:
    """--min-score per task and class; a class it names must be one of the model's."""
    if cfg.min_score is None:
        return None
    tasks = model_lib.task_labels(cfg.model)
    known = {name for t in tasks for name in t.labels}
    unknown = sorted(set(cfg.min_score) - known - {"*"}) if isinstance(cfg.min_score, dict) else []
    if unknown:
        raise ConfigError([f"--min-score names class(es) {', '.join(unknown)} that the model does not have; its classes: "
                           f"{', '.join(sorted(known))}"])
    return [cfg.thresholds(list(t.labels)).tolist() for t in tasks]


def _plan(night: Night) -> None:
    cfg, out = night.cfg, night.out
    manifest = night.manifest = Manifest.load(out)
    manifest.run = night.run
    swept = bool(night.taken_over or not cfg.lease or cfg.verify_outputs or not manifest.found or manifest.legacy)
    present = sweep.present_outputs(out, manifest.found) if swept else None
    night.selection = plan.select(night.listing, manifest.state, cfg.relabel, present, night.root, cfg.retry_failed)
    if night.selection.quarantined:
        logger.warning("%d file(s) quarantined at their current version (they ended their predictor process "
                       "--max-attempts times) are not labelled again: %s; --retry-failed retries them",
                       len(night.selection.quarantined), ", ".join(night.selection.quarantined[:20]))
    night.tally.swept = swept
    _read_footers(night)
    night.failed |= sweep.move_misnamed(night)  # before any output is written under the names they had
    _check_footers(night)  # a wrong --text-column fails here, before any model is looked at
    model_lib.check_model_dir(cfg.model)
    night.model_id = model_lib.identity(cfg.model)  # its content: not its path, nor its name in a registry
    _check_manifest(night)
    night.previous = manifest.records([f.input for f in night.selection.pending])
    if not night.selection.pending and not swept:
        return  # nothing to label: the model's config and tokenizer are not loaded (transformers stays unimported)
    model_lib.check(cfg.model, cfg.max_length)  # its architecture and positions, from config.json alone
    night.min_scores = _thresholds(cfg)
    night.added = predict.output_columns(model_lib.task_names(cfg.model), cfg.label_prefix, cfg.long().chunked)
    _check_footers(night)  # again, for files that already have the columns the labels would add
    if swept:
        night.adopted, night.stray = sweep.adopt(out, night.selection, night.model_id, cfg.relabel)


def _prepare_writes(night: Night) -> None:
    """Before any part runs: claim the prefix, adopt or delete a killed run's outputs, prune gone inputs,
    record the files that failed their checks, and mark the files about to be replaced."""
    cfg, manifest, committer = night.cfg, night.manifest, night.committer
    if not manifest.files or manifest.legacy:  # claim() writes only then
        _fence(night, "claiming the output prefix")
    manifest.claim(cfg.input)
    by_input = {f.input: f for f in night.selection.pending}
    # A file about to be labelled again stops being vouched for first: if the run dies while its
    # parts are replaced, the next run labels it again instead of trusting a half-replaced output.
    for name, rec in night.previous.items():
        if rec.status in (Status.DONE, Status.STALE, Status.QUARANTINED) and name in by_input and name not in night.failed:
            committer.add(dataclasses.replace(rec, status=Status.LABELLING, run=night.run, recorded_at=_now()))
    committer.flush()
    for record in night.adopted:
        committer.add(record)
        night.tally.adopted.append(record.input)
    if night.stray:
        _fence(night, "the sweep's deletes")
        storage.delete_many(night.out.fs, [night.out.join(*n.split("/")).path for n in night.stray])
    night.tally.orphans_deleted = len(night.stray)
    if night.stray or night.adopted:
        logger.info("an interrupted run left %d output file(s) without records: adopted %d complete file(s), deleted %d "
                    "stray output(s)", sum(len(r.outputs) for r in night.adopted) + len(night.stray), len(night.adopted),
                    len(night.stray))
    if cfg.prune_gone and night.selection.gone:
        for rec in manifest.records(night.selection.gone).values():
            committer.add(dataclasses.replace(rec, status=Status.PRUNED, run=night.run, recorded_at=_now()), rec.outputs)
        night.tally.pruned = list(night.selection.gone)
    for name, reason in night.failed.items():
        _finish_file(night, by_input[name], [ItemResult(name, 0, 1, name, by_input[name].fingerprint, error=reason)])


def _fence(night: Night, what: str) -> None:
    """Prove the lease is still this run's before ``what`` (lease.py); raises LeaseLost."""
    if night.lease:
        night.lease.fence(what)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _finish_file(night: Night, listed: plan.Listed, results: list[ItemResult]) -> bool:
    """A file's results are all in: queue its record, and the outputs it stops vouching for. True if it failed."""
    outcome: FileOutcome = file_record(dataclasses.asdict(listed), results, night.model_id, night.run)
    night.tally.finished.append(listed.input)
    previous = night.previous.get(listed.input)
    old = set(previous.outputs) if previous else set()
    if outcome.changed:
        night.tally.changed.append(listed.input)
    record = outcome.record
    if record is None:  # replaced while being read: not recorded at any version; the next run labels it
        _fence(night, "deleting the outputs of a file replaced while it was read")
        storage.delete_many(night.out.fs, [night.out.join(*n.split("/")).path for n in outcome.written])
        return False
    if record.status in (Status.FAILED, Status.QUARANTINED):
        record = keep_old_labels(record, previous, outcome.written)
        logger.error("FAILED %s: %s", listed.input, record.error)
    stale = (old | set(outcome.written)) - set(record.outputs)
    night.committer.add(record, sorted(stale))
    if record.status == Status.DONE:  # tonight's labels, for drift
        for r in results:
            night.tally.labels = drift.add(night.tally.labels, r.label_stats)
    night.tally.add(record)
    return record.status != Status.DONE


def _spec(night: Night) -> LabellerSpec:
    cfg = night.cfg
    reference = next((night.footers[f.input].columns for f in night.selection.pending
                      if f.input in night.footers and f.input not in night.failed), None)  # the first good file's
    hooks = json.loads(os.environ.get("TEXTLABEL_TEST_HOOKS", "{}"))  # tests only: see labeller.py and predict.py
    return LabellerSpec(cfg.model, night.model_id, cfg.input, night.run, cfg.output, cfg.text_column, cfg.label_prefix,
                        night.added, list(reference) if reference else None, cfg.max_length,
                        cfg.predictor_options(night.pool.threads), cfg.rows_per_file, cfg.part_bytes, cfg.max_attempts,
                        long_texts=dataclasses.asdict(cfg.long()), min_scores=night.min_scores, hooks=hooks)


def _start_pool(night: Night, start_ray: Callable[[], None] | None) -> None:
    """When there is anything to label: start Ray, size the pool to the cluster, and cut the pending files into
    units for it (plan.make_units: a night of few files has its files cut into row ranges, from footers read
    here), then cap the pool at the units."""
    cfg = night.cfg
    pending = [f for f in night.selection.pending if f.input not in night.failed]
    if not pending:
        return
    if start_ray:
        start_ray()
    actors = pool_lib.for_job(cfg, None).max_actors
    if plan.cuts_files(len(pending), actors):  # every footer, to cut every file
        _read_footers(night, pending)
        _check_footers(night)
        pending = [f for f in night.selection.pending if f.input not in night.failed]
    night.units = plan.make_units(pending, night.footers, cfg.rows_per_file, cfg.part_bytes, actors)
    night.tally.units = len(night.units)
    if night.units:
        night.pool = pool_lib.for_job(cfg, len(night.units))
        night.tally.pool = night.pool.as_dict()


def _label_units(night: Night) -> None:
    """Stream the units through the actor pool; finish each file as soon as all its parts are back."""
    if not night.units:
        return
    import ray
    from ray.data import ActorPoolStrategy

    cfg, pool = night.cfg, night.pool
    pending = {f.input: f for f in night.selection.pending if f.input not in night.failed}  # what the units hold
    logger.info("%d files to label in %d units (%d row ranges of files, %d packs of whole files)", len(pending),
                len(night.units), sum(1 for u in night.units if u.items[0].part),
                sum(1 for u in night.units if not u.items[0].part))
    night.wrote = True
    tracker = ray.remote(num_cpus=0)(Tracker).remote(cfg.part_timeout)
    terminal = progress.interactive()
    ray.data.DataContext.get_current().enable_progress_bars = terminal  # a log file or pipe gets our lines instead
    ds = ray.data.from_items([{"unit": u.to_json()} for u in night.units], override_num_blocks=len(night.units)).map_batches(
        PartLabeller, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs={"spec": dataclasses.asdict(_spec(night)), "tracker": tracker},
        # One unit in flight per actor: an idle actor takes the next unit, none waits queued behind a busy one.
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor if cfg.use_gpu else 0,
    )
    results: dict[str, list[ItemResult]] = {}
    done = progress.Labelling(files=len(pending), bytes=sum(f.size for f in pending.values()))
    asked = (f"{pool.min_actors} actor(s) of {pool.cpus_per_actor:g} CPU"
             + (f" and {pool.gpus_per_actor:g} GPU" if cfg.use_gpu else "") + " each")
    watch = Watch.of_tracker(tracker, cfg.part_timeout, cfg.schedule_timeout, asked,
                             night.lease.check if night.lease else lambda: None)  # a lost lease ends the loop
    with progress.Ticker(done.line, 0 if terminal else cfg.progress_seconds):
        for batch in drain(ds.iter_batches(batch_size=None, batch_format="pyarrow"), watch.tick):
            for text in batch["result"].to_pylist():
                r = ItemResult.from_json(text)
                night.tally.add_stats(r.stats)
                done.part_done(r.rows_out, pending[r.input].size, r.parts)
                results.setdefault(r.input, []).append(r)
                if len({x.part for x in results[r.input]}) == r.parts:
                    done.file_done(failed=_finish_file(night, pending[r.input], results.pop(r.input)))
    _pool_report(night, tracker)
    missing = set(pending) - set(night.tally.finished)
    if missing:
        raise RuntimeError(f"{len(missing)} file(s) never came back from the actor pool; rerun to finish them")


def _pool_report(night: Night, tracker) -> None:
    """The actors' figures (labeller.Tracker.report: ready and first-unit times, busy share, instruction set) into
    the summary's ``pool``; a tracker that does not answer in time costs the figures, not the night."""
    import ray

    try:
        night.tally.pool = (night.tally.pool or {}) | ray.get(tracker.report.remote(), timeout=60)
    except Exception as exc:  # figures only
        logger.warning("the predictor pool's figures could not be read (%s: %s)", type(exc).__name__, exc)
    for a in (night.tally.pool or {}).get("actors", []):
        logger.info("actor %s on %s (%s; %s%s): ready at %ss, first unit at %ss, %d unit(s), busy %.0f%% of %ss",
                    a["actor"], a.get("node"), a.get("isa"), a.get("runtime"), f", {a['int8']}" if a.get("int8") else "",
                    a.get("ready_s"), a.get("first_unit_s"), a["units"], 100 * a["busy_share"],
                    night.tally.pool["labelling_s"])


def run_labelling(cfg: LabelConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Label every input file not yet labelled; returns the run's summary (also in OUTPUT/_summary.json).

    Everything that needs no model (listing, the manifest, footers) is done before ``start_ray`` is
    called; a run with nothing to do never starts Ray. Raises FilesFailed, after finishing everything
    else, when some file could not be labelled.
    """
    start = time.perf_counter()
    run = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    registered = None
    if tracking.is_registered(cfg.model):  # models:/NAME/VERSION or @ALIAS: resolved once, here
        registered = tracking.resolve(cfg.model, cfg.mlflow_tracking_uri)
        cfg = dataclasses.replace(cfg, model=registered.source)
    src, root, listing = _listing(cfg)
    night = Night(cfg, run, src, storage.resolve(cfg.output), root, listing, registered=registered)
    if cfg.lease:
        night.lease, night.taken_over = lease_lib.acquire(night.out, run, cfg.lease_seconds)
    else:
        lease_lib.refuse_if_held(night.out)
    night.tally.started_at, night.tally.taken_over = _now(), night.taken_over
    crashed, summary = None, None
    try:
        _plan(night)
        _start_pool(night, start_ray)
        night.committer = Committer(night.manifest, cfg.commit_every, cfg.commit_seconds,
                                    check=lambda: _fence(night, "a commit"))
        _prepare_writes(night)
        _label_units(night)
        night.committer.close()
        if night.manifest.written:  # finish() merges or compacts only what this run wrote
            _fence(night, "compaction")
        night.tally.manifest = night.manifest.finish()
        # before the summary: a kill now leaves the night to a rerun
        night.tally.drift = nights.record(night, fence=lambda: _fence(night, "the drift history"))
    except BaseException as exc:
        crashed = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary = _end(night, crashed, time.perf_counter() - start)
    found = summary.get("drift") or {}
    drifted = "; ".join(found.get("moved", [])) if found.get("flagged") else ""
    if drifted:
        drifted = (f"tonight's labels drifted past --max-drift {cfg.max_drift}: {drifted}. They are committed; "
                   f"see {night.out.join(*nights.PNG).url}")
    if summary["files_failed"]:
        if drifted:
            logger.warning("%s", drifted)
        raise FilesFailed(f"{summary['files_failed']} input file(s) could not be labelled (see FAILED lines above and "
                          f"{night.out.join('_summary.json').url}); every other file is labelled. Fix or remove them "
                          "and rerun: only they will be labelled")
    if drifted:
        raise DriftFlagged(drifted)
    return summary


def _end(night: Night, crashed: str | None, seconds: float) -> dict[str, Any] | None:
    """Flush what finished, write the summary (once the run got as far as writing), release the lease."""
    clean = crashed is None or not night.wrote
    summary = None
    lost = night.lease is not None and night.lease.lost is not None
    try:
        if night.committer is not None and not lost:
            if crashed is not None:
                night.committer.close()  # the records of every file that finished still count
            _fence(night, "the summary")
            summary = write_summary(night, seconds, crashed)
    except Exception:
        clean = False
        if crashed is None:
            raise
        logger.exception("could not commit the finished files or write the summary of a run that failed")
    finally:
        if night.lease:
            night.lease.release(clean)
    return summary
