"""The labelling job: incremental, exactly-once labelling of a growing Parquet corpus.

Each run lists the input files with their versions (S3 ETag, or size and mtime), reads
the manifest under --output (manifest.py) and labels only the files it does not vouch
for: new files, changed files, files that failed before (all of them with --relabel).

The unit of work is a *part*: one input file, or a run of its row groups when the file
holds more than --rows-per-file rows. Parts go through a Ray Data actor pool; each
actor reads its part, labels it (reading and tokenizing the next batch while the model
runs), and writes the output file in one atomic PUT (a rename on local disks) under a
name fixed by the input path and part number. A retried part therefore overwrites
itself: killed at any point, the next run leaves every input row in exactly one
output row. A file's manifest record is written only after all its parts exist.

A file that cannot be labelled (unreadable, no text column, zero rows, ...) is recorded
as failed, with its reason, and the run goes on; the job then exits 3. Rows that
cannot be labelled (null, blank, non-text, invalid UTF-8) keep a null label and a
``skip_reason``; rows cut at --max-length are labelled and flagged ``truncated``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from textlabel import data as data_lib
from textlabel import model as model_lib
from textlabel import predict, storage
from textlabel.config import ConfigError, LabelConfig
from textlabel.manifest import Manifest

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("label", "label_id", "score", "truncated", "skip_reason")
SUMMARY = "_summary.json"
RUNS = "_runs"


class FilesFailed(RuntimeError):
    """The run finished every file it could, but some could not be labelled (exit code 3)."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _refuse_if_none_can_be_labelled(work: "Plan") -> None:
    """Every file to label fails its checks: most likely a wrong option, not bad files; nothing is recorded."""
    if work.pending and len(work.failed) == len(work.pending) and not work.unchanged:
        first = work.pending[0]["input"]
        raise data_lib.DataError(f"no input file can be labelled; the first, {first}: {work.failed[first]}")


def _check_clashes(work: "Plan", added: list[str]) -> None:
    """Files that already have a column the labels would add fail (their parts are dropped)."""
    for f in work.pending:
        clash = [c for c in added if c in f.get("columns", ())]
        if clash and f["input"] not in work.failed:
            work.failed[f["input"]] = f"already has column(s) {', '.join(clash)}; pass --label-prefix (e.g. pred_)"
    work.parts = [p for p in work.parts if p["input"] not in work.failed]


def part_name(rel: str, part: int, parts: int) -> str:
    """The output file of one part: the input's own name, or NAME.part-00001.parquet when split."""
    if parts == 1:
        return rel
    return f"{rel[: -len('.parquet')]}.part-{part:05d}.parquet"


@dataclass
class Plan:
    """What one run will do."""

    files: list[dict[str, Any]]  # every input file version found
    pending: list[dict[str, Any]] = field(default_factory=list)  # files to (re)label
    parts: list[dict[str, Any]] = field(default_factory=list)  # their parts, the actors' work
    failed: dict[str, str] = field(default_factory=dict)  # input -> reason, found without reading any row
    notes: dict[str, str] = field(default_factory=dict)  # input -> schema note (labelled anyway)
    unchanged: int = 0
    gone: list[str] = field(default_factory=list)  # recorded inputs no longer listed
    lost: list[str] = field(default_factory=list)  # recorded inputs whose output files are missing: labelled again


def _columns_note(schema: pa.Schema, reference: pa.Schema | None) -> str | None:
    if reference is None or schema.names == reference.names:
        return None
    extra = [n for n in schema.names if n not in reference.names]
    missing = [n for n in reference.names if n not in schema.names]
    if not extra and not missing:
        return "columns in another order than the run's first file"
    return "columns differ from the run's first file: " + "; ".join(
        s for s in (f"extra {extra}" if extra else "", f"missing {missing}" if missing else "") if s)


def _inspect(cfg: LabelConfig, fs, f: dict[str, Any]) -> dict[str, Any]:
    """Footer facts about one input file (no rows read), or why it cannot be labelled."""
    try:
        with fs.open_input_file(f["path"]) as fh:
            meta = pq.ParquetFile(fh).metadata
        schema = meta.schema.to_arrow_schema()
    except pa.ArrowInvalid as exc:  # corrupt, cut short, not Parquet: this file fails, not the run
        return {"error": f"unreadable Parquet: {exc}"}
    except Exception as exc:  # access denied, retries exhausted, ...: this file fails, not the run
        return {"error": f"could not read it: {type(exc).__name__}: {exc}"}
    if cfg.text_column not in schema.names:
        return {"error": f"no column {cfg.text_column!r} (columns: {', '.join(schema.names)}); pass --text-column",
                "schema": schema}
    if meta.num_rows == 0:
        return {"error": "zero rows: nothing to label (an empty export upstream?)", "schema": schema}
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return {"schema": schema, "rows": meta.num_rows, "row_groups": groups}


