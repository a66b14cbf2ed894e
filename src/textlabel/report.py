"""The evaluation report: confusion matrix and training-curve PNGs, report.md, a TF-IDF baseline.

Everything is computed with scikit-learn from (true, predicted) label ids and
drawn with matplotlib's Agg backend, so a report can be written on any worker.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from textlabel import calibration, storage
from textlabel.metrics import classification_metrics

logger = logging.getLogger(__name__)


def tfidf_baseline(train_texts: list[str], train_ids: np.ndarray, val_texts: list[str], val_ids: np.ndarray,
                   labels: list[str]) -> dict[str, Any]:
    """The traditional method: TF-IDF (word 1-2 grams) + logistic regression, same split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                          LogisticRegression(max_iter=2000, C=4.0))
    model.fit(train_texts, train_ids)
    return classification_metrics(val_ids, model.predict(val_texts), labels)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def confusion_png(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> bytes:
    """Counts and row-normalised confusion matrices side by side, class names on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    ids = list(range(len(labels)))
    size = max(5.0, 0.45 * len(labels) + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    for ax, normalize, title in [(axes[0], None, "counts"), (axes[1], "true", "share of each true class")]:
        ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, labels=ids, display_labels=labels, normalize=normalize, ax=ax,
            colorbar=False, cmap="Blues", values_format=".2f" if normalize else "d",
            include_values=len(labels) <= 20, xticks_rotation=45 if len(labels) > 4 else "horizontal",
        )
        ax.set_title(f"Confusion matrix ({title})")
    data = _png(fig)
    plt.close(fig)
    return data


def curves_png(epochs: list[dict], best_epoch: int | None = None) -> bytes:
    """Train and validation loss, validation accuracy and macro-F1, per epoch (``best_epoch``: the one exported,
    marked when it is not the last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    loss_ax.plot(x, [e["train_loss"] for e in epochs], "o-", label="train loss")
    loss_ax.plot(x, [e["val_loss"] for e in epochs], "o-", label="validation loss")
    score_ax.plot(x, [e["val_accuracy"] for e in epochs], "o-", label="validation accuracy")
    score_ax.plot(x, [e["val_macro_f1"] for e in epochs], "o-", label="validation macro-F1")
    if best_epoch is not None and best_epoch != x[-1]:
        for ax in (loss_ax, score_ax):
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"exported: epoch {best_epoch}")
    for ax, title in [(loss_ax, "Loss"), (score_ax, "Validation scores")]:
        ax.set_xlabel("epoch")
        ax.set_xticks(x)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_ylim(bottom=0)
    lowest = min(min(e["val_accuracy"], e["val_macro_f1"]) for e in epochs)
    score_ax.set_ylim(max(0.0, lowest - 0.1), 1.0)  # absolute scale: no offset axis for one epoch
    data = _png(fig)
    plt.close(fig)
    return data


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], top: int = 5) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) mistakes."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    np.fill_diagonal(cm, 0)
    flat = np.argsort(cm, axis=None)[::-1][:top]
    return [(labels[i], labels[j], int(cm[i, j])) for i, j in zip(*np.unravel_index(flat, cm.shape)) if cm[i, j] > 0]


