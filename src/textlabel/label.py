"""The labelling job: Parquet in, a streaming Ray Data pipeline, Parquet out.

read_parquet -> tokenize (CPU tasks) -> predictor actor pool -> write_parquet.
Each predictor batch is sorted by token length and cut into model batches that
pad only to their own longest row; rows go back to their order afterwards.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from textlabel import data as data_lib
from textlabel import model as model_lib
from textlabel import storage
from textlabel.config import ConfigError, LabelConfig

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("label", "label_id", "score")
TOKENS = "__textlabel_input_ids"


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str | None):
    # Once per worker process: tokenizer files come from the same cache as the model.
    return model_lib.load_tokenizer(model_lib.local_model_dir(model))


def tokenize_batch(batch: pa.Table, model: str | None, text_column: str, max_length: int) -> pa.Table:
    """Add token ids (unpadded, truncated to max_length) for the text column."""
    texts = batch[text_column]
    ids = _tokenizer(model)(pc.fill_null(texts, "").to_pylist(), truncation=True, max_length=max_length, padding=False)["input_ids"]
    # A null text gets no tokens: the predictor gives it a null label (never a made-up one).
    ids = [None if t is None else i for t, i in zip(texts.to_pylist(), ids)]
    return batch.append_column(TOKENS, pa.array(ids, type=pa.list_(pa.int32())))


class Predictor:
    """Loads the model once per actor; maps a tokenized batch to labelled rows."""

    def __init__(self, model: str | None, batch_size: int, use_gpu: bool, quantize: bool, prefix: str = "",
                 threads: int = 1, recheck_margin: float = 0.0):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.net = model_lib.load_classifier(model_lib.local_model_dir(model)).to(self.device)
        self.fast = self.net
        if quantize:
            # Per-channel weight scales: per-tensor ones flipped ~1.5 points more labels (README).
            from torch.ao.quantization import per_channel_dynamic_qconfig

            self.fast = torch.ao.quantization.quantize_dynamic(
                model_lib.load_classifier(model_lib.local_model_dir(model)),
                {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
            )
        self.recheck_margin = recheck_margin if quantize else 0.0
        config = self.net.config
        self.labels = np.array([config.id2label[i] for i in range(config.num_labels)], dtype=object)
        self.pad_id = _tokenizer(model).pad_token_id or 0
        self.batch_size = batch_size
        self.use_gpu = use_gpu
        self.prefix = prefix

    def _forward(self, net, rows: list[list[int]]):
        torch = self.torch
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        inputs = {"input_ids": torch.from_numpy(ids).to(self.device), "attention_mask": torch.from_numpy(mask).to(self.device)}
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_gpu):
            logits = net(**inputs).logits.float()
        return torch.softmax(logits, dim=-1).cpu().numpy()

    def _probabilities(self, rows: list[list[int]]) -> np.ndarray:
        """int8 probabilities, with rows whose top-two margin is under recheck_margin redone in full precision."""
        probs = self._forward(self.fast, rows)
        if self.recheck_margin > 0 and probs.shape[1] > 1:
            top2 = np.sort(probs, axis=1)[:, -2:]
            unsure = np.flatnonzero(top2[:, 1] - top2[:, 0] < self.recheck_margin)
            if len(unsure):
                probs[unsure] = self._forward(self.net, [rows[i] for i in unsure])
        return probs

    def __call__(self, batch: pa.Table) -> pa.Table:
        tokens = batch[TOKENS].to_pylist()
        present = np.array([t is not None for t in tokens], dtype=bool)
        lengths = np.array([len(t) if t is not None else 0 for t in tokens])
        order = np.flatnonzero(present)[np.argsort(lengths[present], kind="stable")]
        label_id = np.zeros(len(tokens), dtype=np.int64)
        score = np.zeros(len(tokens), dtype=np.float32)
        with self.torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                probs = self._probabilities([tokens[i] for i in idx])
                score[idx] = probs.max(axis=1)
                label_id[idx] = probs.argmax(axis=1)
        out, missing = batch.drop_columns([TOKENS]), ~present
        return (
            out.append_column(self.prefix + "label", pa.array(self.labels[label_id], type=pa.string(), mask=missing))
            .append_column(self.prefix + "label_id", pa.array(label_id, mask=missing))
            .append_column(self.prefix + "score", pa.array(score, mask=missing))
        )


def input_files(url: str) -> list[storage.pafs.FileInfo]:
    """The Parquet files to label: one file, or every *.parquet under a prefix."""
    loc = storage.resolve(url)
    found = storage.info(loc)
    if found.type == storage.pafs.FileType.File:
        if not loc.path.endswith(".parquet"):
            raise data_lib.DataError(f"--input {url}: not a .parquet file; the labelling job reads Parquet")
        return [found]
    files = storage.list_files(loc, ".parquet") if found.type == storage.pafs.FileType.Directory else []
    if not files:
        raise data_lib.DataError(f"--input {url}: no *.parquet files there; check the prefix (is tonight's corpus in place?)")
    return files


def check_input_schema(cfg: LabelConfig, fs, files: list) -> pa.Schema:
    """The corpus schema; a missing text column or a name clash fails here, before any model loads."""
    with fs.open_input_file(files[0].path) as f:
        schema = pq.read_schema(f)
    if cfg.text_column not in schema.names:
        raise data_lib.DataError(
            f"{files[0].path}: no column {cfg.text_column!r}; the columns are: {', '.join(schema.names)}. Pass --text-column"
        )
    text_type = schema.field(cfg.text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise data_lib.DataError(f"{files[0].path}: column {cfg.text_column!r} holds {text_type}, not text; pass --text-column")
    clash = [cfg.label_prefix + c for c in OUTPUT_COLUMNS if cfg.label_prefix + c in schema.names]
    if clash:
        raise data_lib.DataError(
            f"{files[0].path}: already has column(s) {', '.join(clash)}; pass --label-prefix (e.g. pred_) to name the new ones apart"
        )
    return schema


def count_rows(fs, paths: list[str]) -> int:
    """Rows in Parquet files, from their footers (no data read)."""
    total = 0
    for path in paths:
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


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


def build_pipeline(cfg: LabelConfig, fs, files: list):
    """The streaming pipeline from Parquet files, lazily: nothing runs until it is written."""
    import ray

    # Reading and tokenizing share what the predictors leave free: half a CPU each.
    ds = ray.data.read_parquet([f.path for f in files], filesystem=fs, ray_remote_args={"num_cpus": 0.5})
    return add_predictions(ds, cfg)


def check_output_empty(url: str) -> None:
    """Labels go to a fresh prefix: appending to earlier output would duplicate rows."""
    out = storage.resolve(url)
    if storage.exists(out) and storage.list_files(out, ".parquet"):
        raise data_lib.DataError(f"--output {url} already holds Parquet files; write each run to a new prefix (e.g. one per date)")


def check_inputs(cfg: LabelConfig) -> list:
    """Every check that needs no model: the input files, their text column, the output, the model's files."""
    src = storage.resolve(cfg.input)
    files = input_files(cfg.input)
    check_input_schema(cfg, src.fs, files)
    check_output_empty(cfg.output)
    model_lib.check_model_dir(cfg.model)
    return files


