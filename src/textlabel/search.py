"""Hyperparameter search on Ray Tune: N training runs (trials), bad ones stopped early, the best one exported.

Each trial is a whole training run (``train.run_training``) with its own Ray Train workers, written to
``OUTPUT/trials/<trial id>/`` like any training output, and reporting each epoch's validation figures to Tune.
ASHA (asynchronous successive halving) stops a trial whose validation macro-F1 after an epoch falls in the
bottom half of what the trials before it reached at that epoch. At the end::

    OUTPUT/best/         the best trial's model/, report/ and metrics.json (by the exported model's macro-F1)
    OUTPUT/trials.parquet every trial: its settings, status, epochs, best figures, wall time, output
    OUTPUT/search.png    validation macro-F1 per epoch of every trial
    OUTPUT/search/       Ray Tune's state: rerunning the same command resumes an interrupted search

A resumed search keeps the trials that finished; a trial that was running resumes from its own last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from textlabel import storage, tracking
from textlabel.config import ConfigError, SearchConfig, TrainConfig, _field_types
from textlabel.redact import redact_values

logger = logging.getLogger(__name__)

METRIC = "val_macro_f1"
TUNE_DIR = "search"
# What a search space may set, and the distributions it may draw them from.
TUNABLE = ("learning_rate", "head_learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay", "max_length",
           "tasks", "lora_rank", "lora_alpha", "lora_dropout", "early_stopping_patience")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")
# Without --search-space: the rates (the new heads' and the encoder's), the batch, warmup and decay.
DEFAULT_SPACE: dict[str, dict[str, list]] = {
    "learning_rate": {"loguniform": [2e-5, 2e-4]},
    "head_learning_rate": {"loguniform": [2e-4, 5e-3]},
    "batch_size": {"choice": [16, 32]},
    "warmup_ratio": {"choice": [0.0, 0.1]},
    "weight_decay": {"choice": [0.0, 0.01]},
}


def load_space(path: str | None) -> dict[str, dict[str, list]]:
    """A search space from YAML (``option: {distribution: [arguments]}``), checked; the default without one."""
    if path is None:
        return DEFAULT_SPACE
    file = Path(path)
    if not file.is_file():
        raise ConfigError([f"--search-space {path}: no such file"])
    space = yaml.safe_load(file.read_text()) or {}
    problems = space_problems(space)
    if problems:
        raise ConfigError([f"--search-space {path}: {p}" for p in problems])
    return space


def space_problems(space: Any) -> list[str]:
    """What is wrong with a search space, one line each."""
    if not isinstance(space, dict) or not space:
        return ["expected a mapping of option: {distribution: [arguments]}, e.g. learning_rate: {loguniform: [1e-5, 1e-4]}"]
    problems = []
    for option, spec in space.items():
        if option not in TUNABLE:
            problems.append(f"{option!r} cannot be searched; these can: {', '.join(TUNABLE)}")
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            problems.append(f"{option}: expected one of {', '.join(DISTRIBUTIONS)} with its arguments, e.g. "
                            f"{{choice: [16, 32]}}; got {spec!r}")
            continue
        (kind, args), = spec.items()
        if not isinstance(args, list) or not args:
            problems.append(f"{option}: {kind} needs a list of values or [low, high], got {args!r}")
        elif kind in ("loguniform", "uniform", "randint") and (len(args) != 2 or not all(isinstance(a, (int, float)) for a in args)
                                                                or not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0)):
            problems.append(f"{option}: {kind} takes [low, high] with 0 {'<' if kind == 'loguniform' else '<='} low < high, "
                            f"got {args!r}")
    return problems


def param_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The search space as Ray Tune's distributions."""
    from ray import tune

    made = {}
    for option, spec in space.items():
        (kind, args), = spec.items()
        made[option] = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
                        "randint": lambda a: tune.randint(a[0], a[1] + 1), "choice": tune.choice,
                        "grid": tune.grid_search}[kind](args)
    return made


def trial_config(base: TrainConfig, drawn: dict[str, Any], output: str) -> TrainConfig:
    """One trial's training settings: the search's, what the trial drew, its own output; nothing registered."""
    types = _field_types(TrainConfig)
    values = {k: (v if types[k] is list else types[k](v)) for k, v in drawn.items()}
    cfg = dataclasses.replace(base, **values, output=output, mlflow_register=None)
    cfg.validate()
    return cfg