def _metrics_table(named: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| model | accuracy | macro-F1 |", "| --- | --- | --- |"]
    lines += [f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |" for name, m in named.items()]
    return lines


def _per_class_table(metrics: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    for name, c in metrics["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    return lines


def length_groups(y_true: np.ndarray, y_pred: np.ndarray, chunks: np.ndarray | None, truncated: np.ndarray) -> dict[str, Any]:
    """Rows and accuracy of the short rows beside the long ones: chunked (more than one window) and truncated
    (some text not read). ``chunks``: windows per row with --long-texts chunk, else None."""
    groups = {"read whole": ~truncated, "truncated": truncated} if chunks is None else \
        {"one window": chunks == 1, "chunked": chunks > 1, "truncated (windows past --max-chunks)": truncated}
    return {name: {"rows": int(m.sum()), "accuracy": float((y_true[m] == y_pred[m]).mean()) if m.any() else None}
            for name, m in groups.items()}


def _length_table(groups: dict[str, Any]) -> list[str]:
    lines = ["## Long documents", "", "| rows | count | accuracy |", "| --- | --- | --- |"]
    lines += [f"| {name} | {g['rows']} | {'-' if g['accuracy'] is None else format(g['accuracy'], '.4f')} |"
              for name, g in groups.items()]
    return lines + [""]


@dataclass
class Scores:
    """How far the scores can be trusted: (confidence, correct) per row for each set drawn in reliability.png
    (before and after calibration, or the scores as labelling gives them), the calibration figures if fitted."""

    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    calibration: dict[str, Any] | None = None  # calibration.summary's figures

    def figures(self) -> dict[str, Any]:
        """ECE of each set, the calibration record, and what --min-score would do (on the last set)."""
        confidence, correct = list(self.curves.values())[-1]
        return {"ece": {name: round(calibration.ece(c, ok), 5) for name, (c, ok) in self.curves.items()},
                **({"calibration": self.calibration} if self.calibration else {}),
                "min_score": calibration.coverage(confidence, correct)}


def _scores_lines(figures: dict[str, Any]) -> list[str]:
    lines = ["## Scores", "", "Expected calibration error (15 bins; 0 = a score of 0.8 is right 80% of the time):", "",
             "| scores | ECE |", "| --- | --- |", *[f"| {n} | {v:.4f} |" for n, v in figures["ece"].items()], ""]
    if figures.get("calibration"):
        c = figures["calibration"]
        lines += [f"Temperature {c['temperature']:.3f}, fitted on {c['rows']} validation rows: NLL {c['nll_before']:.4f} "
                  f"-> {c['nll_after']:.4f}.", ""]
    lines += ["![reliability diagram](reliability.png)", "", "What `--min-score` would do on these rows:", "",
              "| --min-score | rows abstained | accuracy of the rest |", "| --- | --- | --- |"]
    lines += [f"| {r['min_score']} | {r['abstained']:.1%} | {'-' if r['accuracy'] is None else format(r['accuracy'], '.4f')} |"
              for r in figures["min_score"]]
    return lines + [""]


def report_markdown(metrics: dict[str, Any], labels: list[str], y_true: np.ndarray, y_pred: np.ndarray,
                    texts: list[str], baseline: dict[str, Any] | None, has_curves: bool) -> str:
    """report.md: headline table, per-class table, confused pairs, misclassified examples."""
    named = {"fine-tuned model": metrics}
    if baseline:
        named["TF-IDF + logistic regression (same split)"] = baseline
    lines = [f"# Evaluation report\n\n{len(y_true)} labelled rows, {len(labels)} classes.\n", *_metrics_table(named), ""]
    lines += ["![confusion matrix](confusion_matrix.png)", ""]
    if has_curves:
        lines += ["![training curves](training_curves.png)", ""]
    if metrics.get("by_length"):
        lines += _length_table(metrics["by_length"])
    if metrics.get("scores"):
        lines += _scores_lines(metrics["scores"])
    lines += ["## Per class (fine-tuned model)", "", *_per_class_table(metrics), ""]
    if baseline:
        lines += ["## Per class (TF-IDF baseline)", "", *_per_class_table(baseline), ""]
    lines += ["## Most confused pairs", "", "| true | predicted | rows |", "| --- | --- | --- |"]
    lines += [f"| {t} | {p} | {n} |" for t, p, n in confused_pairs(y_true, y_pred, labels)] + [""]
    wrong = np.flatnonzero(y_true != y_pred)[:10]
    lines += ["## Misclassified examples", "", "| text | true | predicted |", "| --- | --- | --- |"]
    lines += [f"| {texts[i].replace('|', '/')[:200]} | {labels[y_true[i]]} | {labels[y_pred[i]]} |" for i in wrong]
    return "\n".join(lines) + "\n"


def write_report(directory: storage.Location, labels: list[str], y_true: np.ndarray, y_pred: np.ndarray,
                 texts: list[str], epochs: list[dict] | None = None, baseline: dict[str, Any] | None = None,
                 by_length: dict[str, Any] | None = None, scores: Scores | None = None,
                 best_epoch: int | None = None) -> dict[str, Any]:
    """Write report.md and its PNGs under ``directory``; returns the model's metrics (with ``by_length``:
    length_groups' figures, and ``scores``: ECE, calibration and abstaining, with reliability.png)."""
    metrics = classification_metrics(y_true, y_pred, labels) | ({"by_length": by_length} if by_length else {})
    if scores is not None:
        metrics["scores"] = scores.figures()
        storage.write_bytes(directory.join("reliability.png"), calibration.reliability_png(scores.curves))
    storage.write_bytes(directory.join("confusion_matrix.png"), confusion_png(y_true, y_pred, labels))
    if epochs:
        storage.write_bytes(directory.join("training_curves.png"), curves_png(epochs, best_epoch))
    markdown = report_markdown(metrics, labels, y_true, y_pred, texts, baseline, bool(epochs))
    storage.write_bytes(directory.join("report.md"), markdown.encode())
    logger.info("report written to %s", directory.join("report.md").url)
    return metrics
