"""evaluation.prequential on hand-made logs: window cuts, the co-occurrence model, per-window metrics
computed by hand, including that a window's model never sees that window's events, and the seen-item rule of
evaluation.cases, shared with the static replay (every item of the user's earlier events is excluded, not only the
50 of hist_item_idx)."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import novelty
from evaluation.prequential import (EventLog, PrequentialParams, cooccurrence_model, prequential,
                                    recommend_cooccurrence, top_k, window_bounds)


def _log(rows):
    """rows: (user, item, label, hist) in time order."""
    width = max(max(len(r[3]) for r in rows), 1)
    hist = np.array([[-1] * (width - len(r[3])) + list(r[3]) for r in rows], dtype=np.int64)
    return EventLog(event_time=np.arange(len(rows), dtype=np.int64) * 1_000_000,
                    user_idx=np.array([r[0] for r in rows]), item_idx=np.array([r[1] for r in rows]),
                    label=np.array([r[2] for r in rows]), hist=hist)


def test_window_bounds_equal_counts_and_too_few_events():
    assert window_bounds(9, 2).tolist() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="lower n_windows"):
        window_bounds(2, 2)


def test_cooccurrence_is_cosine_of_user_sets():
    # item 1: users {0, 1, 2}; item 2: users {0, 1}; item 3: user {2}
    s = cooccurrence_model(np.array([0, 0, 1, 1, 2, 2]), np.array([1, 2, 1, 2, 1, 3]), n_items=4)
    assert s[1, 2] == pytest.approx(2 / np.sqrt(3 * 2))
    assert s[1, 3] == pytest.approx(1 / np.sqrt(3 * 1))
    assert s[2, 3] == 0 and s[1, 1] == 0 and (s == s.T).all()


def _seen(n_items, *rows):
    """(B, n_items) bool mask from one list of seen item_idx per row."""
    m = np.zeros((len(rows), n_items), dtype=bool)
    for b, items in enumerate(rows):
        m[b, list(items)] = True
    return m


def test_top_k_ties_by_item_idx_and_seen_removed():
    scores = np.array([[9.0, 1.0, 2.0, 2.0, 2.0, 0.5]])
    assert top_k(scores, _seen(6, [3]), k=3).tolist() == [[2, 4, 1]]
    # fewer allowed items than k: -1 pads, never a seen item
    assert top_k(scores, _seen(6, [1, 2, 3, 4]), k=3).tolist() == [[5, -1, -1]]
    with pytest.raises(TypeError, match="bool mask"):
        top_k(scores, np.array([[3]]), k=3)


def test_cold_user_falls_back_to_popularity_order():
    sim = np.zeros((4, 4), dtype=np.float32)
    pop = np.array([-np.inf, 1.0, 3.0, 2.0])
    assert recommend_cooccurrence(sim, np.array([[-1, -1]]), _seen(4, []), 5, 2, pop).tolist() == [[2, 3]]


def test_novelty_in_bits():
    # counts over items 0..3: item 1 x2, item 2 x1; p = (c + 1) / (3 + 4): item 1 3/7, item 3 1/7
    assert novelty(np.array([[1, 3]]), np.array([1, 1, 2]), 4) == pytest.approx(
        (-np.log2(3 / 7) - np.log2(1 / 7)) / 2)


def test_prequential_by_hand():
    # 6 events, 2 evaluated windows of 2 events after a training window of 2.
    rows = [(0, 1, 1, []), (0, 2, 1, [1]),              # window 0 (train only): items 1, 2 co-occur (user 0)
            (1, 1, 1, []), (1, 2, 1, [1]),              # window 1: user 1 cold (-> popularity), then hist [1]
            (2, 3, 1, [1]), (2, 1, 0, [1, 3])]          # window 2: one positive; the negative is no case
    r = prequential(_log(rows), PrequentialParams(n_windows=2, k=1, n_recent=5))
    w1, w2 = r["windows"]
    # window 1, model from events 0-1: popularity counts item 1: 1, item 2: 1 -> tie -> item 1
    #   case (user 1, target 1, cold): co-occurrence falls back to popularity -> [1]: hit
    #   case (user 1, target 2, hist [1]): co-occurrence: sim(1, 2) = 1 -> [2]: hit; popularity: 1 removed -> [2]: hit
    assert w1["cases"] == 2 and w1["train_events"] == 2
    assert w1["models"]["cooccurrence"]["hr@1"] == 1.0 and w1["models"]["popularity"]["hr@1"] == 1.0
    # window 2, model from events 0-3: item 3 is never seen in training, so nobody can hit it
    assert w2["cases"] == 1 and w2["train_events"] == 4
    assert w2["models"]["cooccurrence"]["hr@1"] == 0.0 and w2["models"]["popularity"]["hr@1"] == 0.0
    assert r["overall"]["cooccurrence"]["hr@1"] == pytest.approx(2 / 3)
    assert r["overall"]["cooccurrence"]["cases"] == 3
    # coverage over the catalogue {1, 2, 3}: window 1 lists {1, 2}
    assert w1["models"]["cooccurrence"]["coverage"] == pytest.approx(2 / 3)


def test_window_model_never_sees_its_own_window():
    # the only co-occurrence of items 4 and 5 happens inside window 1: its model must not know it
    rows = [(0, 1, 1, []), (0, 2, 1, [1]),
            (1, 4, 1, []), (1, 5, 1, [4]),
            (2, 5, 1, [4]), (2, 1, 1, [4, 5])]
    r = prequential(_log(rows), PrequentialParams(n_windows=2, k=1, n_recent=5))
    # window 1, case (user 1, target 5, hist [4]): item 4 unknown -> popularity [1] -> miss
    assert r["windows"][0]["models"]["cooccurrence"]["hr@1"] == 0.0
    # window 2 (trained on windows 0-1 where 4 and 5 co-occur): case (user 2, target 5, hist [4]) -> [5]: hit
    lists = []
    prequential(_log(rows), PrequentialParams(n_windows=2, k=1, n_recent=5), lists_out=lists)
    assert lists[1][0]["cooccurrence"][0].tolist() == [5]


def _history_log(rows, max_history: int = 50):
    """rows: (user, item, label) in time order (one second apart); hist = the user's earlier items, the last
    ``max_history``, as the export's hist_item_idx."""
    return _log([(u, i, y, [r[1] for r in rows[:j] if r[0] == u][-max_history:]) for j, (u, i, y) in enumerate(rows)])


