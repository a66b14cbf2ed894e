"""metrics.py: the figures metrics.json and the reports carry, checked by hand on a small confusion."""

from __future__ import annotations

import numpy as np
import pytest

from textlabel.metrics import classification_metrics


def test_accuracy_macro_f1_and_per_class_figures_by_label_name():
    # truth:     a a a b b c ; predicted: a a b b c c
    y_true, y_pred = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert m["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["c"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_a_class_never_seen_nor_predicted_counts_zero_in_the_macro_average():
    m = classification_metrics(np.array([0, 0, 1]), np.array([0, 0, 1]), ["a", "b", "unused"])
    assert m["accuracy"] == 1.0 and m["per_class"]["unused"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(2 / 3)
