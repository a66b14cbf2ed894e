"""Typed job configurations, validated in one place, and the CLI built from them.

Each job has one dataclass. A field's ``metadata["help"]`` is its one-line
documentation; ``--help`` and the README are generated from the same text.
Values come from, lowest priority first: the field default, ``--config FILE.yaml``,
command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import yaml

if TYPE_CHECKING:
    from textlabel.chunking import LongTexts


class ConfigError(ValueError):
    """One or more configuration problems, each naming the option and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def _opt(default: Any, help: str, required: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "required": required})


@dataclass
class LongTextOptions:
    """What the jobs do with a text longer than --max-length tokens (chunking.py)."""

    long_texts: str = _opt("truncate", "Texts longer than --max-length tokens: truncate (read the first --max-length tokens; the row is flagged truncated) or chunk (score overlapping windows of --max-length tokens and combine their probabilities; the output gains a chunks column).")
    chunk_overlap: int | None = _opt(None, "With --long-texts chunk: tokens two consecutive windows share. Default: a quarter of --max-length.")
    max_chunks: int = _opt(64, "With --long-texts chunk: most windows scored per text (bounds the cost of a huge text); windows past it are counted (chunks_dropped) and the row flagged truncated.")

    def long(self) -> LongTexts:
        """These options as chunking.LongTexts."""
        from textlabel.chunking import LongTexts

        return LongTexts(self.long_texts, self.chunk_overlap, self.max_chunks)

    def _long_text_problems(self) -> list[str]:
        return self.long().problems(self.max_length)  # type: ignore[attr-defined]


