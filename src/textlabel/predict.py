"""Turning texts into labels: tokenizing, the batched (optionally int8) model, and bad rows.

Shared by the labelling job (label.py) and the evaluation job (evaluate.py). Rows go
through the model sorted by token length, cut into model batches padded only to their
own longest row, and come back in their order.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from textlabel import model as model_lib
from textlabel.config import ConfigError, LabelConfig

logger = logging.getLogger(__name__)

TOKENS = "__textlabel_input_ids"
# Why a row got no label. Each is counted in the run's summary and written in the skip_reason column.
SKIP_REASONS = {
    "null_text": "the text is null",
    "blank_text": "the text is empty or only whitespace",
    "not_text": "the text column holds non-text values (numbers, lists, ...)",
    "invalid_utf8": "the text is bytes that are not valid UTF-8",
}
# Texts are cut at this many characters per allowed token before tokenizing, so a 10 MB row
# cannot stall a batch. Ordinary text averages 4-5 characters a token, so the cut never moves
# the first max_length tokens; a cut row is flagged truncated (it was, by any reading).
CHARS_PER_TOKEN_CAP = 64


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str | None):
    """The model's tokenizer, once per process (files come from the same cache as the model)."""
    return model_lib.load_tokenizer(model_lib.local_model_dir(model))


def texts_of(column: pa.ChunkedArray | pa.Array) -> tuple[list[str | None], list[str | None]]:
    """The text of each row, or None with the reason it cannot be labelled (SKIP_REASONS)."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        values = column.to_pylist()
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        values = []
        for raw in column.to_pylist():
            try:
                values.append(raw if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(b"")  # marker: not None, not str
    else:
        reasons = ["null_text" if v is None else "not_text" for v in column.to_pylist()]
        return [None] * len(reasons), reasons
    texts: list[str | None] = []
    reasons: list[str | None] = []
    for v in values:
        reason = ("null_text" if v is None else "invalid_utf8" if isinstance(v, bytes)
                  else "blank_text" if not v.strip() else None)
        texts.append(None if reason else v)
        reasons.append(reason)
    return texts, reasons


def tokenize(model: str | None, texts: list[str | None], max_length: int) -> tuple[list[list[int] | None], np.ndarray]:
    """Token ids (unpadded, at most max_length) per text, None for None; and which rows were truncated."""
    tok = tokenizer_for(model)
    cap = CHARS_PER_TOKEN_CAP * max_length
    keep = [i for i, t in enumerate(texts) if t is not None]
    cut = [texts[i][:cap] for i in keep]
    # One token more than allowed tells a row that fits from one that must be cut.
    ids = tok(cut, truncation=True, max_length=max_length + 1, padding=False)["input_ids"] if cut else []
    long = [k for k, row in enumerate(ids) if len(row) > max_length]
    if long:
        for k, row in zip(long, tok([cut[k] for k in long], truncation=True, max_length=max_length, padding=False)["input_ids"]):
            ids[k] = row
    out: list[list[int] | None] = [None] * len(texts)
    truncated = np.zeros(len(texts), dtype=bool)
    for k, i in enumerate(keep):
        out[i] = ids[k]
    truncated[[keep[k] for k in long]] = True
    truncated[[i for i in keep if len(texts[i]) > cap]] = True
    return out, truncated


class Scorer:
    """A classifier loaded once per process: token ids in, (label id, probability) out."""

    def __init__(self, model: str | None, batch_size: int, use_gpu: bool, quantize: bool,
                 threads: int = 1, recheck_margin: float = 0.0):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model_dir = model_lib.local_model_dir(model)
        self.multitask = model_lib.is_multitask(model_dir)
        load = model_lib.load_multitask if self.multitask else model_lib.load_classifier
        self.net = load(model_dir).to(self.device)
        self.fast = self.net
        if quantize:
            # Per-channel weight scales: per-tensor ones flipped ~1.5 points more labels (README).
            from torch.ao.quantization import per_channel_dynamic_qconfig

            self.fast = torch.ao.quantization.quantize_dynamic(
                load(model_dir), {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
            )
        self.recheck_margin = recheck_margin if quantize else 0.0
        if self.multitask:  # one forward pass, every task's head
            self.tasks = [t["name"] for t in self.net.tasks]
            self.labels = [np.array(t["labels"], dtype=object) for t in self.net.tasks]
        else:
            config = self.net.config
            self.tasks = [None]
            self.labels = [np.array([config.id2label[i] for i in range(config.num_labels)], dtype=object)]
        self.pad_id = tokenizer_for(model).pad_token_id or 0
        self.batch_size = batch_size
        self.use_gpu = use_gpu

    def _forward(self, net, rows: list[list[int]]) -> list[np.ndarray]:
        torch = self.torch
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        inputs = {"input_ids": torch.from_numpy(ids).to(self.device), "attention_mask": torch.from_numpy(mask).to(self.device)}
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_gpu):
            out = net(**inputs)
        logits = out if isinstance(out, list) else [out.logits]
        return [torch.softmax(lg.float(), dim=-1).cpu().numpy() for lg in logits]

    def _probabilities(self, rows: list[list[int]]) -> list[np.ndarray]:
        """int8 probabilities per task, with rows whose top-two margin (in any task) is under
        recheck_margin redone in full precision."""
        probs = self._forward(self.fast, rows)
        if self.recheck_margin > 0:
            unsure = np.zeros(len(rows), dtype=bool)
            for p in probs:
                if p.shape[1] > 1:
                    top2 = np.sort(p, axis=1)[:, -2:]
                    unsure |= top2[:, 1] - top2[:, 0] < self.recheck_margin
            again = np.flatnonzero(unsure)
            if len(again):
                for p, q in zip(probs, self._forward(self.net, [rows[i] for i in again])):
                    p[again] = q
        return probs

    def predict(self, tokens: list[list[int] | None]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Per task, label_id and score per row; and which rows were labelled (rows without tokens are not)."""
        present = np.array([t is not None for t in tokens], dtype=bool)
        lengths = np.array([len(t) if t is not None else 0 for t in tokens])
        order = np.flatnonzero(present)[np.argsort(lengths[present], kind="stable")]
        label_ids = [np.zeros(len(tokens), dtype=np.int64) for _ in self.tasks]
        scores = [np.zeros(len(tokens), dtype=np.float32) for _ in self.tasks]
        with self.torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for label_id, score, probs in zip(label_ids, scores, self._probabilities([tokens[i] for i in idx])):
                    score[idx] = probs.max(axis=1)
                    label_id[idx] = probs.argmax(axis=1)
        return label_ids, scores, present

    def columns(self, tokens: list[list[int] | None], prefix: str = "") -> dict[str, pa.Array]:
        """label, label_id and score columns (<task>_label, ... per task of a multi-task model);
        null where a row has no tokens."""
        label_ids, scores, present = self.predict(tokens)
        missing = ~present
        out = {}
        for task, labels, label_id, score in zip(self.tasks, self.labels, label_ids, scores):
            name = prefix + (f"{task}_" if task else "")
            out[name + "label"] = pa.array(labels[label_id], type=pa.string(), mask=missing)
            out[name + "label_id"] = pa.array(label_id, mask=missing)
            out[name + "score"] = pa.array(score, mask=missing)
        return out


