"""Calibrated scores: a temperature per task, fitted on validation rows; calibration error; abstaining.

A fine-tuned classifier's softmax is rarely a probability a user can act on: after a few
epochs it says 0.99 where it is right 90% of the time. Temperature scaling (Guo et al.,
2017) divides the logits by one number T per task, fitted after training by minimising
the negative log-likelihood (NLL) of the validation rows. It keeps every row's predicted
class (the argmax is unchanged) and moves only how sure the scores are.

softmax(logits / T) equals softmax(log(p) / T) for p = softmax(logits): the temperature can
be applied to probabilities, which is what a chunked document's windows carry. Pure numpy
and scipy: no torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

BINS = 15  # expected calibration error over 15 equal-width confidence bins, as is usual
T_RANGE = (0.05, 20.0)  # temperatures searched (log scale)
FLOOR = 1e-12


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``probs`` (rows x classes) with their logits divided by ``temperature``."""
    if temperature == 1.0 or len(probs) == 0:
        return probs
    z = np.log(np.clip(probs, FLOOR, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(probs.dtype, copy=False)


def nll(probs: np.ndarray, gold: np.ndarray) -> float:
    """Mean negative log-likelihood of the gold classes."""
    return float(-np.log(np.clip(probs[np.arange(len(gold)), gold], FLOOR, 1.0)).mean()) if len(gold) else float("nan")


def fit_temperature(probs: np.ndarray, gold: np.ndarray,
                    combine: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """The temperature minimising NLL of ``gold`` under ``probs`` (rows x classes); 1.0 when the model gets every
    row right. ``combine``: maps scaled window probabilities to the rows' (a chunked document's windows are
    scaled, then combined)."""
    from scipy.optimize import minimize_scalar

    join = combine or (lambda p: p)
    if len(gold) == 0 or probs.shape[1] < 2 or (join(probs).argmax(1) == gold).all():
        # Rows the model gets all right say nothing about how sure it should be: NLL falls as T -> 0, and
        # fitting would make every score 1.0. Leave the scores as they are.
        return 1.0

    def loss(log_t: float) -> float:
        return nll(join(scaled(probs, math.exp(log_t))), gold)

    found = minimize_scalar(loss, bounds=tuple(map(math.log, T_RANGE)), method="bounded", options={"xatol": 1e-4})
    best = math.exp(found.x)
    return round(best, 4) if loss(math.log(best)) < loss(0.0) else 1.0


def bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin (scikit-learn's calibration_curve binning): rows, mean confidence and
    accuracy (NaN for an empty bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], confidence)
    count = np.bincount(ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(ids, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(ids, weights=correct.astype(float), minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = BINS) -> float:
    """Expected calibration error: the row-weighted mean |accuracy - confidence| over the bins."""
    if len(confidence) == 0:
        return float("nan")
    b = bins(confidence, correct, n_bins)
    used = b["count"] > 0
    return float((b["count"][used] * np.abs(b["accuracy"][used] - b["confidence"][used])).sum() / len(confidence))


def summary(probs: np.ndarray, gold: np.ndarray, temperature: float,
            combine: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """A task's calibration figures on labelled rows: NLL and ECE before and after ``temperature``."""
    join = combine or (lambda p: p)
    before, after = join(probs), join(scaled(probs, temperature))
    return {"temperature": temperature, "rows": int(len(gold)),
            "nll_before": round(nll(before, gold), 5), "nll_after": round(nll(after, gold), 5),
            "ece_before": round(ece(before.max(1), before.argmax(1) == gold), 5),
            "ece_after": round(ece(after.max(1), after.argmax(1) == gold), 5)}


def coverage(scores: np.ndarray, correct: np.ndarray, thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
             ) -> list[dict[str, float]]:
    """What --min-score S would do, per S: the share of rows abstained and the accuracy of the rest."""
    rows = []
    for s in thresholds:
        kept = scores >= s
        rows.append({"min_score": s, "abstained": round(float(1 - kept.mean()), 4) if len(scores) else 0.0,
                     "accuracy": round(float(correct[kept].mean()), 4) if kept.any() else None})
    return rows


def abstains(label_ids: np.ndarray, scores: np.ndarray, per_class: np.ndarray | None) -> np.ndarray:
    """Rows whose top score is under their predicted class's --min-score (``per_class``: one threshold a class)."""
    if per_class is None or len(label_ids) == 0:
        return np.zeros(len(label_ids), dtype=bool)
    return scores < per_class[label_ids]


def reliability_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "Reliability") -> bytes:
    """A reliability diagram per named set of (confidence, correct): accuracy per confidence bin against the
    diagonal, the rows in each bin written on its bar, and the ECE in the title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.6), layout="constrained", squeeze=False)
    for ax, (name, (confidence, correct)) in zip(axes[0], curves.items()):
        b = bins(confidence, correct)
        mids, width = (b["edges"][:-1] + b["edges"][1:]) / 2, 1.0 / BINS
        used = b["count"] > 0
        ax.bar(mids[used], b["accuracy"][used], width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot(b["confidence"][used], b["accuracy"][used], "o", color="tab:orange", ms=3, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
        for x, y, n in zip(mids[used], b["accuracy"][used], b["count"][used]):
            ax.annotate(str(int(n)), (x, min(y, 0.93) + 0.02), ha="center", fontsize=7, rotation=90)
        ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top score)", ylabel="accuracy",
               title=f"{name}: ECE {ece(confidence, correct):.3f} ({len(confidence)} rows)")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
