"""Top-K ranking metrics for one relevant item per case (leave-one-out / replay evaluation).

Every function takes the recommended lists ``recs`` of shape (B, K) (item indices, best first; ``-1`` pads a list
that holds fewer than K items) and the held-out ``targets`` of shape (B,). Relevance is binary and there is one
relevant item per case, so the ideal DCG is 1 and NDCG@K = 1 / log2(rank + 2) with ``rank`` the 0-based position
of the target (0 when it is absent) (Järvelin & Kekäläinen 2002; the single-target form as in He et al. 2017,
"Neural Collaborative Filtering").

>>> recs = np.array([[5, 7, 9], [1, 2, 3], [4, 8, -1]])
>>> targets = np.array([7, 3, 6])
>>> target_ranks(recs, targets).tolist()
[1, 2, -1]
>>> round(hit_rate(recs, targets), 4)   # 2 hits out of 3
0.6667
>>> round(ndcg(recs, targets), 4)       # (1/log2(3) + 1/log2(4) + 0) / 3
0.377
>>> round(mrr(recs, targets), 4)        # (1/2 + 1/3 + 0) / 3
0.2778
"""

from __future__ import annotations

import numpy as np


def _check(recs: np.ndarray, targets: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    recs, targets = np.asarray(recs), np.asarray(targets)
    if recs.ndim != 2 or targets.ndim != 1 or recs.shape[0] != targets.shape[0]:
        raise ValueError(f"recs must be (B, K) and targets (B,) with the same B; got {recs.shape} and "
                         f"{targets.shape}")
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        recs = recs[:, :k]
    return recs, targets


def target_ranks(recs: np.ndarray, targets: np.ndarray, k: int | None = None) -> np.ndarray:
    """0-based position of each target in its list, ``-1`` where it is not among the first ``k``.

    Args:
        recs: (B, K) recommended item indices, best first; ``-1`` pads.
        targets: (B,) the relevant item of each case (never ``-1``).
        k: cut-off; ``None`` uses all K columns.

    Returns:
        (B,) int64 ranks.

    Raises:
        ValueError: the shapes do not match or ``k < 1``.

    >>> target_ranks(np.array([[3, 2, 3], [0, 1, 2]]), np.array([3, 2]), k=2).tolist()
    [0, -1]
    """
    recs, targets = _check(recs, targets, k)
    match = recs == targets[:, None]                                  # (B, K)
    found = match.any(axis=1)
    return np.where(found, match.argmax(axis=1), -1).astype(np.int64)  # argmax: first match


def hit_rate(recs: np.ndarray, targets: np.ndarray, k: int | None = None) -> float:
    """HR@K: share of cases whose target is in the top K. Empty input gives ``nan``.

    >>> hit_rate(np.array([[1, 2], [3, 4]]), np.array([2, 5]))
    0.5
    """
    ranks = target_ranks(recs, targets, k)
    return float(np.mean(ranks >= 0)) if ranks.size else float("nan")


def ndcg(recs: np.ndarray, targets: np.ndarray, k: int | None = None) -> float:
    """NDCG@K with one relevant item: mean of ``1 / log2(rank + 2)`` over cases, 0 for a miss.

    >>> ndcg(np.array([[1, 2]]), np.array([1]))
    1.0
    >>> round(ndcg(np.array([[1, 2]]), np.array([2])), 6)  # 1/log2(3)
    0.63093
    """
    ranks = target_ranks(recs, targets, k)
    if not ranks.size:
        return float("nan")
    gains = np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    return float(gains.mean())


def mrr(recs: np.ndarray, targets: np.ndarray, k: int | None = None) -> float:
    """MRR@K: mean of ``1 / (rank + 1)`` over cases, 0 for a miss.

    >>> mrr(np.array([[1, 2, 3], [1, 2, 3]]), np.array([3, 9]))  # (1/3 + 0) / 2
    0.16666666666666666
    """
    ranks = target_ranks(recs, targets, k)
    if not ranks.size:
        return float("nan")
    return float(np.where(ranks >= 0, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0).mean())