def _split(groups: list[int], most: int) -> list[list[int]]:
    """Consecutive row groups, at most ``most`` rows a part (a bigger row group is a part alone)."""
    parts, current, rows = [], [], 0
    for i, n in enumerate(groups):
        if current and rows + n > most:
            parts.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    return parts + ([current] if current else [])


def plan(cfg: LabelConfig, src: storage.Location, root: str, manifest: Manifest, present: set[str]) -> Plan:
    """List the input versions, pick the files to label and cut them into parts.

    ``present``: the output files that exist now (relative to --output).
    """
    found = storage.list_versions(src, ".parquet")
    if not found:
        raise data_lib.DataError(f"--input {cfg.input}: no *.parquet files there; check the prefix (is tonight's corpus in place?)")
    for f in found:
        f["input"] = f["path"][len(root):].lstrip("/")
    result = Plan(found)
    listed = {f["input"] for f in found}
    result.gone = sorted(k for k in manifest.files if k not in listed)
    for f in found:
        rec = manifest.files.get(f["input"])
        if not cfg.relabel and rec and rec["status"] == "done" and rec["fingerprint"] == f["fingerprint"]:
            if set(rec["outputs"]) <= present:
                result.unchanged += 1
                continue
            result.lost.append(f["input"])  # someone deleted its labels: make them again
        result.pending.append(f)
    with ThreadPoolExecutor(16) as pool:
        facts = list(pool.map(lambda f: _inspect(cfg, src.fs, f), result.pending))
    reference = next((x["schema"] for x in facts if "error" not in x), None)
    pending = {f["input"] for f in result.pending}
    # output -> the input it belongs to; outputs of files left as they are count too
    names = {o: rec["input"] for rec in manifest.files.values() if rec["status"] == "done" and rec["input"] not in pending
             for o in rec["outputs"]}
    for f, fact in zip(result.pending, facts):
        if "error" in fact:
            result.failed[f["input"]] = fact["error"]
            continue
        f["columns"] = fact["schema"].names
        note = _columns_note(fact["schema"], reference)
        if note:
            result.notes[f["input"]] = note
        split = _split(fact["row_groups"], cfg.rows_per_file)
        outputs = [part_name(f["input"], k, len(split)) for k in range(len(split))]
        taken = [o for o in outputs if o in names]
        if taken:
            result.failed[f["input"]] = f"output name {taken[0]} is also {names[taken[0]]}'s; rename one of the two inputs"
            continue
        names.update(dict.fromkeys(outputs, f["input"]))
        for k, groups in enumerate(split):
            result.parts.append({
                "input": f["input"], "path": f["path"], "fingerprint": f["fingerprint"], "part": k, "parts": len(split),
                "row_groups": groups, "rows": sum(fact["row_groups"][g] for g in groups), "output": outputs[k],
            })
    return result


