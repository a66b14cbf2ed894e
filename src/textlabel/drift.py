"""Night over night: what each run labelled, and whether tonight's labels moved.

Every output file records, per task, how many rows were predicted each class and a
histogram of their top scores (``LabelStats``, also in the file's Parquet metadata). A
night's figures are the sum over the files it labelled; the history of nights lives in
``OUTPUT/_report/drift.json`` (one entry per night, keyed by the run that completed it)
and is drawn in ``OUTPUT/_report/drift.png``.

Tonight is compared, by the population stability index

    PSI = sum over classes of (tonight's share - reference share) * ln(tonight's share / reference share)

(shares floored at 1e-4, so a class that vanishes counts, but finitely), against two
references: the model's training label distribution (saved with the model) and the pooled
labels of the last 7 recorded nights. The first is the primary reference when the model
carries it; a model trained elsewhere is compared with the recorded nights, and its first
night has no reference. A PSI above 0.1 is usually read as a shift worth a look, above
0.25 as a major one. Classes count every scored row's predicted class, abstained rows
included, so --min-score does not move the distribution. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SCORE_BINS = 10  # histogram of top scores over [0, 1]
FLOOR = 1e-4
RECENT = 7  # nights pooled into the "last 7 nights" reference
KEEP = 400  # nights kept in the history
TRAINING, RECENT_NIGHTS = "training", "last_7_nights"


def task_stats(ids: np.ndarray, scores: np.ndarray, classes: int, abstained: np.ndarray) -> dict[str, Any]:
    """One task's figures for scored rows: predicted class counts, top-score histogram and sum, abstentions."""
    hist = np.histogram(scores, bins=SCORE_BINS, range=(0.0, 1.0))[0]
    return {"counts": np.bincount(ids, minlength=classes).tolist(), "scores": hist.tolist(),
            "score_sum": float(scores.sum(dtype=np.float64)), "abstained": int(abstained.sum())}


def add(a: list[dict] | None, b: list[dict] | None) -> list[dict] | None:
    """Two sets of per-task figures summed (None counts as nothing)."""
    if not a or not b:
        return [dict(t) for t in (a or b)] if (a or b) else None
    return [{"counts": (np.asarray(x["counts"]) + np.asarray(y["counts"])).tolist(),
             "scores": (np.asarray(x["scores"]) + np.asarray(y["scores"])).tolist(),
             "score_sum": x["score_sum"] + y["score_sum"], "abstained": x["abstained"] + y["abstained"]}
            for x, y in zip(a, b)]


def shares(counts: list[int] | np.ndarray) -> np.ndarray:
    """Counts as shares of their total (all zero for no rows)."""
    c = np.asarray(counts, dtype=np.float64)
    return c / c.sum() if c.sum() else c


def psi(reference: np.ndarray, tonight: np.ndarray) -> float:
    """Population stability index of ``tonight``'s shares against ``reference``'s."""
    e, a = np.maximum(reference, FLOOR), np.maximum(tonight, FLOOR)
    return float(((a - e) * np.log(a / e)).sum())


@dataclass
class Task:
    """A task as drift sees it: its key in the summary, its labels, and its training counts if known."""

    key: str
    labels: list[str]
    training: list[int] | None = None


def night_entry(run: str, runs: list[str], finished_at: str, model: str, tasks: list[Task],
                stats: list[dict]) -> dict[str, Any]:
    """A night's history entry."""
    rows = int(sum(stats[0]["counts"])) if stats else 0
    return {"night": run, "runs": runs, "finished_at": finished_at, "model": model, "rows": rows,
            "tasks": [{"key": t.key, "labels": t.labels, **s} for t, s in zip(tasks, stats)]}


