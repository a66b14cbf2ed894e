"""Evaluation reports (report.py): numbers checked against scikit-learn, PNGs checked as images; no Ray."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from support.corpus import resolve
from support.reports import check_against_sklearn, png_shape
from textlabel.report import write_report


def test_report_numbers_match_sklearn_and_pngs_are_images(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["ham", "spam", "unsure"]
    y_true = rng.integers(0, 3, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 3, 300))
    texts = [f"message {i}" for i in range(300)]
    epochs = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.5 + e / 10, "val_macro_f1": 0.4 + e / 10} for e in (1, 2, 3)]
    out = resolve(str(tmp_path / "report"))
    metrics = write_report(out, labels, y_true, y_pred, texts, epochs)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    markdown = (tmp_path / "report/report.md").read_text()
    check_against_sklearn(markdown, "## Per class (fine-tuned model)", y_true, y_pred, labels)
    assert f"| fine-tuned model | {accuracy_score(y_true, y_pred):.4f} |" in markdown
    wrong = int((y_true != y_pred).sum())
    assert markdown.count("| message ") == min(10, wrong)
    for name in ["confusion_matrix.png", "training_curves.png"]:
        height, width = png_shape(out.join(name))[:2]
        assert 300 <= height <= 3000 and 500 <= width <= 4000