class PartLabeller:
    """Ray Data actor: labels whole parts, one output file each, written atomically."""

    def __init__(self, cfg: dict[str, Any], input_url: str, output_url: str, model_id: str):
        self.cfg = LabelConfig(**cfg)
        threads = self.cfg.threads_per_actor or max(1, round(self.cfg.cpus_per_actor))
        self.scorer = predict.Scorer(self.cfg.model, self.cfg.batch_size, self.cfg.use_gpu, self.cfg.quantize,
                                     threads, self.cfg.recheck_margin)
        self.src = storage.resolve(input_url)
        self.out = storage.resolve(output_url)
        self.model_id = model_id

    def _prepare(self, batch: pa.RecordBatch):
        """Texts, tokens, truncation flags and skip reasons of one read batch (runs beside the model)."""
        texts, reasons = predict.texts_of(batch.column(self.cfg.text_column))
        tokens, truncated = predict.tokenize(self.cfg.model, texts, self.cfg.max_length)
        return batch, tokens, truncated, reasons

    def _labelled(self, batch: pa.RecordBatch, tokens, truncated, reasons) -> pa.Table:
        table = pa.Table.from_batches([batch])
        p = self.cfg.label_prefix
        for name, column in self.scorer.columns(tokens, p).items():
            table = table.append_column(name, column)
        skipped = np.array([r is not None for r in reasons], dtype=bool)
        table = table.append_column(p + "truncated", pa.array(truncated, mask=skipped))
        return table.append_column(p + "skip_reason", pa.array(reasons, type=pa.string()))

    def label_part(self, part: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        result = {"input": part["input"], "part": int(part["part"]), "output": part["output"], "rows_in": 0,
                  "rows_out": 0, "skipped": "{}", "truncated": 0, "error": None, "seconds": 0.0}
        try:
            with self.src.fs.open_input_file(part["path"]) as fh:
                reader = pq.ParquetFile(fh)
                batches = reader.iter_batches(batch_size=16 * self.cfg.batch_size, row_groups=list(part["row_groups"]),
                                              use_threads=False)
                sink, writer, skipped, truncated = pa.BufferOutputStream(), None, Counter(), 0
                with ThreadPoolExecutor(1) as ahead:
                    def step():
                        batch = next(batches, None)
                        return None if batch is None else self._prepare(batch)
                    pending = ahead.submit(step)
                    while (item := pending.result()) is not None:
                        pending = ahead.submit(step)  # read and tokenize the next batch while this one runs
                        table = self._labelled(*item)
                        if writer is None:
                            meta = {"textlabel.input": part["input"], "textlabel.input_version": part["fingerprint"],
                                    "textlabel.part": f"{part['part']}/{part['parts']}", "textlabel.model": self.model_id}
                            writer = pq.ParquetWriter(sink, table.schema.with_metadata({**(table.schema.metadata or {}), **meta}))
                        writer.write_table(table)
                        result["rows_in"] += item[0].num_rows
                        skipped.update(r for r in item[3] if r is not None)
                        truncated += int(item[2].sum())
                if writer is None:
                    raise data_lib.DataError("the part has no rows")
                writer.close()
            if result["rows_in"] != part["rows"]:
                raise data_lib.DataError(f"read {result['rows_in']} rows where the footer says {part['rows']}")
            data = sink.getvalue()
            storage.write_bytes(self.out.join(*part["output"].split("/")), data)
            result.update(rows_out=pq.read_metadata(pa.BufferReader(data)).num_rows, skipped=json.dumps(dict(skipped)),
                          truncated=truncated)
        except Exception as exc:  # this part (so its file) fails; the run goes on
            result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.label_part(part) for part in batch.to_pylist()])


def _file_record(f: dict[str, Any], results: list[dict[str, Any]], model_id: str, run_id: str, note: str | None) -> dict[str, Any]:
    errors = [r["error"] for r in sorted(results, key=lambda r: r["part"]) if r["error"]]
    skipped: Counter = Counter()
    for r in results:
        skipped.update(json.loads(r["skipped"]))
    return {
        "input": f["input"], "fingerprint": f["fingerprint"], "size": f["size"],
        "status": "failed" if errors else "done", "error": errors[0] if errors else None,
        "outputs": [] if errors else [r["output"] for r in sorted(results, key=lambda r: r["part"])],
        "rows_in": sum(r["rows_in"] for r in results), "rows_out": 0 if errors else sum(r["rows_out"] for r in results),
        "rows_skipped": dict(skipped), "rows_truncated": sum(r["truncated"] for r in results),
        "note": note, "model": model_id, "run": run_id, "seconds": round(sum(r["seconds"] for r in results), 2),
        "recorded_at": _now(),
    }


def _output_files(out: storage.Location) -> list:
    return storage.list_files(out, ".parquet") if storage.exists(out) else []


def _prepare_output(cfg: LabelConfig, out: storage.Location, manifest: Manifest, present: list) -> int:
    """Refuse a foreign output prefix; delete files a killed run wrote but never recorded."""
    if present and not manifest.found:
        raise data_lib.DataError(
            f"--output {cfg.output} holds Parquet files but no textlabel manifest (_manifest.json); "
            "write labels to a prefix of their own")
    vouched = manifest.outputs()
    orphans = [f for f in present if f.path[len(out.path):].lstrip("/") not in vouched]
    if storage.fsspec_of(out.fs) is None and storage.exists(out):  # a local disk: half-written temporary files
        orphans += [f for f in out.fs.get_file_info(storage.pafs.FileSelector(out.path, recursive=True))
                    if f.type == storage.pafs.FileType.File and f.base_name.startswith(".") and f.base_name.endswith(".tmp")]
    storage.delete_many(out.fs, [f.path for f in orphans])
    if orphans:
        logger.info("deleted %d output file(s) an interrupted run wrote but never recorded", len(orphans))
    return len(orphans)