def _recent(history: list[dict], k: int, labels: list[str]) -> tuple[np.ndarray | None, int]:
    """Pooled counts of task ``k`` over the last RECENT nights that had its label set."""
    nights = [n for n in history if len(n["tasks"]) > k and n["tasks"][k]["labels"] == labels][-RECENT:]
    if not nights:
        return None, 0
    return np.sum([n["tasks"][k]["counts"] for n in nights], axis=0), len(nights)


def _moved(labels: list[str], reference: np.ndarray, tonight: np.ndarray, top: int = 3) -> list[str]:
    delta = tonight - reference
    order = np.argsort(-np.abs(delta))[:top]
    return [f"{labels[i]} {reference[i]:.1%} -> {tonight[i]:.1%}" for i in order if abs(delta[i]) >= 0.005]


def compare(tonight: dict[str, Any], history: list[dict], tasks: list[Task], max_drift: float) -> dict[str, Any]:
    """The summary's ``drift``: tonight's shares and PSI against each reference, per task, and ``flagged``."""
    primary = TRAINING if all(t.training for t in tasks) else (RECENT_NIGHTS if history else None)
    out: dict[str, Any] = {"max_drift": max_drift, "primary": primary, "rows": tonight["rows"], "tasks": {}}
    flagged, moved, nights = False, [], 0
    for k, (t, now) in enumerate(zip(tasks, tonight["tasks"])):
        share = shares(now["counts"])
        refs = {TRAINING: shares(t.training)} if t.training else {}
        recent, nights = _recent(history, k, t.labels)
        if recent is not None:
            refs[RECENT_NIGHTS] = shares(recent)
        figures = {name: round(psi(ref, share), 4) for name, ref in refs.items()}
        rows = max(1, int(sum(now["counts"])))
        out["tasks"][t.key] = {
            "psi": figures, "mean_score": round(now["score_sum"] / rows, 4), "score_histogram": now["scores"],
            "abstained": now["abstained"],
            "shares": {"tonight": dict(zip(t.labels, np.round(share, 4).tolist())),
                       **{name: dict(zip(t.labels, np.round(ref, 4).tolist())) for name, ref in refs.items()}}}
        if primary in figures and figures[primary] > max_drift:
            flagged = True
            moved.append(f"{t.key}: PSI {figures[primary]:.3f} against the {primary.replace('_', ' ')} labels; "
                         + ", ".join(_moved(t.labels, refs[primary], share)))
    out |= {"nights_in_reference": nights, "flagged": flagged, "moved": moved}
    return out


def history_png(history: list[dict]) -> bytes:
    """Per task: each night's label shares (stacked) and mean top score, across the recorded history."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = history[-1]["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)), layout="constrained", squeeze=False)
    x = np.arange(len(history))
    names = [n["finished_at"][:10] or n["night"][:8] for n in history]
    for k, task in enumerate(tasks):
        nights = [n for n in history if len(n["tasks"]) > k and n["tasks"][k]["labels"] == task["labels"]]
        xs = np.array([history.index(n) for n in nights])
        share = np.array([shares(n["tasks"][k]["counts"]) for n in nights]).T
        bottom = np.zeros(len(nights))
        shown = np.argsort(-share.sum(axis=1))[:12]  # the 12 biggest classes; the rest as one
        for i in shown:
            axes[k][0].bar(xs, share[i], bottom=bottom, label=task["labels"][i])
            bottom += share[i]
        if len(shown) < len(share):
            axes[k][0].bar(xs, 1 - bottom, bottom=bottom, color="lightgrey", label="other classes")
        axes[k][0].set(title=f"{task['key']}: label shares per night", ylim=(0, 1), ylabel="share of rows")
        axes[k][0].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
        mean = [n["tasks"][k]["score_sum"] / max(1, sum(n["tasks"][k]["counts"])) for n in nights]
        axes[k][1].plot(xs, mean, "o-")
        axes[k][1].set(title=f"{task['key']}: mean top score per night", ylim=(0, 1.02), ylabel="mean score")
        for ax in axes[k]:
            ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
            ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