def check_cluster_fits(cfg: LabelConfig) -> None:
    """Predictors must leave a CPU for listing, reading and tokenizing, or the pipeline stalls."""
    import ray

    lo, hi = cfg.pool_size()
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus - hi * cfg.cpus_per_actor >= 1 or cfg.use_gpu:
        return
    if len([n for n in ray.nodes() if n["Alive"]]) > 1 or cpus == 0:
        # A cluster with worker nodes (or an autoscaling one with none yet) may grow: warn only.
        logger.warning("the predictor pool may take all %g CPUs the cluster has now; reading needs one more", cpus)
        return
    raise ConfigError([
            f"{hi} predictor actors x --cpus-per-actor {cfg.cpus_per_actor} leave less than 1 of the cluster's "
            f"{cpus:g} CPUs for reading and tokenizing; lower --num-actors or --cpus-per-actor"
        ])


def run_labelling(cfg: LabelConfig, files: list | None = None) -> dict[str, Any]:
    """Label every row under ``cfg.input`` into ``cfg.output``; returns the summary.

    ``files`` are check_inputs' result when the caller already ran it.
    """
    start = time.perf_counter()
    src = storage.resolve(cfg.input)
    files = files if files is not None else check_inputs(cfg)
    check_cluster_fits(cfg)
    rows_in = count_rows(src.fs, [f.path for f in files])
    out = storage.resolve(cfg.output)
    logger.info("labelling %d rows in %d files from %s with %s", rows_in, len(files), cfg.input, model_lib.describe(cfg.model))
    build_pipeline(cfg, src.fs, files).write_parquet(out.path, filesystem=out.fs, max_rows_per_file=cfg.rows_per_file)
    written = [f.path for f in storage.list_files(out, ".parquet")]
    rows_out = count_rows(out.fs, written)
    seconds = time.perf_counter() - start
    summary = {
        "input": cfg.input, "output": cfg.output, "model": model_lib.describe(cfg.model),
        "files_in": len(files), "files_out": len(written), "rows_in": rows_in, "rows_out": rows_out,
        "seconds": round(seconds, 2), "rows_per_second": round(rows_out / seconds, 1),
    }
    storage.write_json(out.join("_summary.json"), summary)
    if rows_out != rows_in:
        raise RuntimeError(f"wrote {rows_out} rows for {rows_in} input rows; see the Ray Data log above")
    logger.info("labelled %d rows from %d files in %.1f s (%.0f rows/s) into %s",
                rows_out, len(files), seconds, summary["rows_per_second"], cfg.output)
    return summary