def test_item_rated_long_ago_is_never_recommended():
    # user 0 rated item 1 long ago (label 0), then 60 items (10..69): item 1 is outside the 50 of hist_item_idx.
    # Users 1..6 rate items 65..69 (user 0's 5 most recent) and item 1; users 1..4 item 3; users 1..3 item 2.
    # Trained on these 104 events: co-occurrence scores for the query (65..69): item 1: 5 x 7/7 = 5,
    # each of 65..69: 4, item 3: 5 x 4/sqrt(28) = 3.78, item 2: 5 x 3/sqrt(21) = 3.27, items 10..64: 1.89;
    # popularity: item 1 and items 65..69 7 each (ties by item_idx: 1 first), item 3 4, item 2 3.
    train = ([(0, 1, 0)] + [(0, i, 1) for i in range(10, 70)]
             + [(u, i, 1) for u in range(1, 7) for i in (*range(65, 70), 1)]
             + [(u, 3, 1) for u in range(1, 5)] + [(u, 2, 1) for u in range(1, 4)])
    assert len(train) == 104
    # window 1: the case (user 0, item 2), then user 0 rates item 3 AFTER it, then events of another user
    rows = train + [(0, 2, 1), (0, 3, 0)] + [(7, 4, 0)] * 102
    log_ = _history_log(rows)
    assert 1 not in log_.hist[104] and (log_.hist[104] >= 0).sum() == 50
    lists = []
    prequential(log_, PrequentialParams(n_windows=1, k=2, n_recent=5), lists_out=lists)
    (recs, targets), = lists
    assert targets.tolist() == [2]
    # item 1 and items 10..69 excluded, item 3 kept (rated later): the hist-only rule gave [1, 3]
    assert recs["cooccurrence"].tolist() == [[3, 2]] and recs["popularity"].tolist() == [[3, 2]]


def test_batches_give_the_same_windows():
    rows = [(u, i, 1) for u, i in np.random.default_rng(3).integers(1, 6, size=(60, 2)).tolist()]
    log_ = _history_log(rows)
    runs = []
    for batch in (1, 4, 2048):
        lists = []
        r = prequential(log_, PrequentialParams(n_windows=3, k=3, n_recent=5, batch=batch), lists_out=lists)
        runs.append((r, [{m: x.tolist() for m, x in recs.items()} for recs, _ in lists]))
    assert runs[0] == runs[1] == runs[2]
