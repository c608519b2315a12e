"""Ranking and calibration metrics for CTR predictions.

AUC is the Mann-Whitney statistic from ranks, ties sharing their average rank (the probability that a random
positive scores above a random negative, ties counting one half). GAUC (Zhou et al. 2018, DIN) is the per-user
AUC weighted by the user's number of samples, over users with both classes.

Legend: N samples.
"""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (N,), tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve.

    Args:
        labels: (N,) 0/1; scores: (N,) any monotone score (logits or probabilities).

    Raises:
        ValueError: only one class is present (AUC is undefined).

    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    >>> auc(np.array([0, 1]), np.array([0.5, 0.5]))
    0.5
    """
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats; probabilities are clipped to [eps, 1 - eps].

    >>> round(logloss(np.array([1, 0]), np.array([0.5, 0.5])), 4)
    0.6931
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's sample count, over users with both classes.

    Raises:
        ValueError: no user has both classes.

    >>> gauc(np.array([1, 1, 2, 2, 2, 3]), np.array([0, 1, 0, 1, 1, 1]), np.array([0.2, 0.9, 0.5, 0.4, 0.6, 0.1]))
    0.7
    """
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores)
    order = np.argsort(users, kind="mergesort")
    users, labels, scores = users[order], labels[order], scores[order]
    bounds = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1, len(users)]
    total, weight = 0.0, 0
    for s, e in zip(bounds[:-1], bounds[1:]):
        y = labels[s:e]
        if 0 < y.sum() < len(y):
            total += (e - s) * auc(y, scores[s:e])
            weight += e - s
    if weight == 0:
        raise ValueError("GAUC needs at least one user with both positive and negative samples")
    return float(total / weight)