def _check_model(cfg: LabelConfig, manifest: Manifest, model_id: str) -> None:
    if manifest.input and manifest.input.rstrip("/") != cfg.input.rstrip("/"):
        raise ConfigError([f"--output {cfg.output} holds the labels of --input {manifest.input}, not {cfg.input}; "
                           "give each corpus its own --output"])
    manifest.input = cfg.input
    if cfg.relabel or cfg.keep_old_labels:
        return
    others = sorted({r["model"] for r in manifest.files.values() if r["status"] == "done" and r["model"] != model_id})
    if others:
        raise ConfigError([
            f"--output {cfg.output} holds labels from another model ({others[0]}); this run's is {model_id}. "
            "Pass --relabel to relabel every file with this model, --keep-old-labels to label only new files "
            "with it, or write to a new --output"])


def run_labelling(cfg: LabelConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Label every input file not yet labelled; returns the run's summary (also in OUTPUT/_summary.json).

    Everything that needs no model (listing, the manifest, every file's footer) is done
    before ``start_ray`` is called; a run with nothing to do never starts Ray.
    Raises FilesFailed, after finishing everything else, when some file could not be labelled.
    """
    started, start = _now(), time.perf_counter()
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    src, out = storage.resolve(cfg.input), storage.resolve(cfg.output)
    root = src.path if storage.info(src).type != storage.pafs.FileType.File else src.path.rsplit("/", 1)[0]
    manifest = Manifest.load(out)
    present = _output_files(out)
    work = plan(cfg, src, root, manifest, {f.path[len(out.path):].lstrip("/") for f in present})
    _refuse_if_none_can_be_labelled(work)
    model_lib.check_model_dir(cfg.model)
    model_id = model_lib.identity(cfg.model)
    _check_model(cfg, manifest, model_id)
    if work.pending:
        added = predict.prediction_columns(cfg.model, cfg.label_prefix) + [cfg.label_prefix + c for c in OUTPUT_COLUMNS[3:]]
        _check_clashes(work, added)
        _refuse_if_none_can_be_labelled(work)
    orphans = _prepare_output(cfg, out, manifest, present)
    if work.lost:
        logger.warning("%d file(s) are recorded as labelled but their output is missing; labelling them again: %s",
                       len(work.lost), ", ".join(work.lost[:5]))
    if work.parts:
        if start_ray:
            start_ray()
        predict.check_cluster_fits(dataclasses.replace(cfg, num_actors="%d,%d" % _pool(cfg, work)), spare_cpus=0)
    if not manifest.found:
        manifest.fold()  # claims the prefix before any output exists: a killed first night is resumed like any other
    logger.info("%d input files: %d labelled before and unchanged, %d to label in %d parts (%d rows), %d failed checks%s",
                len(work.files), work.unchanged, len(work.pending) - len(work.failed), len(work.parts),
                sum(p["rows"] for p in work.parts), len(work.failed), " (--relabel)" if cfg.relabel else "")
    by_input = {f["input"]: f for f in work.pending}
    records: list[dict[str, Any]] = []
    # A file about to be labelled again stops being vouched for first: if the run dies while its
    # parts are replaced, the next run labels it again instead of trusting a half-replaced output.
    replaced = [manifest.files[f["input"]] for f in work.pending if manifest.files.get(f["input"], {}).get("status") == "done"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda rec: manifest.record({**rec, "status": "labelling", "recorded_at": _now()}),
                      [rec for rec in replaced if rec["input"] not in work.failed]))
    old_outputs = {rec["input"]: set(rec["outputs"]) for rec in replaced}  # deleted once the new record is written

    def commit(rec: dict[str, Any]) -> None:
        manifest.record(rec)
        stale = old_outputs.get(rec["input"], set()) - set(rec["outputs"])
        if rec["status"] == "failed":  # a file is all there or not there: remove any part that made it
            stale |= {p["output"] for p in work.parts if p["input"] == rec["input"]}
        for name in stale:  # deleted only once the record no longer vouches for them
            storage.delete(out.join(*name.split("/")))
        records.append(rec)
        if rec["status"] == "failed":
            logger.error("FAILED %s: %s", rec["input"], rec["error"])

    crashed = None
    try:
        for name, reason in work.failed.items():
            f = by_input[name]
            commit({**_file_record(f, [], model_id, run_id, None), "status": "failed", "error": reason, "outputs": []})
        if work.parts:
            _label_parts(cfg, work, model_id, lambda name, results: commit(
                _file_record(by_input[name], results, model_id, run_id, work.notes.get(name))))
    except BaseException as exc:
        crashed = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # Even a run that dies here leaves its summary, and the records of every file it finished.
        try:
            manifest.fold()
            summary = _summary(cfg, work, records, manifest, model_id, run_id, started, time.perf_counter() - start, orphans)
            summary["crashed"] = crashed
            storage.write_json(out.join(SUMMARY), summary)
            storage.write_json(out.join(RUNS, f"{run_id}.json"), summary)
        except Exception:
            if crashed is None:
                raise
            logger.exception("could not write the summary of a run that failed")
    logger.info("run %s: %d files labelled (%d rows, %.0f rows/s), %d unchanged, %d failed; %d rows skipped %s, %d truncated; "
                "summary in %s", run_id, summary["files_labelled"], summary["rows_out"], summary["rows_per_second"],
                summary["files_unchanged"], summary["files_failed"], summary["rows_skipped_total"],
                summary["rows_skipped"] or "", summary["rows_truncated"], out.join(SUMMARY).url)
    if summary["files_failed"]:
        raise FilesFailed(f"{summary['files_failed']} input file(s) could not be labelled (see FAILED lines above and "
                          f"{out.join(SUMMARY).url}); every other file is labelled. Fix or remove them and rerun: "
                          "only they will be labelled")
    return summary


def _pool(cfg: LabelConfig, work: Plan) -> tuple[int, int]:
    """The actor pool's (min, max): no more actors than parts."""
    lo, hi = cfg.pool_size()
    hi = max(1, min(hi, len(work.parts)))
    return min(lo, hi), hi


def _label_parts(cfg: LabelConfig, work: Plan, model_id: str,
                 finish: Callable[[str, list[dict[str, Any]]], None]) -> None:
    """Stream the parts through the actor pool; ``finish`` each file as soon as all its parts are back."""
    import ray
    from ray.data import ActorPoolStrategy

    lo, hi = _pool(cfg, work)
    # Biggest parts first, so the night does not end waiting on one big file.
    parts = sorted(work.parts, key=lambda p: -p["rows"])
    ds = ray.data.from_items(parts, override_num_blocks=len(parts)).map_batches(
        PartLabeller, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "input_url": cfg.input, "output_url": cfg.output,
                               "model_id": model_id},
        compute=ActorPoolStrategy(min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=2),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor if cfg.use_gpu else 0,
    )
    left = Counter(p["input"] for p in parts)
    results: dict[str, list[dict[str, Any]]] = {}
    for row in ds.iter_rows():
        results.setdefault(row["input"], []).append(row)
        left[row["input"]] -= 1
        if left[row["input"]] == 0:
            finish(row["input"], results.pop(row["input"]))
    if results or any(left.values()):
        raise RuntimeError(f"{sum(left.values())} part(s) never came back from the actor pool; rerun to finish them")


def _summary(cfg: LabelConfig, work: Plan, records: list[dict[str, Any]], manifest: Manifest, model_id: str,
             run_id: str, started: str, seconds: float, orphans: int) -> dict[str, Any]:
    done = [r for r in records if r["status"] == "done"]
    failed = [r for r in records if r["status"] == "failed"]
    skipped: Counter = Counter()
    for r in done:
        skipped.update(r["rows_skipped"])
    rows_out = sum(r["rows_out"] for r in done)
    return {
        "run": run_id, "started_at": started, "finished_at": _now(), "input": cfg.input, "output": cfg.output,
        "model": model_id, "relabel": cfg.relabel,
        "files_found": len(work.files), "files_unchanged": work.unchanged, "files_labelled": len(done),
        "files_failed": len(failed), "failed": {r["input"]: r["error"] for r in failed},
        "files_with_other_columns": {r["input"]: r["note"] for r in done if r["note"]},
        "inputs_gone": work.gone, "outputs_missing_relabelled": work.lost, "orphans_deleted": orphans,
        "rows_in": sum(r["rows_in"] for r in done), "rows_out": rows_out,
        "rows_labelled": rows_out - sum(skipped.values()), "rows_skipped_total": sum(skipped.values()),
        "rows_skipped": dict(skipped), "rows_truncated": sum(r["rows_truncated"] for r in done),
        "output_files": sum(len(r["outputs"]) for r in manifest.files.values() if r["status"] == "done"),
        "output_rows": sum(r["rows_out"] for r in manifest.files.values() if r["status"] == "done"),
        "seconds": round(seconds, 2), "rows_per_second": round(rows_out / seconds, 1) if seconds else 0.0,
    }
