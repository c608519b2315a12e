"""Explore/exploit policies on hand cases."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.policies import UCB1, EmbeddingPolicy, EpsilonGreedy, LinUCB, Popularity, ThompsonSampling


def test_ucb1_picks_highest_bound_on_a_tiny_table():
    p = UCB1()
    # arm 1: 3 pulls, 2 clicks; arm 2: 1 pull, 0 clicks; arm 3: 6 pulls, 5 clicks -> t = 10
    for arm, rewards in {1: [1, 1, 0], 2: [0], 3: [1, 1, 1, 1, 1, 0]}.items():
        for r in rewards:
            p.update(arm, None, 0, r)
    b = p.bounds(np.array([1, 2, 3]))
    ln10 = np.log(10)
    expected = [2 / 3 + np.sqrt(2 * ln10 / 3), 0 + np.sqrt(2 * ln10 / 1), 5 / 6 + np.sqrt(2 * ln10 / 6)]
    assert b == pytest.approx(expected)          # 1.906, 2.146, 1.710
    assert p.choose(np.array([1, 2, 3]), None, 0) == 2
    assert p.choose(np.array([1, 3]), None, 0) == 1
    assert p.choose(np.array([3, 4]), None, 0) == 4   # untried arm first


def test_epsilon_greedy_zero_is_greedy_and_one_is_uniform():
    greedy = EpsilonGreedy(0.0, np.random.default_rng(0))
    for arm, r in [(1, 0), (2, 1), (3, 1), (3, 0)]:
        greedy.update(arm, None, 0, r)
    assert greedy.choose(np.array([1, 2, 3]), None, 0) == 2      # means 0, 1, 0.5
    assert greedy.choose(np.array([1, 2, 7]), None, 0) == 7      # untried first
    explore = EpsilonGreedy(1.0, np.random.default_rng(0))
    explore.update(2, None, 0, 1)
    picks = [explore.choose(np.array([1, 2, 3]), None, 0) for _ in range(3000)]
    assert np.bincount(picks, minlength=4)[1:] / 3000 == pytest.approx([1 / 3] * 3, abs=0.04)
    with pytest.raises(ValueError):
        EpsilonGreedy(1.5, np.random.default_rng(0))


def test_thompson_follows_the_posterior():
    p = ThompsonSampling(np.random.default_rng(0))
    for _ in range(200):
        p.update(1, None, 0, 0)
        p.update(2, None, 0, 1)
    assert all(p.choose(np.array([1, 2]), None, 0) == 2 for _ in range(50))
    # two equal Beta(1, 1) priors: each arm about half the time
    q = ThompsonSampling(np.random.default_rng(1))
    picks = [q.choose(np.array([5, 6]), None, 0) for _ in range(2000)]
    assert np.mean(np.array(picks) == 5) == pytest.approx(0.5, abs=0.05)


def test_linucb_scores_by_hand():
    p = LinUCB(dim=2, alpha=0.5)
    x1, x2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    p.update(1, x1, 0, 1.0)          # A_1 = diag(2, 1), b_1 = (1, 0)
    p.update(1, x2, 0, 0.0)          # A_1 = diag(2, 2), b_1 = (1, 0)
    p.update(2, x2, 0, 1.0)          # A_2 = diag(1, 2), b_2 = (0, 1)
    x = np.array([1.0, 1.0])
    # arm 1: theta (0.5, 0) -> 0.5 + 0.5 sqrt(0.5 + 0.5) = 1.0; arm 2: theta (0, 0.5) -> 0.5 + 0.5 sqrt(1.5)
    # arm 3 (new): 0 + 0.5 sqrt(2)
    assert p.scores(np.array([1, 2, 3]), x) == pytest.approx([1.0, 0.5 + 0.5 * np.sqrt(1.5), 0.5 * np.sqrt(2)])
    assert p.choose(np.array([1, 2, 3]), x, 0) == 2
    # at x = (1, 0): arm 1 0.5 + 0.5 sqrt(0.5) = 0.854; arm 2 0 + 0.5 sqrt(1) = 0.5
    assert p.choose(np.array([1, 2]), np.array([1.0, 0.0]), 0) == 1


def test_popularity_and_embedding_policies():
    p = Popularity(prior=np.array([0, 5, 2, 5]))
    assert p.choose(np.array([1, 2, 3]), None, 0) == 1          # tie 1 vs 3 -> lowest id
    p.update(3, None, 0, 1)
    assert p.choose(np.array([1, 2, 3]), None, 0) == 3
    e = EmbeddingPolicy(np.array([[0, 0], [1, 0], [0, 1], [0.6, 0.6]]), np.array([[1.0, 0.1], [0.0, 1.0]]))
    assert e.choose(np.array([1, 2, 3]), None, 0) == 1
    assert e.choose(np.array([1, 2, 3]), None, 1) == 2
