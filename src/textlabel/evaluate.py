"""The evaluation job: any saved model on any labelled data, through the labelling job's predictor.

A plain classifier is scored on --label-column; a multi-task model on each task whose
name is a column of the data (its rows with a label for that task), with a report per
task under OUTPUT/<task>/ and a table of the tasks in OUTPUT/report.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from textlabel import data as data_lib
from textlabel import model as model_lib
from textlabel import pool as pool_lib
from textlabel import storage
from textlabel.config import EvaluateConfig
from textlabel.predict import TableLabeller, output_columns
from textlabel.redact import redact
from textlabel.report import Scores, length_groups, write_report

logger = logging.getLogger(__name__)
ROWS_PER_BLOCK = 2000


def _read(cfg: EvaluateConfig, tasks: list[model_lib.Task]) -> tuple[pa.Table, dict[str, int]]:
    """Text and one encoded label column per task (-1 where a row has no label for it)."""
    if tasks[0].name is None:
        rows = data_lib.read_labelled(cfg.data, cfg.text_column, cfg.label_column)
        return pa.table({"text": rows.table["text"], "y:": data_lib.label_ids(rows.table["label"], list(tasks[0].labels),
                                                                           cfg.data)}), rows.dropped
    rows = data_lib.read_multilabelled(cfg.data, cfg.text_column, [t.name for t in tasks])
    ids = {f"y:{t.name}": data_lib.label_ids(rows.table[t.name], list(t.labels), cfg.data) for t in tasks}
    return pa.table({"text": rows.table["text"], **ids}), rows.dropped


def _predict(cfg: EvaluateConfig, table: pa.Table, tasks: list[model_lib.Task]) -> pa.Table:
    """The predicted label ids of every row, in row order, through an actor pool of predict.TableLabeller."""
    from ray.data import ActorPoolStrategy

    blocks = -(-table.num_rows // ROWS_PER_BLOCK)
    pool = pool_lib.for_job(cfg, blocks)
    chunked = cfg.long().chunked
    ids = [c for c in output_columns([t.name for t in tasks], "pred_", chunked) if c.endswith(("label_id", "score"))]
    extra = ["pred_truncated"] + (["pred_chunks"] if chunked else [])
    rows = table.select(["text"]).append_column("row_id", pa.array(np.arange(table.num_rows)))
    ds = data_lib.to_dataset(rows, blocks).map_batches(
        TableLabeller, batch_format="pyarrow", batch_size=ROWS_PER_BLOCK,
        fn_constructor_kwargs={"model": cfg.model, "text_column": "text", "max_length": cfg.max_length, "prefix": "pred_",
                               "options": cfg.predictor_options(pool.threads),
                               "long_texts": dataclasses.asdict(cfg.long())},
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor if cfg.use_gpu else 0)
    predicted = pa.concat_tables(ds.select_columns(["row_id", *ids, *extra]).iter_batches(batch_format="pyarrow")).sort_by("row_id")
    if predicted.num_rows != table.num_rows:
        raise RuntimeError(f"predicted {predicted.num_rows} of {table.num_rows} rows; see the Ray Data log above")
    names = [f"{t.name or ''}{suffix}" for t in tasks for suffix in ("", ":score")]
    return predicted.drop_columns(["row_id"]).rename_columns(names + [c[len("pred_"):] for c in extra])


def _task_report(out: storage.Location, task: model_lib.Task, y_true: np.ndarray, y_pred: np.ndarray,
                 texts: np.ndarray, predicted: pa.Table, fitted: dict | None) -> dict[str, Any]:
    has = y_true >= 0  # rows with a label for this task
    score = predicted[f"{task.name or ''}:score"].to_numpy()[has]
    name = f"scores (T={fitted['temperature']:.2f}, as labelling gives them)" if fitted else "scores (uncalibrated model)"
    scores = Scores({name: (score, y_pred[has] == y_true[has])}, fitted)
    chunks = predicted["chunks"].to_numpy(zero_copy_only=False)[has] if "chunks" in predicted.column_names else None
    truncated = predicted["truncated"].fill_null(False).to_numpy(zero_copy_only=False)[has]
    groups = length_groups(y_true[has], y_pred[has], chunks, truncated)
    metrics = write_report(out, list(task.labels), y_true[has], y_pred[has], list(texts[has]), by_length=groups, scores=scores)
    return {"rows": int(has.sum()), "labels": list(task.labels), **metrics}


def _long_text_counts(cfg: EvaluateConfig, predicted: pa.Table) -> dict[str, Any]:
    counts = {"mode": cfg.long_texts, "rows_truncated": pc.sum(predicted["truncated"]).as_py() or 0}
    if cfg.long().chunked:
        counts |= {"rows_chunked": pc.sum(pc.greater(predicted["chunks"], 1)).as_py() or 0,
                   "windows": pc.sum(predicted["chunks"]).as_py() or 0}
    return counts


def run_evaluation(cfg: EvaluateConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Predict every labelled row with the model; write metrics.json and the report(s) under --output.
    ``start_ray`` joins or starts Ray once the model and the data have been checked."""
    start = time.perf_counter()
    model_lib.check_model_dir(cfg.model)
    model_lib.check(cfg.model, cfg.max_length)
    tasks = model_lib.tasks_of(cfg.model)
    table, dropped = _read(cfg, tasks)
    if start_ray is not None:
        start_ray()
    predicted = _predict(cfg, table, tasks)
    out, texts = storage.resolve(cfg.output), np.array(table["text"].to_pylist(), dtype=object)
    fitted = model_lib.calibration_of(model_lib.local_model_dir(cfg.model)) or [None] * len(tasks)
    if tasks[0].name is None:
        metrics = _task_report(out, tasks[0], table["y:"].to_numpy(), predicted[""].to_numpy(), texts, predicted, fitted[0])
    else:
        per_task = {t.name: _task_report(out.join(t.name), t, table[f"y:{t.name}"].to_numpy(), predicted[t.name].to_numpy(),
                                         texts, predicted, f) for t, f in zip(tasks, fitted)}
        metrics = {"tasks": per_task, "accuracy": float(np.mean([m["accuracy"] for m in per_task.values()])),
                   "macro_f1": float(np.mean([m["macro_f1"] for m in per_task.values()]))}
        lines = ["# Evaluation report (multi-task)", "", "| task | classes | rows | accuracy | macro-F1 |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| [{n}]({n}/report.md) | {len(m['labels'])} | {m['rows']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |"
                  for n, m in per_task.items()]
        storage.write_bytes(out.join("report.md"), ("\n".join(lines) + "\n").encode())
    summary = {"model": redact(cfg.model), "data": redact(cfg.data), "rows": table.num_rows, "dropped_rows": dropped,
               "seconds": round(time.perf_counter() - start, 1), **metrics}
    summary["long_texts"] = _long_text_counts(cfg, predicted)
    storage.write_json(out.join("metrics.json"), summary)
    eces = [v for m in ([metrics] if tasks[0].name is None else metrics["tasks"].values()) for v in m["scores"]["ece"].values()]
    logger.info("accuracy %.4f, macro-F1 %.4f, ECE %s on %d rows (%s); report in %s", metrics["accuracy"], metrics["macro_f1"],
                ", ".join(f"{v:.4f}" for v in eces), table.num_rows,
                ", ".join(f"{k} {v}" for k, v in summary["long_texts"].items()), out.join("report.md").url)
    return summary
