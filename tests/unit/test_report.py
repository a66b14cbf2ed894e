"""Evaluation reports (report.py): numbers checked against scikit-learn, PNGs checked as images; no Ray."""

from __future__ import annotations

import re

import matplotlib.image as mpimg
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from support.corpus import resolve
from textlabel import storage
from textlabel.report import write_report


def _per_class_rows(markdown: str, heading: str) -> dict[str, list[float]]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[0-9.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def _png_shape(loc: storage.Location) -> tuple[int, ...]:
    data = storage.read_bytes(loc)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import io
    return mpimg.imread(io.BytesIO(data), format="png").shape


def _check_against_sklearn(markdown: str, heading: str, y_true, y_pred, labels):
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=range(len(labels)), zero_division=0)
    table = _per_class_rows(markdown, heading)
    assert list(table) == labels
    for i, name in enumerate(labels):
        np.testing.assert_allclose(table[name], [precision[i], recall[i], f1[i], support[i]], atol=1e-4)


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
    _check_against_sklearn(markdown, "## Per class (fine-tuned model)", y_true, y_pred, labels)
    assert f"| fine-tuned model | {accuracy_score(y_true, y_pred):.4f} |" in markdown
    wrong = int((y_true != y_pred).sum())
    assert markdown.count("| message ") == min(10, wrong)
    for name in ["confusion_matrix.png", "training_curves.png"]:
        height, width = _png_shape(out.join(name))[:2]
        assert 300 <= height <= 3000 and 500 <= width <= 4000
