"""The evaluate job, and the report a training run writes: figures checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import accuracy_score, f1_score

from support.corpus import easy_rows, put_parquet, resolve
from support.reports import check_against_sklearn, png_shape
from textlabel import storage
from textlabel.cli import evaluate_main

pytestmark = pytest.mark.xdist_group("trained")  # one worker: one trained model


def test_training_writes_a_report_with_a_tfidf_baseline(trained):
    """Promise: every training run reports its figures next to a TF-IDF baseline on the same rows."""
    out = resolve(trained["output"])
    metrics = storage.read_json(out.join("metrics.json"))
    baseline = metrics["baseline_tfidf_logreg"]
    assert baseline["accuracy"] > 0.9  # one polar word per row: easy for TF-IDF too
    markdown = storage.read_bytes(out.join("report", "report.md")).decode()
    assert "TF-IDF + logistic regression (same split)" in markdown
    assert f"| fine-tuned model | {metrics['validation']['val_accuracy']:.4f} |" in markdown  # the exported epoch's
    assert len(png_shape(out.join("report", "training_curves.png"))) == 3
    assert not storage.exists(out.join("model", "history.json"))


def test_evaluate_job_matches_sklearn_on_independent_predictions(trained, s3_prefix, tmp_path):
    """Promise: evaluate.py's figures are scikit-learn's on the same predictions."""
    from transformers import pipeline

    rows = easy_rows(300, seed=42)
    rows = pa.table({"text": rows["text"], "label": rows["label"]})
    put_parquet(f"{s3_prefix}/holdout.parquet", rows)
    assert evaluate_main(["--model", f"{trained['output']}/model", "--data", f"{s3_prefix}/holdout.parquet",
                          "--output", f"{s3_prefix}/eval", "--batch-size", "16"]) == 0
    out = resolve(f"{s3_prefix}/eval")
    summary = storage.read_json(out.join("metrics.json"))
    local = tmp_path / "model"
    storage.copy_dir(resolve(f"{trained['output']}/model"), resolve(str(local)))
    classify = pipeline("text-classification", model=str(local), device="cpu")
    labels = ["negative", "positive"]
    y_pred = np.array([labels.index(p["label"]) for p in classify(rows["text"].to_pylist())])
    y_true = np.array([labels.index(x) for x in rows["label"].to_pylist()])
    assert summary["rows"] == 300
    assert summary["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert summary["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    markdown = storage.read_bytes(out.join("report.md")).decode()
    check_against_sklearn(markdown, "## Per class (fine-tuned model)", y_true, y_pred, labels)
    assert png_shape(out.join("confusion_matrix.png"))[0] >= 300
    scores = summary["scores"]  # calibration error of the scores labelling gives, and what --min-score would do
    assert 0 <= list(scores["ece"].values())[0] < 0.2 and png_shape(out.join("reliability.png"))[0] >= 300
    assert [r["min_score"] for r in scores["min_score"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    assert scores["min_score"][0] == {"min_score": 0.5, "abstained": 0.0, "accuracy": pytest.approx(summary["accuracy"], abs=1e-4)}
    assert "## Scores" in markdown
