"""The fine-tuning job: check the data, run Ray Train, export the model and metrics.

``OUTPUT/`` after a run::

    model/           Hugging Face format (config.json with id2label, model.safetensors, tokenizer)
    metrics.json     every epoch's metrics, the label map, dropped rows, throughput
    run_config.json  the settings this output was trained with (a rerun must match them)
    checkpoints/     Ray Train checkpoints, one per epoch (the latest two are kept)
    report/          report.md, confusion_matrix.png, training_curves.png (with a TF-IDF baseline)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
from ray.train.torch import TorchTrainer

from textlabel import data as data_lib
from textlabel import family as family_lib
from textlabel import model as model_lib
from textlabel import predict, progress, storage, tracking
from textlabel.config import ConfigError, TrainConfig
from textlabel.lora import ADAPTER_DIR
from textlabel.redact import redact_values
from textlabel.report import Scores, length_groups, tfidf_baseline, write_report
from textlabel.train_loop import (HISTORY_FILE, IMPROVED, PREDICTIONS_FILE, LoopSettings, best_epoch, settings_dict,
                                  train_loop_per_worker)

logger = logging.getLogger(__name__)

# Settings that may change between a run and its resumption without changing the result
# (the worker count and device change the global batch and the optimizer state's device).
_RESUMABLE_CHANGES = {"cpus_per_worker", "max_failures", "progress_seconds", "mlflow_tracking_uri", "mlflow_experiment", "mlflow_register"}


@dataclasses.dataclass
class PreparedData:
    """Training and validation rows, ready for Ray Train."""

    train: pa.Table
    validation: pa.Table
    labels: list[str]  # the first task's (the only one's, for a single task)
    dropped: dict[str, dict[str, int]]
    tasks: list[dict] = dataclasses.field(default_factory=list)  # name, labels, weight, column
    # With --long-texts chunk: the rows as token windows (what Ray Train reads instead of train and validation),
    # and the windows of each validation row.
    train_windows: pa.Table | None = None
    validation_windows: pa.Table | None = None
    validation_cut: predict.Prepared | None = None

    def by_length(self, rows: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any] | None:
        """Accuracy of the chunked validation rows beside the short ones (report.length_groups), for ``rows``."""
        if self.validation_cut is None:
            return None
        return length_groups(y_true, y_pred, self.validation_cut.chunks[rows], self.validation_cut.truncated[rows])

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 1

    @property
    def train_inputs(self) -> pa.Table:
        return self.train if self.train_windows is None else self.train_windows

    @property
    def validation_inputs(self) -> pa.Table:
        return self.validation if self.validation_windows is None else self.validation_windows


def _windows(cfg: TrainConfig, table: pa.Table, seed: int | None = None) -> tuple[pa.Table, predict.Prepared]:
    """Each row's token windows, cut as the labelling job cuts them, one dataset row each with the row's labels
    (and row_id); and the windows per row. ``seed``: shuffle the windows (a document's are adjacent)."""
    prepared = predict.chunk(cfg.model, table["text"].to_pylist(), cfg.max_length, cfg.long())
    windows = table.drop_columns(["text"]).take(pa.array(prepared.owner))
    windows = windows.append_column("input_ids", pa.array(prepared.windows, pa.list_(pa.int32())))
    if seed is not None:
        windows = windows.take(np.random.default_rng(seed).permutation(windows.num_rows))
    return windows, prepared


def _read(cfg: TrainConfig, url: str, tasks: list[dict] | None = None) -> tuple[pa.Table, list[dict], dict[str, int]]:
    """Encoded rows of one input and the tasks (label maps are made from the first input read)."""
    spec = cfg.task_list()
    if len(spec) == 1:
        rows = data_lib.read_labelled(url, cfg.text_column, spec[0][0])
        tasks = tasks or [{"name": spec[0][0], "labels": data_lib.label_map(rows, url), "weight": spec[0][1], "column": "label_id"}]
        return data_lib.encode_labels(rows, tasks[0]["labels"], url), tasks, rows.dropped
    rows = data_lib.read_multilabelled(url, cfg.text_column, [c for c, _ in spec])
    tasks = tasks or [{"name": c, "labels": data_lib.label_map(rows, url, c), "weight": w, "column": f"label_id:{c}"}
                      for c, w in spec]
    table = pa.table({"text": rows.table["text"],
                      **{t["column"]: data_lib.label_ids(rows.table[t["name"]], t["labels"], url) for t in tasks}})
    return table, tasks, rows.dropped


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Read, clean, encode and split the rows; every input problem surfaces here."""
    table, tasks, dropped_rows = _read(cfg, cfg.data)
    labels = tasks[0]["labels"]
    dropped = {"data": dropped_rows}
    if cfg.validation_data:
        validation, _, dropped["validation_data"] = _read(cfg, cfg.validation_data, tasks)
        train = table
    else:
        train, validation = data_lib.stratified_split(table, cfg.val_fraction, cfg.seed)
    # A seeded global shuffle: inputs sorted by class would otherwise give one-class batches.
    train = train.take(np.random.default_rng(cfg.seed).permutation(train.num_rows))
    if train.num_rows < cfg.num_workers:
        raise data_lib.DataError(f"{cfg.data}: {train.num_rows} training rows cannot feed {cfg.num_workers} workers")
    for t in tasks if len(tasks) > 1 else []:
        for name, part in (("training", train), ("validation", validation)):
            if not (part[t["column"]].to_numpy() >= 0).any():
                raise data_lib.DataError(f"task {t['name']!r} has no labelled {name} rows; every task needs some in both "
                                         "(give more rows, a larger --val-fraction or other --validation-data)")
    validation = validation.append_column("row_id", pa.array(range(validation.num_rows), pa.int64()))
    prepared = PreparedData(train, validation, labels, dropped, tasks)
    if cfg.long().chunked:  # after the split: a document's windows stay in its split
        prepared.train_windows, cut = _windows(cfg, train, seed=cfg.seed)
        prepared.validation_windows, prepared.validation_cut = _windows(cfg, validation)
        logger.info("--long-texts chunk: %d training rows are %d windows (%d rows chunked); %d validation rows are %d",
                    train.num_rows, prepared.train_windows.num_rows, int((cut.chunks > 1).sum()), validation.num_rows,
                    prepared.validation_windows.num_rows)
    return prepared


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's settings with its tasks in one form: --label-column x, the default and tasks: [x] are the same run."""
    config = dict(config)
    column, tasks = config.pop("label_column", None), config.pop("tasks", None)
    if "task_list" not in config:
        columns = [column] if isinstance(column, str) else column
        config["task_list"] = [list(t) for t in TrainConfig(data="-", output="-", label_column=columns, tasks=tasks).task_list()]
    return config


def _check_resumable(out: storage.Location, cfg: TrainConfig, prepared: PreparedData) -> bool:
    """A rerun into the same output must be the same run; otherwise resuming would mix two. True when resuming.
    run_config.json holds the settings redacted (redact.py), and both sides are compared so."""
    labels = [t["labels"] for t in prepared.tasks] if prepared.multitask else prepared.labels
    record = {"config": _comparable(redact_values(dataclasses.asdict(cfg))), "labels": labels,
              "rows": [prepared.train.num_rows, prepared.validation.num_rows]}
    saved_loc = out.join("run_config.json")
    if not storage.exists(out.join("checkpoints", "checkpoint_manager_snapshot.json")):
        storage.write_json(saved_loc, record)  # nothing to resume yet: these settings start it
        return False
    saved = storage.read_json(saved_loc)
    saved["config"] = _comparable(redact_values(saved["config"]))
    changed = sorted(
        k for k in record["config"]
        if k not in _RESUMABLE_CHANGES and saved["config"].get(k) != record["config"][k]
    )
    if saved.get("labels") != labels:
        changed.append("labels (the data's label set)")
    if saved.get("rows") != record["rows"]:
        changed.append(f"rows (training/validation rows were {saved.get('rows')}, now {record['rows']})")
    if changed:
        raise ConfigError([f"--output {cfg.output} already holds a run with different {', '.join(changed)}; "
                           "use a new --output, or rerun with the same settings to resume"])
    logger.info("%s holds an earlier run with the same settings: resuming it", cfg.output)
    return True


def _finished(out: storage.Location, cfg: TrainConfig) -> dict[str, Any] | None:
    """metrics.json of a run (the same settings, checked before) with nothing left to do: trained, exported and
    reported, and tracked and registered as this rerun asks. None when something is left, such as a run whose
    MLflow server was gone when it ended (metrics.json is written before the MLflow run is finished)."""
    found = out.join("metrics.json")
    if not storage.exists(found):
        return None
    metrics = storage.read_json(found)
    tracked = metrics.get("mlflow") or {}
    uri = tracking.tracking_uri(cfg.mlflow_tracking_uri)
    if uri and not tracking.same_server(tracked.get("tracking_uri"), uri):  # (a resumed run keeps its experiment)
        return None
    if cfg.mlflow_register and (tracked.get("registered") or {}).get("name") != cfg.mlflow_register:
        return None
    return metrics


def _trainer(cfg: TrainConfig, prepared: PreparedData, out: storage.Location,
             run: tracking.Run | None = None, callbacks: list | None = None) -> TorchTrainer:
    settings = LoopSettings(
        model=cfg.model, tasks=prepared.tasks, multitask=prepared.multitask, epochs=cfg.epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length, seed=cfg.seed, use_gpu=cfg.use_gpu,
        steps_per_epoch=math.ceil(prepared.train_inputs.num_rows / (cfg.num_workers * cfg.batch_size)),
        lora=cfg.lora_settings(), head_learning_rate=cfg.head_learning_rate,
        early_stopping_patience=cfg.early_stopping_patience, progress_seconds=cfg.progress_seconds,
        mlflow={"tracking_uri": run.tracking_uri, "run_id": run.run_id} if run else None,
        label_counts=[np.bincount(ids[ids >= 0], minlength=len(t["labels"])).tolist()
                      for t in prepared.tasks for ids in [prepared.train[t["column"]].to_numpy()]],
    )
    # Ray Data's progress bars are for terminals; a log file or pipe gets the epoch lines (train_loop) instead.
    ray.data.DataContext.get_current().enable_progress_bars = progress.interactive()
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings_dict(settings),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="checkpoints", storage_path=out.path, storage_filesystem=out.fs, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # The best epoch's checkpoint (what is exported) and the latest (what a restart resumes from).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=IMPROVED,
                                                         checkpoint_score_order="max"),
        ),
        datasets={
            "train": data_lib.to_dataset(prepared.train_inputs, 8 * cfg.num_workers),
            "validation": data_lib.to_dataset(prepared.validation_inputs, 2 * cfg.num_workers),
        },
        # Validation is not split (a split may drop rows); workers take row_id % world each.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _best_checkpoint(result: ray.train.Result, epochs: list[dict]) -> tuple[ray.train.Checkpoint, int]:
    """The checkpoint of the epoch with the best validation macro-F1 (the earliest of equals), and that epoch."""
    best = best_epoch(epochs) + 1
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics.get("epoch") == best:
            return checkpoint, best
    raise RuntimeError(f"the checkpoint of epoch {best} (the best validation macro-F1) was not kept; see the Ray Train log")