def concurrency(cfg: TrainConfig, cluster: dict[str, float]) -> int:
    """Trials that fit the cluster at once: each holds num_workers workers (a GPU each, or cpus_per_worker CPUs)."""
    if cfg.use_gpu:
        return max(1, int(cluster.get("GPU", 0) // cfg.num_workers))
    return max(1, int(cluster.get("CPU", 0) // (cfg.num_workers * cfg.cpus_per_worker)))


def _trial(drawn: dict[str, Any], base: dict[str, Any], output: str) -> None:
    """A Tune trial: one training run, reporting each epoch to Tune (from the rank-0 worker, via Ray Train)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from textlabel.cli import setup_logging
    from textlabel.train import run_training

    setup_logging()  # the trial's own process: its driver-side lines (data read, export) reach the job's log
    trial = tune.get_context().get_trial_id()
    cfg = trial_config(TrainConfig(**base), drawn, f"{output.rstrip('/')}/trials/{trial}")
    run_training(cfg, callbacks=[TuneReportCallback()])


def run_search(search: SearchConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a search; returns its summary (also in OUTPUT/search.json)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from textlabel.train import check_model, prepare_data

    cfg = search.train_config()
    tracking.tracking_uri(cfg.mlflow_tracking_uri)  # a malformed one fails here, before the data is read
    space = load_space(search.search_space)
    out = storage.resolve(cfg.output)
    # Every trial's settings are checked, and the data read once, before Ray starts.
    check_model(cfg)
    prepare_data(cfg)
    # search_config.json holds the settings redacted (redact.py); an older one's are redacted to compare.
    record = {"config": redact_values(dataclasses.asdict(cfg)), "space": space, "num_samples": search.num_samples,
              "grace_period": search.grace_period, "reduction_factor": search.reduction_factor}
    saved = out.join("search_config.json")
    path = out.join(TUNE_DIR)
    resuming = storage.exists(saved)
    if resuming:
        before = redact_values(storage.read_json(saved))
        changed = sorted(k for k in record if before.get(k) != record[k] and k != "config")
        changed += sorted(k for k in record["config"] if before["config"].get(k) != record["config"][k]
                          and k not in ("cpus_per_worker", "max_failures"))
        if changed:
            raise ConfigError([f"--output {cfg.output} holds a search with different {', '.join(changed)}; use a new "
                               "--output, or rerun with the same settings to resume"])
    if start_ray is not None:
        start_ray()
    limit = search.max_concurrent_trials or concurrency(cfg, ray.cluster_resources())
    trainable = tune.with_parameters(_trial, base=dataclasses.asdict(cfg), output=cfg.output)
    # The trial only drives its Ray Train run, whose workers hold the CPUs or GPUs: it reserves none (Tune needs a
    # resource in a trial's request, so it asks for 1 MiB of memory).
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory([{"memory": 1 << 20}]))
    if resuming and tune.Tuner.can_restore(path.path, storage_filesystem=out.fs):
        logger.info("%s holds an interrupted search with the same settings: resuming it", cfg.output)
        tuner = tune.Tuner.restore(path.path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(space), storage_filesystem=out.fs)
    else:
        storage.write_json(saved, record)
        tuner = tune.Tuner(
            trainable, param_space=param_space(space),
            tune_config=tune.TuneConfig(
                num_samples=search.num_samples,
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=limit),
                scheduler=_asha(cfg.epochs, search)),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=out.path, storage_filesystem=out.fs,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    logger.info("searching %d trials over %s, %d at a time, ASHA on validation macro-F1 (grace %d epochs, "
                "reduction factor %g)", search.num_samples * _grid_size(space), ", ".join(space), limit,
                search.grace_period, search.reduction_factor)
    results = tuner.fit()
    summary = summarize(space, results, out)
    if cfg.mlflow_register:  # the best trial's run (each trial is tracked as its own run)
        _register_best(cfg, summary)
    return summary


def _register_best(cfg: TrainConfig, summary: dict[str, Any]) -> None:
    found = storage.read_json(storage.resolve(summary["best"]["output"]).join("metrics.json")).get("mlflow")
    if not found:
        return
    # The search's own URI (the trials were tracked there): metrics.json records it without its credentials.
    client = tracking._client(tracking.tracking_uri(cfg.mlflow_tracking_uri))
    summary["registered"] = {"name": cfg.mlflow_register, "version": tracking.register_version(
        client, cfg.mlflow_register, found["model_uri"], found["run_id"])}
    storage.write_json(storage.resolve(cfg.output).join("search.json"), summary)


def _asha(epochs: int, search: SearchConfig):
    """ASHA on validation macro-F1 per epoch, which never stops a trial at its last epoch: that trial is about to
    export its model (a stop there would lose it, and it costs nothing more to let it finish)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class LastEpochSpared(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if result.get("epoch", 0) >= epochs:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return LastEpochSpared(time_attr="epoch", metric=METRIC, mode="max", max_t=epochs, stop_last_trials=False,
                           grace_period=min(search.grace_period, epochs), reduction_factor=search.reduction_factor)


def _trial_id(path: str | None) -> str:
    """A trial's id from its Tune directory (``_trial_<id>_<n>_<settings>``), for a trial that never reported."""
    parts = Path(path or "").name.split("_")
    return parts[2] if len(parts) > 2 and parts[1] == "trial" else Path(path or "?").name


def _grid_size(space: dict[str, dict[str, list]]) -> int:
    return math.prod(len(spec["grid"]) for spec in space.values() if "grid" in spec)


def summarize(space: dict[str, Any], results, out: storage.Location) -> dict[str, Any]:
    """trials.parquet, search.png and OUTPUT/best/ from a finished search."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id(result.path)
        trial_out = out.join("trials", trial_id)
        metrics_file = trial_out.join("metrics.json")
        finished = storage.exists(metrics_file)
        metrics = storage.read_json(metrics_file) if finished else None
        curve = result.metrics_dataframe
        if metrics:  # a finished trial's own record of every epoch (a resumed trial's too)
            epochs, f1s = [e["epoch"] for e in metrics["epochs"]], [e[METRIC] for e in metrics["epochs"]]
        else:
            epochs = curve["epoch"].tolist() if curve is not None and "epoch" in curve else []
            f1s = curve[METRIC].tolist() if curve is not None and METRIC in curve else []
        status = ("errored" if result.error else "completed" if finished else "stopped early (ASHA)")
        best = metrics["validation"] if metrics else (
            {METRIC: max(f1s), "val_accuracy": curve["val_accuracy"].tolist()[f1s.index(max(f1s))]} if f1s else {})
        rows.append({
            "trial_id": trial_id, "status": status,
            **{k: result.config.get(k) for k in space},
            "epochs_run": len(epochs), "best_epoch": metrics["best_epoch"] if metrics else (f1s.index(max(f1s)) + 1 if f1s else None),
            "val_macro_f1": best.get(METRIC), "val_accuracy": best.get("val_accuracy"),
            "val_macro_f1_per_epoch": f1s,
            "wall_seconds": round(float(curve["time_total_s"].max()), 1) if curve is not None and "time_total_s" in curve else None,
            "output": trial_out.url,
        })
    rows.sort(key=lambda r: r["trial_id"])
    table = pa.Table.from_pylist([{k: (str(v) if k in space and isinstance(v, list) else v) for k, v in r.items()}
                                  for r in rows])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(out.join("trials.parquet"), buffer.getvalue())
    storage.write_bytes(out.join("search.png"), search_png(rows))
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        raise RuntimeError(f"no trial of the search finished; see {out.join('trials.parquet').url} and the Tune log above")
    best = max(done, key=lambda r: (r["val_macro_f1"], -r["epochs_run"]))
    src = storage.resolve(best["output"])
    for part in ("model", "report"):
        storage.copy_tree(src.join(part), out.join("best", part))
    storage.write_bytes(out.join("best", "metrics.json"), storage.read_bytes(src.join("metrics.json")))
    summary = {"trials": len(rows), "completed": len(done),
               "stopped_early": sum(r["status"].startswith("stopped") for r in rows),
               "errored": sum(r["status"] == "errored" for r in rows),
               "best": {k: best[k] for k in ("trial_id", "val_macro_f1", "val_accuracy", "best_epoch", "output")
                        } | {"settings": {k: best[k] for k in space}},
               "model": out.join("best", "model").url}
    storage.write_json(out.join("search.json"), summary)
    logger.info("search done: %d trials, %d completed, %d stopped early, %d errored; best %s (validation macro-F1 %.4f, "
                "accuracy %.4f) with %s; its model in %s", summary["trials"], summary["completed"], summary["stopped_early"],
                summary["errored"], best["trial_id"], best["val_macro_f1"], best["val_accuracy"],
                summary["best"]["settings"], summary["model"])
    return summary


def search_png(rows: list[dict[str, Any]]) -> bytes:
    """Validation macro-F1 per epoch of every trial: completed trials solid, stopped ones dashed, the best thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from textlabel.report import _png

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    done = [r for r in rows if r["status"] == "completed" and r["val_macro_f1"] is not None]
    best = max(done, key=lambda r: r["val_macro_f1"])["trial_id"] if done else None
    for r in rows:
        f1s = r["val_macro_f1_per_epoch"]
        if not f1s:
            continue
        ax.plot(range(1, len(f1s) + 1), f1s, "o-" if r["status"] == "completed" else "o--",
                linewidth=3 if r["trial_id"] == best else 1, label=f"{r['trial_id']} ({r['status']})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation macro-F1")
    ax.set_title("Search: every trial (ASHA stops the dashed ones)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data
