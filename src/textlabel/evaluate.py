"""The evaluation job: any saved model on any labelled data, through the labelling predictor."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from textlabel import data as data_lib
from textlabel import model as model_lib
from textlabel import storage
from textlabel.config import EvaluateConfig, LabelConfig
from textlabel.predict import add_predictions, check_cluster_fits
from textlabel.report import write_report

logger = logging.getLogger(__name__)


def model_labels(model: str) -> list[str]:
    """The label names of a fine-tuned model, in id order, from its config.json."""
    from transformers import AutoConfig

    model_dir = model_lib.local_model_dir(model)
    if model_lib.is_multitask(model_dir):
        raise model_lib.ModelError(f"--model {model}: a multi-task model; its per-task evaluation is the training run's "
                                   "report/ (evaluate.py scores single-task models)")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    return [config.id2label[i] for i in range(config.num_labels)]


def run_evaluation(cfg: EvaluateConfig) -> dict[str, Any]:
    """Predict every labelled row with the model; write metrics.json and the report under --output."""
    start = time.perf_counter()
    rows = data_lib.read_labelled(cfg.data, cfg.text_column, cfg.label_column)
    model_lib.check_model_dir(cfg.model)
    labels = model_labels(cfg.model)
    table = data_lib.encode_labels(rows, labels, cfg.data)
    table = table.append_column("row_id", pa.array(np.arange(table.num_rows)))
    label_cfg = LabelConfig(model=cfg.model, input=cfg.data, output=cfg.output, batch_size=cfg.batch_size,
                            num_actors=cfg.num_actors, use_gpu=cfg.use_gpu, max_length=cfg.max_length,
                            quantize=cfg.quantize, label_prefix="pred_")
    label_cfg.validate()
    check_cluster_fits(label_cfg)
    ds = data_lib.to_dataset(table, blocks=-(-table.num_rows // 2000))
    predicted = add_predictions(ds, label_cfg).select_columns(["row_id", "pred_label_id"])
    predicted = pa.concat_tables(predicted.iter_batches(batch_format="pyarrow")).sort_by("row_id")
    if predicted.num_rows != table.num_rows:
        raise RuntimeError(f"predicted {predicted.num_rows} of {table.num_rows} rows; see the Ray Data log above")
    y_pred = predicted["pred_label_id"].to_numpy()
    out = storage.resolve(cfg.output)
    metrics = write_report(out, labels, table["label_id"].to_numpy(), y_pred, table["text"].to_pylist())
    summary = {"model": cfg.model, "data": cfg.data, "rows": table.num_rows, "dropped_rows": rows.dropped,
               "labels": labels, "seconds": round(time.perf_counter() - start, 1), **metrics}
    storage.write_json(out.join("metrics.json"), summary)
    logger.info("accuracy %.4f, macro-F1 %.4f on %d rows; report in %s",
                metrics["accuracy"], metrics["macro_f1"], table.num_rows, out.join("report.md").url)
    return summary
