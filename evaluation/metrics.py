"""The metrics of evaluation, in one module.

1. Top-K ranking metrics of recommended lists ``recs`` of shape (B, K) (item indices, best first; ``-1`` pads a
   list that holds fewer than K items), each at a cut-off ``k`` (``None``: all K columns):

   - one relevant item per case (leave-one-out / replay evaluation: the held-out ``targets`` of shape (B,)): HR@K,
     NDCG@K, MRR@K. Relevance is binary and there is one relevant item per case, so the ideal DCG is 1 and
     NDCG@K = 1 / log2(rank + 2) with ``rank`` the 0-based position of the target (0 when it is absent)
     (Järvelin & Kekäläinen 2002; the single-target form as in He et al. 2017, "Neural Collaborative Filtering");
   - any number of relevant items per case: mAP@K (``average_precision_at_k``), which for one relevant item is
     MRR@K;
   - beyond accuracy, over all the lists: catalogue ``coverage`` and ``novelty`` (mean self-information, bits;
     Zhou et al. 2010).

2. Curves of a binary classifier's scores at every distinct threshold: ROC (``roc_points``; Fawcett 2006) and
   precision-recall (``precision_recall_points``).

3. CTR metrics, re-exported from training.metrics (the trainer's own module, which must not import evaluation):
   ``auc``, ``gauc`` (Zhou et al. 2018) and ``logloss``.

Legend: B cases, K list length, N items (max item_idx + 1; item 0 is padding), S scored samples, T distinct
scores.

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
>>> round(average_precision_at_k(recs, targets), 4)   # one relevant item per case: MRR@K
0.2778
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from training.metrics import auc, gauc, logloss

__all__ = ["target_ranks", "hit_rate", "ndcg", "mrr", "average_precision_at_k", "coverage", "novelty", "roc_points",
           "precision_recall_points", "auc", "gauc", "logloss"]


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


def average_precision_at_k(recs: np.ndarray, relevant: np.ndarray | Sequence[Collection[int]],
                           k: int | None = None) -> float:
    """mAP@K: the mean over cases with one or more relevant items of the case's average precision at K,
    ``AP@K = sum_{i < K} P@(i + 1) * rel_i / min(|R|, K)``, with ``rel_i`` 1 when the item at 0-based position
    ``i`` is relevant (and not already counted higher in the list) and ``P@(i + 1)`` the share of relevant items
    among the first ``i + 1``; ``|R|`` the case's relevant items (the normalisation of RecBole's MAP@K). A case with
    no relevant item is left out; none at all gives ``nan``.

    With one relevant item, AP@K is ``1 / (rank + 1)`` when it is among the first K and 0 otherwise: mAP@K equals
    MRR@K (``mrr``).

    Args:
        recs: (B, K) recommended item indices, best first; ``-1`` pads.
        relevant: (B,) int, the one relevant item of each case (as ``targets`` elsewhere here), or B collections
            of relevant item indices (any number, possibly none; negative indices are padding and ignored).
        k: cut-off; ``None`` uses all K columns.

    Returns:
        mAP@K in [0, 1].

    Raises:
        ValueError: ``recs`` is not (B, K), ``relevant`` has not B entries, or ``k < 1``.

    >>> recs = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]])
    >>> round(average_precision_at_k(recs, [{1, 3}, {9}, set()]), 4)   # ((1/1 + 2/3) / 2 + 0) / 2; third left out
    0.4167
    >>> average_precision_at_k(recs[:1], [{1, 2, 5, 6, 7}], k=2)   # both of 2 relevant: over min(5, 2)
    1.0
    >>> average_precision_at_k(recs[:2], np.array([3, 8])) == mrr(recs[:2], np.array([3, 8]))   # (1/3 + 1/4) / 2
    True
    """
    recs = np.asarray(recs)
    if recs.ndim != 2:
        raise ValueError(f"recs must be (B, K), got {recs.shape}")
    if len(relevant) != recs.shape[0]:
        raise ValueError(f"relevant must have one entry per case: {len(relevant)} for {recs.shape[0]} cases")
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        recs = recs[:, :k]
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and relevant.dtype != object:
        ranks = target_ranks(recs, relevant)                                     # (B,) one relevant item each
        return float(np.where(ranks >= 0, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0).mean()) if ranks.size \
            else float("nan")
    positions = np.arange(1, recs.shape[1] + 1)                                 # (K,) 1-based
    aps = []
    for row, rel in zip(recs, relevant):
        rel = {int(i) for i in rel if i >= 0}                                   # negative ids: padding
        if not rel:
            continue
        first = np.zeros(row.size, dtype=bool)                                  # (K,) first occurrence of an item
        first[np.unique(row, return_index=True)[1]] = True
        hits = first & np.isin(row, list(rel))                                  # (K,) rel_i
        precision = np.cumsum(hits) / positions                                 # (K,) P@(i + 1)
        aps.append(float((precision * hits).sum() / min(len(rel), row.size)))
    return float(np.mean(aps)) if aps else float("nan")


def coverage(recs: np.ndarray, n_items: int) -> float:
    """Catalogue coverage: distinct recommended items over the catalogue's ``n_items - 1`` items (item 0 is
    padding; ``-1`` pads and 0 are not counted).

    Args:
        recs: (B, K) item indices, every one < ``n_items``.

    >>> coverage(np.array([[1, 2], [2, -1]]), n_items=5)   # {1, 2} of {1, 2, 3, 4}
    0.5
    """
    return float(np.unique(recs[recs > 0]).size / (n_items - 1))


def novelty(recs: np.ndarray, train_items: np.ndarray, n_items: int) -> float:
    """Mean self-information ``-log2 p(i)`` (bits) of the recommended items, ``p(i) = (c_i + 1) / (E + N)`` from
    the training counts ``c`` (add-one smoothing, so an unseen item is finite; Zhou et al. 2010). ``nan`` when no
    item is recommended.

    Args:
        recs: (B, K) item indices, ``-1`` pads (not counted); train_items: (E,) the training events' items.

    >>> round(novelty(np.array([[1, 2]]), np.array([1, 1, 1]), n_items=3), 4)   # p = 4/6, 1/6: (0.585 + 2.585) / 2
    1.585
    """
    c = np.bincount(train_items, minlength=n_items).astype(np.float64)
    p = (c + 1.0) / (train_items.size + n_items)
    r = recs[recs >= 0]
    return float((-np.log2(p[r])).mean()) if r.size else float("nan")


def _threshold_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """True and false positives (T,) when every sample scoring at least each distinct score is called positive,
    from the highest score to the lowest, and the numbers of positives and negatives."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]          # last index of each distinct score
    return np.cumsum(y)[last], np.cumsum(1 - y)[last], float(labels.sum()), float((1 - labels).sum())


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve: false and true positive rates at every distinct score threshold, from (0, 0) to (1, 1)
    (Fawcett 2006).

    Args:
        labels: (S,) 0/1; scores: (S,) higher = more likely positive.

    Returns:
        fpr, tpr: (T + 1,) float64, T distinct scores.

    Raises:
        ValueError: only one class present.

    >>> fpr, tpr = roc_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    tp, fp, pos, neg = _threshold_counts(labels, scores)
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both classes in the labels")
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def precision_recall_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve: precision and recall when every sample scoring at least the threshold is called
    positive, at every distinct score threshold from the highest to the lowest, after the point (precision 1,
    recall 0) of calling nothing positive (sklearn's ``precision_recall_curve`` in reverse order).

    Args:
        labels: (S,) 0/1; scores: (S,) higher = more likely positive.

    Returns:
        precision, recall: (T + 1,) float64, T distinct scores; recall ends at 1, precision at the share of
        positives.

    Raises:
        ValueError: no positive label (recall is undefined).

    >>> precision, recall = precision_recall_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    >>> np.round(precision, 4).tolist(), recall.tolist()
    ([1.0, 1.0, 0.5, 0.6667, 0.5], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    tp, fp, pos, _ = _threshold_counts(labels, scores)
    if pos == 0:
        raise ValueError("a precision-recall curve needs at least one positive label")
    return np.r_[1.0, tp / (tp + fp)], np.r_[0.0, tp / pos]