@dataclass
class TrainConfig(LongTextOptions):
    """Configuration of the fine-tuning job (``jobs/train.py``)."""

    data: str = _opt("", "Training rows: a Parquet file or prefix (every *.parquet under it), or a .csv/.tsv file; local path, file:// or s3://.", True)
    output: str = _opt("", "Where the run writes model/, metrics.json and checkpoints/ (local path, file:// or s3://). Rerunning with the same output resumes.", True)
    validation_data: str | None = _opt(None, "Validation rows (same formats as --data). Without it, a seeded stratified --val-fraction of --data is held out.")
    model: str | None = _opt(None, "Base model: a Hugging Face hub id, a local directory or an s3:// directory. Default: the packaged all-MiniLM-L6-v2.")
    text_column: str = _opt("text", "Column holding the text.")
    label_column: list[str] | None = _opt(None, "Column holding the label (strings or integers); default label. Repeat it to train one model for several label sets on the same rows (--label-column coarse --label-column fine): a shared encoder, one head per task, a row's null labels masked out of the loss.")
    tasks: list[str] | None = _opt(None, "Tasks with loss weights, instead of --label-column: COLUMN=WEIGHT, repeatable (YAML: a list of {column: ..., weight: ...}); the loss is the weighted sum of the tasks' losses. Default weight 1.0.")
    val_fraction: float = _opt(0.2, "Share of --data held out for validation when --validation-data is not given.")
    num_workers: int = _opt(2, "Ray Train workers (one GPU each with --use-gpu).")
    use_gpu: bool = _opt(False, "Train on GPUs (one per worker), with bf16 autocast.")
    cpus_per_worker: float = _opt(1.0, "CPUs reserved per training worker.")
    epochs: int = _opt(5, "Most passes over the training rows (early stopping may end the run sooner); the model exported is the best epoch's.")
    batch_size: int = _opt(32, "Rows per optimizer step, per worker.")
    learning_rate: float = _opt(1e-4, "Peak AdamW learning rate of the pretrained weights (linear warmup, then linear decay).")
    head_learning_rate: float = _opt(1e-3, "Peak learning rate of the layers the base model did not have (the classification heads, a missing pooler), on the same schedule: a fresh head learns from nothing, the encoder only adjusts.")
    early_stopping_patience: int = _opt(1, "Stop when validation macro-F1 has not improved for this many epochs (0: run every --epochs).")
    warmup_ratio: float = _opt(0.1, "Share of all steps spent warming the learning rate up.")
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    max_length: int = _opt(128, "Longest tokenized row (special tokens included); longer rows are truncated, or cut into windows with --long-texts chunk. Batches pad to their own longest row.")
    seed: int = _opt(0, "Seed for the split, shuffling and initialisation.")
    max_failures: int = _opt(3, "Worker failures to recover from (from the latest checkpoint) before giving up.")
    progress_seconds: float = _opt(30.0, "Log one progress line (epoch, step, loss, samples/s) every this many seconds of an epoch (0: only each epoch's line).")
    lora: bool = _opt(False, "Fine-tune LoRA adapters (PEFT) instead of every weight, for a model too large to fine-tune whole per worker: the pretrained weights stay frozen, the new classification layers train in full. OUTPUT/model is saved merged (plain Hugging Face weights), OUTPUT/adapter holds the adapter. Needs PEFT: the lora extra (pip install -e '.[lora]'; cluster.yaml installs it).")
    lora_rank: int = _opt(8, "With --lora: rank r of each adapter's update.")
    lora_alpha: float = _opt(16.0, "With --lora: the update is scaled by alpha / r.")
    lora_dropout: float = _opt(0.1, "With --lora: dropout on the adapters' input.")
    lora_target_modules: list[str] | None = _opt(None, "With --lora: the layers to adapt, by module name (repeatable). Default: the family's attention query and value projections (README, Model families).")
    mlflow_tracking_uri: str | None = _opt(None, "Track the run in this MLflow server (default: MLFLOW_TRACKING_URI; neither: no tracking): settings, every epoch's metrics, the report and the model. Needs the mlflow extra.")
    mlflow_experiment: str = _opt("textlabel", "With tracking: the MLflow experiment the run is logged in.")
    mlflow_register: str | None = _opt(None, "With tracking: register the exported model as a new version of this registered model (models:/NAME/VERSION).")

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        problems = _missing_required(self)
        problems += self._lora_problems()
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        problems += _positive(self, ["num_workers", "epochs", "batch_size", "max_length", "learning_rate", "head_learning_rate",
                                     "cpus_per_worker"])
        if self.progress_seconds < 0:
            problems.append(f"--progress-seconds must be >= 0 (0: only each epoch's line), got {self.progress_seconds}")
        if self.mlflow_register and not (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            problems.append(f"--mlflow-register {self.mlflow_register} needs a tracking server: pass --mlflow-tracking-uri "
                            "or set MLFLOW_TRACKING_URI")
        if self.early_stopping_patience < 0:
            problems.append(f"--early-stopping-patience must be >= 0 (0: never stop early), got {self.early_stopping_patience}")
        problems += self._long_text_problems()
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_failures < -1:
            problems.append("--max-failures must be -1 (unlimited) or >= 0")
        try:
            tasks = self.task_list()
            columns = [c for c, _ in tasks]
            if self.text_column in columns:
                problems.append(f"--text-column and a label column are both {self.text_column!r}: name different columns")
            if len(set(columns)) < len(columns):
                problems.append(f"a label column is given twice: {columns}")
            if len(columns) > 1 and any(c == "text" or "/" in c for c in columns):
                problems.append(f"task label columns are also names of output columns and report folders: rename "
                                f"{[c for c in columns if c == 'text' or '/' in c]} (no 'text', no '/')")
            if any(w <= 0 for _, w in tasks):
                problems.append(f"task weights must be > 0, got {tasks}")
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError(problems)

    def _lora_problems(self) -> list[str]:
        import importlib.util

        if not self.lora:
            changed = [f"--{n.replace('_', '-')}" for n in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
                       if getattr(self, n) != TrainConfig.__dataclass_fields__[n].default]
            return [f"{', '.join(changed)}: LoRA options without --lora; add --lora or drop them"] if changed else []
        problems = _positive(self, ["lora_rank", "lora_alpha"])
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if importlib.util.find_spec("peft") is None:
            problems.append("--lora needs PEFT, which is not installed: pip install -e '.[lora]' from the repository (or pip install peft)")
        return problems

    def lora_settings(self) -> dict | None:
        """The LoRA settings the workers get (lora.LoraSettings as a dict), or None without --lora."""
        if not self.lora:
            return None
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": self.lora_target_modules}

    def task_list(self) -> list[tuple[str, float]]:
        """(label column, loss weight) per task, from --tasks or --label-column."""
        if self.tasks and self.label_column:
            raise ValueError("give either --label-column or --tasks, not both")
        if not self.tasks:
            return [(c, 1.0) for c in (self.label_column or ["label"])]
        tasks = []
        for t in self.tasks:
            if isinstance(t, dict):
                column, weight = t.get("column"), t.get("weight", 1.0)
            else:
                column, _, weight = str(t).partition("=")
                weight = weight or 1.0
            try:
                tasks.append((str(column), float(weight)))
            except (TypeError, ValueError):
                raise ValueError(f"--tasks {t!r}: expected COLUMN=WEIGHT (a number)") from None
            if not column:
                raise ValueError(f"--tasks {t!r}: no column")
        return tasks


@dataclass
class SearchConfig(TrainConfig):
    """Configuration of the hyperparameter search (``jobs/tune.py``): every training option, plus the search's."""

    num_samples: int = _opt(4, "Trials: training runs with settings drawn from the search space (each point of a grid is run this many times).")
    max_concurrent_trials: int | None = _opt(None, "Trials at once. Default: as many as the cluster fits, each holding --num-workers workers (a GPU each with --use-gpu, else --cpus-per-worker CPUs).")
    search_space: str | None = _opt(None, "YAML of option: {distribution: [arguments]} (loguniform, uniform, randint: [low, high]; choice, grid: [values]). Default: learning rate and head learning rate log-uniform, batch size, warmup and weight decay (README, Search).")
    grace_period: int = _opt(1, "ASHA: epochs every trial runs before it may be stopped.")
    reduction_factor: float = _opt(2.0, "ASHA: after each rung of epochs, only the best 1/this of the trials continue.")

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        problems = []
        try:
            super().validate()
        except ConfigError as exc:
            problems = exc.problems
        problems += _positive(self, ["num_samples", "grace_period"])
        if self.reduction_factor <= 1:
            problems.append(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            problems.append(f"--max-concurrent-trials must be >= 1, got {self.max_concurrent_trials}")
        if self.search_space is not None:
            from textlabel.search import load_space

            try:
                load_space(self.search_space)
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(problems)

    def train_config(self) -> TrainConfig:
        """The training options alone (what every trial starts from)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


@dataclass
class InferenceOptions(LongTextOptions):
    """How predictors run: the options the labelling and the evaluation jobs share."""

    text_column: str = _opt("text", "Column holding the text; every other column is copied through.")
    batch_size: int = _opt(1024, "Most rows per model batch (a cap: --max-batch-tokens cuts most batches).")
    max_batch_tokens: int | None = _opt(None, "Most padded tokens per model batch (rows x the batch's longest row), rows sorted by length first. Default: 2048 on CPU, 65536 with --use-gpu.")
    num_actors: str = _opt("auto", "Predictor actors: auto (one per GPU; on CPUs, every core busy), N, or MIN,MAX to autoscale the pool.")
    cpus_per_actor: float | None = _opt(None, "CPUs reserved per predictor actor. Default: its model threads on CPU; with --use-gpu, the node's CPUs per GPU less one (at most 8), to read and tokenize ahead.")
    threads_per_actor: int | None = _opt(None, "Model threads per CPU predictor actor. Default: auto sizing's, else --cpus-per-actor rounded.")
    runtime: str = _opt("auto", "Model runtime: auto (ONNX Runtime on CPU, torch on GPU), onnx (CPU only) or torch.")
    use_gpu: bool = _opt(False, "Run predictors on GPUs: bf16 weights, SDPA attention, a batch out of memory split and retried.")
    gpus_per_actor: float = _opt(1.0, "GPUs per predictor actor with --use-gpu.")
    max_length: int = _opt(128, "Longest tokenized row (special tokens included): longer rows are truncated, or cut into windows of this size with --long-texts chunk.")
    quantize: bool = _opt(False, "CPU only: dynamic int8 quantization of the model's Linear layers (about 2.5x faster; see README for its accuracy cost).")
    recheck_margin: float = _opt(0.2, "With --quantize: rows whose top-two probabilities are closer than this are labelled again in full precision (0 = never).")
    compile: bool = _opt(False, "With --use-gpu: torch.compile the model (dynamic shapes). Measure first: see README.")

    def actors(self) -> tuple[int, int] | None:
        """--num-actors as (min, max), or None for auto."""
        if str(self.num_actors).strip().lower() == "auto":
            return None
        parts = [p.strip() for p in str(self.num_actors).split(",")]
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        if not 1 <= lo <= hi:
            raise ValueError(self.num_actors)
        return lo, hi

    def predictor_options(self, threads: int) -> dict[str, Any]:
        """The keyword arguments of predict.Predictor these options stand for."""
        return {"use_gpu": self.use_gpu, "quantize": self.quantize, "threads": threads, "recheck_margin": self.recheck_margin,
                "max_tokens": self.max_batch_tokens, "max_rows": self.batch_size, "compile": self.compile,
                "runtime": self.runtime}

    def _inference_problems(self) -> list[str]:
        problems = _positive(self, ["batch_size", "max_length", "gpus_per_actor"]) + self._long_text_problems()
        problems += [f"--{n.replace('_', '-')} must be > 0, got {getattr(self, n)}"
                     for n in ("max_batch_tokens", "cpus_per_actor", "threads_per_actor") if getattr(self, n) is not None and getattr(self, n) <= 0]
        if not 0.0 <= self.recheck_margin <= 1.0:
            problems.append(f"--recheck-margin must be in [0, 1], got {self.recheck_margin}")
        try:
            self.actors()
        except ValueError:
            problems.append(f"--num-actors must be auto, N or MIN,MAX with 1 <= MIN <= MAX, got {self.num_actors!r}")
        if self.quantize and self.use_gpu:
            problems.append("--quantize is for CPU inference; drop it with --use-gpu (GPUs run bf16)")
        if self.compile and not self.use_gpu:
            problems.append("--compile is for GPU inference: pass it with --use-gpu")
        from textlabel import runtime

        if self.runtime not in runtime.RUNTIMES:
            problems.append(f"--runtime must be one of {', '.join(runtime.RUNTIMES)}, got {self.runtime!r}")
        elif self.runtime == "onnx" and self.use_gpu:
            problems.append("--runtime onnx is for CPU inference; GPUs run torch (drop --runtime or use --runtime torch)")
        elif self.runtime == "onnx" and not runtime.onnx_installed():
            problems.append("--runtime onnx needs onnxruntime and onnx: pip install onnxruntime onnx (or --runtime torch)")
        elif self.runtime == "onnx" and self.compile:
            problems.append("--compile is for the torch runtime")
        return problems


@dataclass
class LabelConfig(InferenceOptions):
    """Configuration of the labelling job (``jobs/label.py``)."""

    model: str = _opt("", "Fine-tuned model: a directory (train's OUTPUT/model: local, file:// or s3://), a hub id, or a registered MLflow model version, models:/NAME/VERSION or models:/NAME@ALIAS (resolved once, on the driver).", True)
    input: str = _opt("", "Parquet file or prefix to label (every *.parquet under it): local, file:// or s3://.", True)
    output: str = _opt("", "Output prefix, owned by textlabel: one labelled Parquet file per input file (same relative name), _manifest/, _summary.json and, while a run lives, _lease.json. Rerunning labels only what is new.", True)
    label_prefix: str = _opt("", "Prefix for the added columns (label, label_id, score, truncated, skip_reason), e.g. pred_ when the input has a label column.")
    rows_per_file: int = _opt(250_000, "Most rows per output file: a bigger input file is cut, at row-group boundaries, into parts labelled in parallel (NAME.part-00000.parquet, ...). A night of fewer files than four per actor cuts files bigger than an even share of its rows (at least 1,024) into such shares, to keep every actor busy.")
    part_bytes: int = _opt(256 << 20, "Most uncompressed input bytes per part (one output file): bounds an actor's memory; a bigger row group is cut into slices.")
    max_attempts: int = _opt(3, "Times a unit of work may end its predictor process (out of memory, a crash, --part-timeout) before its files are recorded as failed.")
    part_timeout: float = _opt(1800.0, "A unit of work that reads or labels no row for this many seconds (a hung read, a stuck model) is abandoned and its predictor process killed: an attempt; after --max-attempts its files are recorded failed.")
    schedule_timeout: float = _opt(600.0, "End the run (exit 75) when no predictor actor has started this many seconds after the pool was asked for: the cluster lacks the resources, and the message says which.")
    relabel: bool = _opt(False, "Label every input file again, not only new, changed and failed ones; each output file is replaced in place.")
    keep_old_labels: bool = _opt(False, "When --output holds labels from another model: keep them and label only new or changed files with this one (default: refuse).")
    retry_failed: bool = _opt(False, "Label again the files quarantined at their current version (they ended their predictor process --max-attempts times: a crash, out of memory, --part-timeout); without it they wait until they change.")
    prune_gone: bool = _opt(False, "Delete the outputs and records of input files that no longer exist (default: list them in the summary).")
    verify_outputs: bool = _opt(False, "List --output and check every recorded output file is there (relabel the missing, delete the unrecorded). Done anyway after a run that did not end cleanly.")
    lease: bool = _opt(True, "Hold a lease on --output while running, so a second run there is refused (--no-lease: for stores that ignore conditional writes; keep runs apart yourself).")
    lease_seconds: float = _opt(300.0, "Lease time to live: renewed every third of it; a dead holder's lease is taken over at once when its death can be proven, else when it expires.")
    commit_every: int = _opt(500, "Records per manifest commit (a commit also happens every --commit-seconds).")
    commit_seconds: float = _opt(10.0, "Most seconds a finished file waits for its record to be committed.")
    progress_seconds: float = _opt(10.0, "When the log is not a terminal (cron, ray job logs): one progress line every this many seconds instead of Ray Data's redrawn bars (0: none). A terminal keeps the bars.")
    min_score: dict | None = _opt(None, "Abstain below this calibrated score: a row whose top score is under it keeps its score but gets a null label (skip_reason low_confidence). A number for every class, or per class: CLASS=S,... (YAML: a mapping; '*' for the classes not named).")
    mlflow_tracking_uri: str | None = _opt(None, "MLflow tracking server that resolves a models:/ --model (default: MLFLOW_TRACKING_URI).")
    max_drift: float = _opt(0.2, "Flag the night (exit 4, after its labels are committed) when the population stability index of its labels against the primary reference exceeds this: the model's training labels, else the last 7 nights.")

    def thresholds(self, labels: list[str]) -> np.ndarray | None:
        """--min-score as one threshold per class of ``labels`` (None: never abstain)."""
        if self.min_score is None:
            return None
        if not isinstance(self.min_score, dict):
            return np.full(len(labels), float(self.min_score))
        other = float(self.min_score.get("*", 0.0))
        return np.array([float(self.min_score.get(name, other)) for name in labels])

    def _threshold_problems(self) -> list[str]:
        values = self.min_score if isinstance(self.min_score, dict) else {"": self.min_score}
        if self.min_score is None:
            return []
        try:
            bad = [v for v in values.values() if not 0.0 <= float(v) <= 1.0]
        except (TypeError, ValueError):
            bad = [values]
        return [f"--min-score must be a score in [0, 1] or CLASS=SCORE pairs with scores in [0, 1], got {self.min_score!r}"] if bad else []

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        problems = _missing_required(self) + self._inference_problems() + self._threshold_problems()
        if self.max_drift <= 0:
            problems.append(f"--max-drift must be > 0, got {self.max_drift}")
        if self.progress_seconds < 0:
            problems.append(f"--progress-seconds must be >= 0 (0: no progress lines), got {self.progress_seconds}")
        problems += _positive(self, ["rows_per_file", "part_bytes", "max_attempts", "lease_seconds", "part_timeout",
                                     "schedule_timeout", "commit_every",
                                     "commit_seconds"])
        if self.relabel and self.keep_old_labels:
            problems.append("--relabel and --keep-old-labels contradict each other: pass one")
        inp, out = self.input.rstrip("/"), self.output.rstrip("/")
        if inp and out and (inp == out or out.startswith(inp + "/")):
            problems.append("--output must not be --input or inside it: the next run would read the labels as corpus")
        if problems:
            raise ConfigError(problems)


@dataclass
class EvaluateConfig(InferenceOptions):
    """Configuration of the evaluation job (``jobs/evaluate.py``)."""

    model: str = _opt("", "Fine-tuned model directory (train's OUTPUT/model): local, file://, s3:// or a hub id.", True)
    data: str = _opt("", "Labelled rows: a Parquet file or prefix, or a .csv/.tsv file; local, file:// or s3://.", True)
    output: str = _opt("", "Where metrics.json, report.md and the PNGs are written (per task, in a folder each, for a multi-task model).", True)
    label_column: str = _opt("label", "Column holding the true label (names as in the model's config). A multi-task model's tasks are read from the columns named like them.")

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        problems = _missing_required(self) + self._inference_problems()
        if self.text_column == self.label_column:
            problems.append(f"--text-column and --label-column are both {self.text_column!r}")
        if problems:
            raise ConfigError(problems)


@dataclass
class PromoteConfig:
    """Configuration of ``textlabel promote`` (``jobs/promote.py``)."""

    model: str = _opt("", "Trained model directory (train's OUTPUT/model): local, file:// or s3://.", True)
    name: str = _opt("", "Registered model to add a version to (created if new); label with models:/NAME/VERSION.", True)
    alias: list[str] | None = _opt(None, "Point this alias at the new version (models:/NAME@ALIAS), e.g. champion.")
    mlflow_tracking_uri: str | None = _opt(None, "MLflow tracking server with the model registry (default: MLFLOW_TRACKING_URI).")
    mlflow_experiment: str = _opt("textlabel", "Experiment of the run that holds the model's files, when its training was not tracked.")

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        problems = _missing_required(self)
        if not (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            problems.append("promote needs a tracking server: pass --mlflow-tracking-uri or set MLFLOW_TRACKING_URI")
        if problems:
            raise ConfigError(problems)


def _missing_required(cfg: Any) -> list[str]:
    return [
        f"--{f.name.replace('_', '-')} is required"
        for f in dataclasses.fields(cfg)
        if f.metadata.get("required") and not getattr(cfg, f.name)
    ]


def _positive(cfg: Any, names: list[str]) -> list[str]:
    return [
        f"--{n.replace('_', '-')} must be > 0, got {getattr(cfg, n)}"
        for n in names
        if getattr(cfg, n) <= 0
    ]


C = TypeVar("C")


def _number_or_mapping(text: str) -> float | dict[str, float] | str:
    """``0.7`` or ``spam=0.9,*=0.6`` from the command line (a bad value is left for validate to name)."""
    try:
        if "=" not in text:
            return float(text)
        return {k.strip(): float(v) for k, _, v in (pair.partition("=") for pair in text.split(","))}
    except ValueError:
        return text


def _base_type(tp: Any) -> type:
    """``int | None`` -> int; ``list[str]`` -> list."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def _fields(cls: type) -> list[dataclasses.Field]:
    """A config's fields, required ones first (a job's own options before the shared inference ones)."""
    fields = dataclasses.fields(cls)
    late = {f.name for f in dataclasses.fields(LongTextOptions)}  # a mixin's fields come first in the class: list them last
    return ([f for f in fields if f.metadata.get("required")] + [f for f in fields if not f.metadata.get("required") and f.name not in late]
            + [f for f in fields if f.name in late])


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (defaults from the class)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="Read options from YAML (keys are the option names); command-line flags win.")
    types_ = _field_types(cls)
    for f in _fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = types_[f.name]
        default = "" if f.metadata.get("required") or f.default is None else f" (default: {f.default})"
        help_ = f.metadata["help"] + ("" if tp is bool else default)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif tp is list:
            parser.add_argument(flag, action="append", metavar=f.name.upper(), help=help_ + "; repeatable")
        elif tp is dict:
            parser.add_argument(flag, type=_number_or_mapping, metavar=f.name.upper(), help=help_)
        else:
            parser.add_argument(flag, type=tp, metavar=f.name.upper(), help=help_)
    return parser


def _coerce(cls: type, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    types_ = _field_types(cls)
    out, problems = {}, []
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types_:
            problems.append(f"unknown option {key!r} in the config file; known: {', '.join(sorted(types_))}")
            continue
        tp = types_[name]
        try:
            if value is None or tp is dict:
                out[name] = value
            elif tp is list:
                out[name] = value if isinstance(value, list) else [value]  # label_column: label
            elif tp is bool and not isinstance(value, bool):
                raise TypeError
            else:
                out[name] = tp(value)
        except (TypeError, ValueError):
            problems.append(f"option {key!r}: expected {tp.__name__}, got {value!r}")
    return out, problems


def parse_config(cls: type[C], argv: list[str] | None, prog: str, description: str) -> C:
    """Parse flags and an optional YAML file into a validated ``cls``."""
    args = vars(build_parser(cls, prog, description).parse_args(argv))
    values: dict[str, Any] = {}
    problems: list[str] = []
    config_path = args.pop("config", None)
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError([f"--config {config_path}: no such file"])
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"--config {config_path}: expected a mapping of option: value"])
        values, problems = _coerce(cls, loaded)
    values.update(args)
    if problems:
        raise ConfigError(problems)
    cfg = cls(**values)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


def options_markdown(cls: type, beyond: type | None = None) -> str:
    """The README's option table for a job config (a test keeps the README in step); ``beyond``: only the options
    ``cls`` adds to that config."""
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    inherited = {f.name for f in dataclasses.fields(beyond)} if beyond else set()
    for f in (f for f in _fields(cls) if f.name not in inherited):
        default = "required" if f.metadata.get("required") else ("" if f.default is None else f"`{f.default}`")
        lines.append(f"| `--{f.name.replace('_', '-')}` | {default} | {f.metadata['help']} |")
    return "\n".join(lines)
