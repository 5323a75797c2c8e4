"""Evaluation metrics as pure functions, plus score histograms that let a coordinator pool AUROC
across sites without seeing any patient's score."""

from __future__ import annotations

import numpy as np

HISTOGRAM_BINS = 1000


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half). NaN when one class is absent."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_scores = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def brier(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean squared error of the class probabilities against one-hot labels (binary: of P(y=1))."""
    proba = np.asarray(proba, np.float64)
    y = np.asarray(y, np.int64)
    if proba.shape[1] == 2:
        return float(np.mean((proba[:, 1] - y) ** 2))
    onehot = np.eye(proba.shape[1])[y]
    return float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    return float(np.mean(np.asarray(proba).argmax(axis=1) == np.asarray(y)))


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    p = np.clip(np.asarray(proba, np.float64)[np.arange(len(y)), np.asarray(y, np.int64)], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def evaluate(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The metrics a site reports for a model on its held-out rows."""
    scores = proba[:, 1] if proba.shape[1] == 2 else proba.max(axis=1)
    out = {
        "n": float(len(y)),
        "accuracy": accuracy(y, proba),
        "brier": brier(y, proba),
        "log_loss": log_loss(y, proba),
    }
    if proba.shape[1] == 2:
        out["auroc"] = auroc(y, scores)
    return out


def score_histograms(y: np.ndarray, p1: np.ndarray, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positives and negatives per score bin on [0, 1]: enough to pool AUROC, not to re-identify."""
    idx = np.clip((np.asarray(p1, np.float64) * bins).astype(np.int64), 0, bins - 1)
    y = np.asarray(y).astype(bool)
    return np.bincount(idx[y], minlength=bins), np.bincount(idx[~y], minlength=bins)


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from binned scores (ties within a bin count half): exact up to the bin width."""
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))
