"""Long documents as overlapping windows, and a document's class probabilities from its windows' (pure: numpy).

An encoder reads at most --max-length tokens, special tokens included. With ``--long-texts
chunk`` a longer text is cut into windows of ``body = max_length - specials`` content tokens,
each starting ``body - overlap`` tokens after the one before: consecutive windows share
``overlap`` tokens and together cover every token of the text (the last window may be
shorter). At most ``max_chunks`` windows of a text are scored; the windows past them are
counted as dropped and the row is flagged ``truncated`` (some of its text was not read).

A document's probabilities combine its windows' (``combine``). COMBINE, the default, was
chosen by measuring every method on long documents built from SST-2
(benchmarks/long_documents.py; figures in the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODES = ("truncate", "chunk")
METHODS = ("mean", "tokens", "confident", "geometric", "max")
COMBINE = "confident"


@dataclass(frozen=True)
class LongTexts:
    """What happens to a text longer than the window: cut (``truncate``) or scored in windows (``chunk``)."""

    mode: str = "truncate"
    overlap: int | None = None  # content tokens two windows share; None: a quarter of the window
    max_chunks: int = 64

    @property
    def chunked(self) -> bool:
        return self.mode == "chunk"

    def overlap_for(self, max_length: int) -> int:
        """The overlap in tokens for windows of ``max_length``."""
        return max_length // 4 if self.overlap is None else self.overlap

    def problems(self, max_length: int) -> list[str]:
        """What is wrong with these options for windows of ``max_length`` tokens (for the config's one error)."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"--long-texts must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_chunks < 1:
            problems.append(f"--max-chunks must be >= 1, got {self.max_chunks}")
        if self.chunked and max_length < 16:  # special tokens and the overlap would leave a window no room
            problems.append(f"--max-length must be >= 16 with --long-texts chunk, got {max_length}")
        overlap = self.overlap_for(max_length)
        if overlap < 0 or overlap > max_length // 2:
            problems.append(f"--chunk-overlap must be between 0 and half of --max-length ({max_length // 2}), got {overlap}: "
                            "a larger overlap scores most tokens twice or more")
        return problems


def spans(tokens: int, body: int, overlap: int, max_chunks: int) -> tuple[list[tuple[int, int]], int]:
    """(start, stop) of each window over ``tokens`` content tokens, and how many windows past ``max_chunks``
    were dropped. A text of at most ``body`` tokens (an empty one too) is one window."""
    step = body - overlap
    if step < 1:
        raise ValueError(f"windows of {body} content tokens cannot overlap by {overlap}")
    total = 1 if tokens <= body else 1 + math.ceil((tokens - body) / step)
    kept = min(total, max_chunks)
    return [(k * step, min(k * step + body, tokens)) for k in range(kept)], total - kept


def covered(body: int, overlap: int, max_chunks: int) -> int:
    """Content tokens that ``max_chunks`` windows cover: reading past them is wasted."""
    return body + (max_chunks - 1) * (body - overlap)


def combine(probs: np.ndarray, owner: np.ndarray, rows: int, method: str = COMBINE,
            sizes: np.ndarray | None = None) -> np.ndarray:
    """Per-row class probabilities (rows x classes) from per-window ones; ``owner``: each window's row.

    mean: the windows' probabilities averaged; tokens: weighted by each window's tokens (``sizes``);
    confident: weighted by each window's certainty (its top probability above chance, so an undecided window
    counts little); geometric: their log-probabilities averaged, renormalised; max: the most confident window's.
    A row without windows gets zeros."""
    out = np.zeros((rows, probs.shape[1]), dtype=np.float64)
    if not len(owner):
        return out.astype(np.float32)
    if method == "max":
        best = np.lexsort((probs.max(axis=1), owner))  # by row, then confidence: the last of each row wins
        last = np.r_[owner[best][1:] != owner[best][:-1], True]
        out[owner[best][last]] = probs[best][last]
        return out.astype(np.float32)
    if method not in METHODS:
        raise ValueError(f"unknown combination {method!r}; one of {', '.join(METHODS)}")
    weights = np.ones(len(owner))
    if method == "tokens":
        weights = np.asarray(sizes, dtype=np.float64)
    elif method == "confident":
        chance = 1.0 / probs.shape[1]
        weights = np.maximum(probs.max(axis=1) - chance, 1e-6) / (1.0 - chance)
    values = np.log(np.clip(probs, 1e-12, 1.0)) if method == "geometric" else probs.astype(np.float64)
    np.add.at(out, owner, values * weights[:, None])
    total = np.bincount(owner, weights=weights, minlength=rows)[:, None]
    out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
    if method == "geometric":
        out = np.exp(out - out.max(axis=1, keepdims=True)) * (total > 0)
        out = np.divide(out, out.sum(axis=1, keepdims=True), out=np.zeros_like(out), where=total > 0)
    return out.astype(np.float32)
