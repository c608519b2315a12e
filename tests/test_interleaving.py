"""Team-draft interleaving (Radlinski et al. 2008) with a queued coin, and its credit assignment by hand."""

from __future__ import annotations

import numpy as np

from evaluation.interleaving import interleave, sign_agreement, team_draft


class Coin:
    """Queued coin: each value < 0.5 lets team A pick first in that round."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_team_draft_by_hand():
    a, b = np.array([1, 2, 3, 4]), np.array([3, 1, 5, 6])
    # round 1: B first -> 3 (B), A -> 1 (A); round 2: A first -> 2 (A), B -> 1 taken, 5 (B); round 3: A -> 4
    merged, team = team_draft(a, b, 5, Coin([0.9, 0.1, 0.1]))
    assert merged.tolist() == [3, 1, 2, 5, 4]
    assert team.tolist() == [1, 0, 0, 1, 0]


def test_team_draft_stops_when_both_lists_run_out_and_skips_padding():
    merged, team = team_draft(np.array([1, -1]), np.array([1, 2]), 5, Coin([0.1, 0.1, 0.1]))
    assert merged.tolist() == [1, 2] and team.tolist() == [0, 1]


def test_interleave_credits_the_contributing_team():
    recs_a = np.array([[1, 2], [1, 2], [1, 2]])
    recs_b = np.array([[3, 4], [3, 4], [3, 4]])
    # each case: round 1 with A first -> [1, 3]; targets 1 (A wins), 3 (B wins), 9 (tie)
    r = interleave(recs_a, recs_b, np.array([1, 3, 9]), 2, Coin([0.1] * 3))
    assert (r["wins_a"], r["wins_b"], r["ties"], r["cases"]) == (1, 1, 1, 3)
    assert r["preference"] == 0.0


def test_identical_rankers_are_preferred_by_neither_on_average():
    rng = np.random.default_rng(0)
    recs = np.tile(np.arange(1, 11), (4000, 1))
    r = interleave(recs, recs.copy(), rng.integers(1, 11, 4000), 10, rng)
    assert abs(r["preference"]) < 0.05 and r["ties"] == 0


def test_better_ranker_wins_and_signs_agree():
    rng = np.random.default_rng(1)
    targets = rng.integers(1, 50, 2000)
    good = np.stack([np.r_[t, [x for x in range(1, 12) if x != t][:9]] for t in targets])   # target first
    bad = np.tile(np.arange(40, 50), (2000, 1))
    r = interleave(good, bad, targets, 10, rng)
    assert r["preference"] > 0.5
    assert sign_agreement([r["preference"], -0.1], [0.3, 0.2]) == 0.5
