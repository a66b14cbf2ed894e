"""Reading a textlabel report back: its per-class tables and PNGs, checked against scikit-learn."""

from __future__ import annotations

import io
import re

import matplotlib.image as mpimg
import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from textlabel import storage


def per_class_rows(markdown: str, heading: str) -> dict[str, list[float]]:
    """The per-class table under ``heading``: class -> [precision, recall, F1, support]."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[0-9.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def png_shape(loc: storage.Location) -> tuple[int, ...]:
    """The shape of a PNG the report wrote (failing if it is not a PNG)."""
    data = storage.read_bytes(loc)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(data), format="png").shape


def check_against_sklearn(markdown: str, heading: str, y_true, y_pred, labels) -> None:
    """The per-class table under ``heading`` equals scikit-learn's figures for the same predictions."""
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=range(len(labels)), zero_division=0)
    table = per_class_rows(markdown, heading)
    assert list(table) == labels
    for i, name in enumerate(labels):
        np.testing.assert_allclose(table[name], [precision[i], recall[i], f1[i], support[i]], atol=1e-4)