def _export(checkpoint: ray.train.Checkpoint, out: storage.Location) -> dict[str, list]:
    """Copy the model files of a checkpoint to OUTPUT/model (and a LoRA run's adapter to OUTPUT/adapter);
    return its validation predictions."""
    src = storage.Location(checkpoint.path, checkpoint.filesystem, checkpoint.path)
    storage.copy_dir(src, out.join("model"), suffixes=model_lib.MODEL_FILE_SUFFIXES, exclude=(HISTORY_FILE, PREDICTIONS_FILE))
    if storage.exists(src.join(ADAPTER_DIR, "adapter_config.json")):
        storage.copy_dir(src.join(ADAPTER_DIR), out.join(ADAPTER_DIR))
    return storage.read_json(src.join(PREDICTIONS_FILE))


def _history(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """Every epoch's metrics, as the latest checkpoint records them."""
    return storage.read_json(storage.Location(checkpoint.path, checkpoint.filesystem, checkpoint.path).join(HISTORY_FILE))


def _scores(predictions: dict[str, Any], task: str | None, order: np.ndarray, keep: np.ndarray, y_true: np.ndarray,
            figures: dict[str, Any] | None) -> Scores | None:
    """Validation rows' scores before and after the task's temperature, for the report (None for a run resumed
    from a checkpoint written before temperatures were fitted)."""
    if figures is None or "score" not in predictions:
        return None

    def of(key: str) -> np.ndarray:
        values = predictions[key] if task is None else predictions[key][task]
        return np.asarray(values)[order][keep]

    after = f"after calibration (T={figures['temperature']:.2f})"
    return Scores({"before calibration": (of("score_before"), of("pred_before") == y_true),
                   after: (of("score"), of("pred") == y_true)}, figures)


def _report(out: storage.Location, prepared: PreparedData, predictions: dict[str, list], epochs: list[dict],
            best: dict[str, Any]) -> dict[str, Any]:
    """OUTPUT/report/: the exported model (the ``best`` epoch's) on the validation rows, beside a TF-IDF baseline on
    the same split; the curves show every epoch."""
    if prepared.multitask:
        return _multitask_report(out, prepared, predictions, epochs, best)
    order = np.argsort(predictions["row_id"])
    y_pred = np.asarray(predictions["pred"])[order]
    y_true = prepared.validation["label_id"].to_numpy()
    val_texts = prepared.validation["text"].to_pylist()
    baseline = tfidf_baseline(prepared.train["text"].to_pylist(), prepared.train["label_id"].to_numpy(),
                              val_texts, y_true, prepared.labels)
    every = np.arange(len(y_true))
    scores = _scores(predictions, None, order, every, y_true, best.get("val_calibration"))
    write_report(out.join("report"), prepared.labels, y_true, y_pred, val_texts, epochs, baseline,
                 prepared.by_length(every, y_true, y_pred), scores, best["epoch"])
    return baseline


def _multitask_report(out: storage.Location, prepared: PreparedData, predictions: dict[str, Any],
                      epochs: list[dict], best: dict[str, Any]) -> dict[str, Any]:
    """OUTPUT/report/<task>/ for each task (its rows only) and OUTPUT/report/report.md comparing them."""
    order = np.argsort(predictions["row_id"])
    texts = np.array(prepared.validation["text"].to_pylist(), dtype=object)
    train_texts = np.array(prepared.train["text"].to_pylist(), dtype=object)
    baselines, lines = {}, ["# Evaluation report (multi-task)", "",
                            "| task | classes | validation rows | accuracy | macro-F1 | TF-IDF accuracy | TF-IDF macro-F1 | weight |",
                            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in prepared.tasks:
        y_true = prepared.validation[t["column"]].to_numpy()
        y_pred = np.asarray(predictions["pred"][t["name"]])[order]
        valid = y_true >= 0
        train_ids = prepared.train[t["column"]].to_numpy()
        baseline = tfidf_baseline(list(train_texts[train_ids >= 0]), train_ids[train_ids >= 0], list(texts[valid]),
                                  y_true[valid], t["labels"])
        task_epochs = [{"epoch": e["epoch"], "train_loss": e["train_task_loss"][t["name"]], "val_loss": e["val_tasks"][t["name"]]["loss"],
                        "val_accuracy": e["val_tasks"][t["name"]]["accuracy"], "val_macro_f1": e["val_tasks"][t["name"]]["macro_f1"]}
                       for e in epochs]
        fitted = best["val_tasks"][t["name"]].get("calibration")
        scores = _scores(predictions, t["name"], order, valid, y_true[valid], fitted)
        metrics = write_report(out.join("report", t["name"]), t["labels"], y_true[valid], y_pred[valid], list(texts[valid]),
                               task_epochs, baseline, prepared.by_length(np.flatnonzero(valid), y_true[valid], y_pred[valid]),
                               scores, best["epoch"])
        baselines[t["name"]] = baseline
        lines.append(f"| [{t['name']}]({t['name']}/report.md) | {len(t['labels'])} | {int(valid.sum())} | {metrics['accuracy']:.4f} | "
                     f"{metrics['macro_f1']:.4f} | {baseline['accuracy']:.4f} | {baseline['macro_f1']:.4f} | {t['weight']} |")
    lines += ["", f"Epoch {best['epoch']} of {epochs[-1]['epoch']} (the exported model, best validation macro-F1). "
              f"Average over the tasks: accuracy {best['val_accuracy']:.4f}, macro-F1 {best['val_macro_f1']:.4f}. "
              "Training minimises the weighted sum of the tasks' losses; each task's report plots its own.", ""]
    storage.write_bytes(out.join("report", "report.md"), "\n".join(lines).encode())
    return baselines


def _calibration(out: storage.Location) -> list[dict]:
    found = out.join("model", model_lib.CALIBRATION_FILE)
    return storage.read_json(found)["tasks"] if storage.exists(found) else []


def check_model(cfg: TrainConfig) -> family_lib.Family:
    """Fail before Ray starts on a --model that cannot be fine-tuned as asked: its architecture, its tokenizer,
    --max-length against its positions, the LoRA target modules."""
    config = model_lib.check(cfg.model, cfg.max_length)
    if cfg.lora:
        from textlabel import lora

        found = lora.problems(config, lora.LoraSettings(**cfg.lora_settings()), len(cfg.task_list()) > 1)
        if found:
            raise ConfigError(found)
        if cfg.learning_rate < 1e-4:
            logger.warning("--lora at --learning-rate %g: adapters start at zero and learn slowly at full fine-tuning's "
                           "rate; 2e-3 matched full fine-tuning on SST-2 where 5e-4 did not (README, LoRA)", cfg.learning_rate)
    return family_lib.of(config)


def run_training(cfg: TrainConfig, start_ray: Callable[[], None] | None = None,
                 callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says; returns what metrics.json holds. ``start_ray`` joins or starts Ray once the
    data and the model have been checked (bad input fails in seconds, without Ray). ``callbacks``: Ray Train
    callbacks (a search's trial reports to Tune with one)."""
    start = time.perf_counter()
    uri = tracking.tracking_uri(cfg.mlflow_tracking_uri)  # a malformed one fails here, before anything is read
    out = storage.resolve(cfg.output)
    family = check_model(cfg)
    prepared = prepare_data(cfg)
    finished = _finished(out, cfg) if _check_resumable(out, cfg, prepared) else None
    if finished is not None:
        logger.info("%s: the run finished already (its metrics.json): nothing left to train, export or track",
                    cfg.output)
        return finished
    logger.info(
        "training %s on %d rows (%d validation), %d classes, %d workers",
        model_lib.describe(cfg.model), prepared.train.num_rows, prepared.validation.num_rows,
        len(prepared.labels), cfg.num_workers,
    )
    run = tracking.start_run(uri, cfg.mlflow_experiment, out, dataclasses.asdict(cfg)) if uri else None
    if start_ray is not None:
        start_ray()
    result = _trainer(cfg, prepared, out, run, callbacks).fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; see the Ray Train log above")
    history = _history(result.checkpoint)
    checkpoint, best = _best_checkpoint(result, history["epochs"])
    predictions = _export(checkpoint, out)
    baseline = _report(out, prepared, predictions, history["epochs"], history["epochs"][best - 1])
    metrics = redact_values({  # written to metrics.json and to MLflow: URI credentials redacted
        "model": model_lib.describe(cfg.model),
        "labels": prepared.labels,
        **({"tasks": [{k: t[k] for k in ("name", "labels", "weight")} for t in prepared.tasks]} if prepared.multitask else {}),
        "train_rows": prepared.train.num_rows,
        "validation_rows": prepared.validation.num_rows,
        "dropped_rows": prepared.dropped,
        "num_workers": cfg.num_workers,
        "model_family": {"model_type": family.model_type, "pooling": family.pooling, "positions": family.positions},
        **({"lora": cfg.lora_settings()} if cfg.lora else {}),
        **({"long_texts": {"mode": "chunk", "train_windows": prepared.train_windows.num_rows,
                           "validation_windows": prepared.validation_windows.num_rows,
                           "validation_rows_chunked": int((prepared.validation_cut.chunks > 1).sum())}}
           if prepared.validation_cut is not None else {}),
        "calibration": _calibration(out),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "best_epoch": best,
        "stopped_early": len(history["epochs"]) < cfg.epochs,
        "validation": history["epochs"][best - 1],  # the exported model's figures
        **history,
        "baseline_tfidf_logreg": baseline,
        **({"mlflow": {"tracking_uri": run.tracking_uri, "experiment": run.experiment, "run_id": run.run_id,
                       "model_uri": run.model_uri}} if run else {}),
    })
    storage.write_json(out.join("metrics.json"), metrics)
    if run:  # after metrics.json: the run's outputs are kept even when the tracking server is gone by now
        metrics["mlflow"] = tracking.finish_run(run, out, metrics, cfg.mlflow_register)
        storage.write_json(out.join("metrics.json"), metrics)
    final = metrics["validation"]
    logger.info(
        "done: validation accuracy %.4f, macro-F1 %.4f at epoch %d (the model exported); temperature %s (ECE %s); model in %s",
        final["val_accuracy"], final["val_macro_f1"], final["epoch"],
        ", ".join(f"{t['temperature']:.3f}" for t in metrics["calibration"]),
        ", ".join(f"{t['ece_before']:.4f} -> {t['ece_after']:.4f}" for t in metrics["calibration"]), out.join("model").url,
    )
    return metrics