def prediction_columns(model: str | None, prefix: str = "") -> list[str]:
    """The columns a model's predictions add: label, label_id, score (per task for a multi-task model).
    Reads only the model's task list (no weights are fetched)."""
    from textlabel import storage

    tasks = None
    if model and (storage.is_remote(model) or os.path.isdir(model.removeprefix("file://"))):
        found = storage.resolve(model).join(model_lib.TASKS_FILE)
        if storage.exists(found):
            tasks = [t["name"] for t in storage.read_json(found)["tasks"]]
    if not tasks:
        return [prefix + c for c in ("label", "label_id", "score")]
    return [f"{prefix}{t}_{c}" for t in tasks for c in ("label", "label_id", "score")]


# The Ray Data path used by evaluation: a tokenize stage (CPU tasks), then a predictor actor pool.

def tokenize_batch(batch: pa.Table, model: str | None, text_column: str, max_length: int) -> pa.Table:
    """Add token ids (unpadded, truncated to max_length) for the text column; null text gets none."""
    ids, _ = tokenize(model, pc.cast(batch[text_column], pa.string()).to_pylist(), max_length)
    return batch.append_column(TOKENS, pa.array(ids, type=pa.list_(pa.int32())))


class Predictor:
    """Ray Data callable class: a tokenized batch in, the batch with label columns out."""

    def __init__(self, model: str | None, batch_size: int, use_gpu: bool, quantize: bool, prefix: str = "",
                 threads: int = 1, recheck_margin: float = 0.0):
        self.scorer = Scorer(model, batch_size, use_gpu, quantize, threads, recheck_margin)
        self.prefix = prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = batch.drop_columns([TOKENS])
        for name, column in self.scorer.columns(batch[TOKENS].to_pylist(), self.prefix).items():
            out = out.append_column(name, column)
        return out


def add_predictions(ds, cfg: LabelConfig):
    """Tokenize (CPU tasks) then predict (actor pool) every row of a Ray Dataset, lazily."""
    from ray.data import ActorPoolStrategy

    lo, hi = cfg.pool_size()
    ds = ds.map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=16 * cfg.batch_size, num_cpus=0.5,
        fn_kwargs={"model": cfg.model, "text_column": cfg.text_column, "max_length": cfg.max_length},
    )
    return ds.map_batches(
        Predictor, batch_format="pyarrow", batch_size=16 * cfg.batch_size,
        fn_constructor_kwargs={"model": cfg.model, "batch_size": cfg.batch_size, "use_gpu": cfg.use_gpu,
                               "quantize": cfg.quantize, "prefix": cfg.label_prefix,
                               "threads": cfg.threads_per_actor or max(1, round(cfg.cpus_per_actor)),
                               "recheck_margin": cfg.recheck_margin},
        compute=ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor if cfg.use_gpu else 0,
    )


def check_cluster_fits(cfg: LabelConfig, spare_cpus: float = 1.0) -> None:
    """Refuse a predictor pool that cannot run (or would starve the other stages) on this one-node cluster."""
    import ray

    lo, hi = cfg.pool_size()
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus - hi * cfg.cpus_per_actor >= spare_cpus or cfg.use_gpu:
        return
    if len([n for n in ray.nodes() if n["Alive"]]) > 1 or cpus == 0:
        # A cluster with worker nodes (or an autoscaling one with none yet) may grow: warn only.
        logger.warning("the predictor pool may take all %g CPUs the cluster has now", cpus)
        return
    if spare_cpus > 0:
        need = f"leave less than {spare_cpus:g} of the cluster's {cpus:g} CPUs for reading and tokenizing"
    else:
        need = f"need more than the cluster's {cpus:g} CPUs"
    raise ConfigError([f"{hi} predictor actors x --cpus-per-actor {cfg.cpus_per_actor} {need}; "
                       "lower --num-actors or --cpus-per-actor"])
