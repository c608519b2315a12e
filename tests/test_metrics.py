"""evaluation.metrics against hand-computed cases: HR/NDCG/MRR@K with one relevant item, mAP@K with several (and
equal to MRR@K with one), coverage and novelty, the precision-recall points against sklearn, and the CTR metrics
re-exported from training.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

import training.metrics
from evaluation import metrics
from evaluation.metrics import (average_precision_at_k, coverage, hit_rate, mrr, ndcg, novelty,
                                precision_recall_points, target_ranks)


# ---------------------------------------------------------------------------------- one relevant item per case
def test_metrics_hand_cases():
    recs = np.array([[4, 9, 2, 7],     # target 4 at rank 0
                     [1, 2, 3, 5],     # target 5 at rank 3
                     [8, 6, -1, -1],   # target 3 absent (short list)
                     [3, 5, 6, 0]])    # target 6 at rank 2
    targets = np.array([4, 5, 3, 6])
    assert target_ranks(recs, targets).tolist() == [0, 3, -1, 2]
    assert hit_rate(recs, targets) == pytest.approx(3 / 4)
    assert ndcg(recs, targets) == pytest.approx((1 + 1 / math.log2(5) + 0 + 1 / math.log2(4)) / 4)
    assert mrr(recs, targets) == pytest.approx((1 + 1 / 4 + 0 + 1 / 3) / 4)
    # cut-off K = 3: the rank-3 hit no longer counts
    assert hit_rate(recs, targets, k=3) == pytest.approx(2 / 4)
    assert ndcg(recs, targets, k=3) == pytest.approx((1 + 0.5) / 4)


def test_metrics_padding_never_matches_and_bad_shapes_raise():
    assert hit_rate(np.array([[-1, -1]]), np.array([7])) == 0.0
    assert math.isnan(ndcg(np.zeros((0, 3), dtype=int), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError):
        hit_rate(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError):
        ndcg(np.array([[1, 2]]), np.array([1]), k=0)


# ---------------------------------------------------------------------------------------------------- mAP@K
def _naive_ap(row, rel, k):
    """AP@k by its definition, one position at a time: precision at each new relevant item, over min(|R|, k)."""
    hits, total, counted = 0, 0.0, set()
    for i, item in enumerate(list(row)[:k]):
        if item in rel and item not in counted:
            counted.add(item)
            hits += 1
            total += hits / (i + 1)
    return total / min(len(rel), k)


def test_average_precision_hand_cases():
    recs = np.array([[1, 2, 3, 4, 5],
                     [6, 7, 8, 9, 10],
                     [11, 12, 13, 14, 15],
                     [1, 2, 3, 4, 5]])
    relevant = [{2, 5},          # hits at ranks 1 and 4: (1/2 + 2/5) / 2 = 0.45
                {6, 7, 8, 20},   # hits at 0, 1, 2, the fourth missing: (1 + 1 + 1) / 4 = 0.75
                {99},            # miss: 0
                set()]           # no relevant item: left out of the mean
    assert average_precision_at_k(recs, relevant) == pytest.approx((0.45 + 0.75 + 0.0) / 3)
    # K = 3: case 0 keeps the rank-1 hit only, divided by min(2, 3) = 2; case 1 by min(4, 3) = 3
    assert average_precision_at_k(recs, relevant, k=3) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    # K = 2 with more relevant items than K: every slot relevant is a perfect 1, not 2/4
    assert average_precision_at_k(recs[1:2], [{6, 7, 8, 20}], k=2) == 1.0


def test_average_precision_counts_an_item_once_and_ignores_padding():
    # the repeated relevant item 3 counts at its first position only: (1/1) / 2
    assert average_precision_at_k(np.array([[3, 3, -1]]), [{3, 4}]) == pytest.approx(0.5)
    # -1 pads both the list and a (B, R) array of relevant items; it never matches
    assert average_precision_at_k(np.array([[-1, 5]]), np.array([[5, -1]], dtype=object)) == pytest.approx(0.5)
    assert average_precision_at_k(np.array([[-1, 5]]), np.array([[5, -1]])) == pytest.approx(0.5)


def test_average_precision_equals_reciprocal_rank_for_one_relevant_item():
    rng = np.random.default_rng(0)
    recs = np.stack([rng.permutation(30)[:10] for _ in range(200)])        # (B, K) distinct items per list
    targets = rng.integers(0, 30, 200)                                    # hit on about a third of the cases
    for k in (1, 3, 10):
        want = mrr(recs, targets, k)
        assert average_precision_at_k(recs, targets, k) == pytest.approx(want)              # (B,) targets
        assert average_precision_at_k(recs, [{t} for t in targets], k) == pytest.approx(want)  # sets of one


def test_average_precision_against_the_naive_definition():
    rng = np.random.default_rng(1)
    recs = rng.integers(-1, 15, (300, 8))                                 # repeats and padding included
    relevant = [set(rng.choice(15, rng.integers(0, 6), replace=False).tolist()) for _ in range(300)]
    for k in (1, 4, 8):
        want = np.mean([_naive_ap(r, rel, k) for r, rel in zip(recs, relevant) if rel])
        assert average_precision_at_k(recs, relevant, k) == pytest.approx(want)


def test_average_precision_edge_cases_and_errors():
    assert math.isnan(average_precision_at_k(np.array([[1, 2]]), [set()]))      # no case with a relevant item
    assert math.isnan(average_precision_at_k(np.zeros((0, 3), dtype=int), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError, match="one entry per case"):
        average_precision_at_k(np.array([[1, 2]]), [{1}, {2}])
    with pytest.raises(ValueError, match="k must be"):
        average_precision_at_k(np.array([[1, 2]]), [{1}], k=0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        average_precision_at_k(np.array([1, 2]), [{1}, {2}])


# --------------------------------------------------------------------------------------- coverage, novelty
def test_coverage_and_novelty_hand_cases():
    recs = np.array([[1, 2, -1], [2, 4, 0]])
    assert coverage(recs, n_items=6) == pytest.approx(3 / 5)          # {1, 2, 4} of the items 1..5
    # training counts of items 0..3: [0, 2, 1, 0]; p = (c + 1) / (3 + 4)
    p = {1: 3 / 7, 3: 1 / 7}
    assert novelty(np.array([[1, 3, -1]]), np.array([1, 1, 2]), n_items=4) == pytest.approx(
        (-math.log2(p[1]) - math.log2(p[3])) / 2)
    assert math.isnan(novelty(np.array([[-1, -1]]), np.array([1]), n_items=2))


# ------------------------------------------------------------------------------------ precision-recall points
def test_precision_recall_points_hand_case():
    # scores 0.9 (+), 0.8 (-), 0.7 (+, -), 0.1 (-): thresholds 0.9, 0.8, 0.7, 0.1
    precision, recall = precision_recall_points(np.array([1, 0, 1, 0, 0]), np.array([0.9, 0.8, 0.7, 0.7, 0.1]))
    assert recall.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert precision == pytest.approx([1.0, 1 / 1, 1 / 2, 2 / 4, 2 / 5])
    with pytest.raises(ValueError, match="positive"):
        precision_recall_points(np.zeros(3), np.arange(3))
    precision, recall = precision_recall_points(np.ones(2), np.array([0.2, 0.4]))     # no negative: defined
    assert precision.tolist() == [1.0, 1.0, 1.0] and recall.tolist() == [0.0, 0.5, 1.0]


def test_precision_recall_points_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(labels * 0.5 + rng.normal(0, 0.5, 500), 1)          # rounded: many ties
    precision, recall = precision_recall_points(labels, scores)
    ref_precision, ref_recall, thresholds = skm.precision_recall_curve(labels, scores)
    assert precision.size == np.unique(scores).size + 1 == thresholds.size + 1
    # sklearn orders by increasing threshold and appends (precision 1, recall 0): ours reversed
    assert precision == pytest.approx(ref_precision[::-1]) and recall == pytest.approx(ref_recall[::-1])
    # the step-wise area under these points is sklearn's average precision
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(skm.average_precision_score(labels, scores))


# --------------------------------------------------------------------------------------------- re-exports
def test_ctr_metrics_are_training_metrics():
    assert (metrics.auc, metrics.gauc, metrics.logloss) == (training.metrics.auc, training.metrics.gauc,
                                                            training.metrics.logloss)
    assert metrics.auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert {"auc", "gauc", "logloss", "average_precision_at_k", "precision_recall_points"} <= set(metrics.__all__)
