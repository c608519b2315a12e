"""Explore/exploit policies for the replay estimator (evaluation.estimators): each picks one arm of the
candidate set of a logged event and learns only from the events the estimator keeps.

- ``EpsilonGreedy``: the best empirical mean with probability ``1 - epsilon``, a uniform arm otherwise
  (Sutton & Barto 2018, ch. 2).
- ``ThompsonSampling``: one draw from each arm's Beta(alpha0 + clicks, beta0 + non-clicks) posterior, the arm
  with the largest draw (Thompson 1933; Chapelle & Li 2011).
- ``UCB1``: ``mean_a + sqrt(2 ln t / n_a)`` with ``t`` the updates so far, untried arms first (Auer, Cesa-Bianchi
  & Fischer 2002).
- ``LinUCB``: disjoint linear model per arm, ``x^T theta_a + alpha sqrt(x^T A_a^-1 x)`` (Li et al. 2010, "A
  contextual-bandit approach to personalized news article recommendation", Algorithm 1).
- ``Popularity``: most clicks so far (prior counts plus clicks on kept events).
- ``EmbeddingPolicy``: largest dot product of the user's vector and the item's vector (a trained embedding
  model, frozen: it does not update).

Ties everywhere go to the lowest arm id, so a policy is deterministic given its random generator.

Legend: C candidates of an event, D context dimension, N arms (max arm id + 1).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Policy(Protocol):
    """What the replay estimator needs of a policy.

    ``choose(candidates (C,) int64, context (D,) float64, user int) -> int`` returns one of ``candidates``;
    ``update(arm, context, user, reward)`` is called on kept events only (reward 0/1).
    """

    name: str

    def choose(self, candidates: np.ndarray, context: np.ndarray, user: int) -> int: ...

    def update(self, arm: int, context: np.ndarray, user: int, reward: float) -> None: ...


def _argmax_lowest(candidates: np.ndarray, values: np.ndarray) -> int:
    """The candidate with the largest value, ties to the lowest arm id.

    >>> _argmax_lowest(np.array([7, 3, 5]), np.array([1.0, 2.0, 2.0]))
    3
    """
    best = values == values.max()
    return int(candidates[best].min())


class _Counts:
    """Per-arm pulls and clicks, grown on demand."""

    def __init__(self, n_arms: int = 0) -> None:
        self.n = np.zeros(n_arms, dtype=np.float64)
        self.s = np.zeros(n_arms, dtype=np.float64)

    def _grow(self, arm: int) -> None:
        if arm >= self.n.size:
            extra = arm + 1 - self.n.size
            self.n, self.s = np.pad(self.n, (0, extra)), np.pad(self.s, (0, extra))

    def of(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._grow(int(candidates.max()))
        return self.n[candidates], self.s[candidates]

    def add(self, arm: int, reward: float) -> None:
        self._grow(arm)
        self.n[arm] += 1
        self.s[arm] += reward


class EpsilonGreedy:
    """Args:
        epsilon: exploration probability in [0, 1].
        rng: random generator (exploration and its arm).

    Raises:
        ValueError: epsilon outside [0, 1].
    """

    def __init__(self, epsilon: float, rng: np.random.Generator, name: str | None = None) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.epsilon, self.rng, self.c = epsilon, rng, _Counts()
        self.name = name or f"epsilon_greedy({epsilon:g})"

    def choose(self, candidates: np.ndarray, context: np.ndarray, user: int) -> int:
        if self.rng.random() < self.epsilon:
            return int(self.rng.choice(candidates))
        n, s = self.c.of(candidates)
        return _argmax_lowest(candidates, np.where(n > 0, s / np.maximum(n, 1), np.inf))  # untried first

    def update(self, arm: int, context: np.ndarray, user: int, reward: float) -> None:
        self.c.add(arm, reward)


class ThompsonSampling:
    """Beta-Bernoulli Thompson sampling.

    Args:
        rng: random generator for the posterior draws.
        alpha0, beta0: Beta prior (1, 1 = uniform).
    """

    def __init__(self, rng: np.random.Generator, alpha0: float = 1.0, beta0: float = 1.0,
                 name: str = "thompson") -> None:
        if alpha0 <= 0 or beta0 <= 0:
            raise ValueError(f"Beta prior parameters must be > 0, got {alpha0}, {beta0}")
        self.rng, self.alpha0, self.beta0, self.c, self.name = rng, alpha0, beta0, _Counts(), name

    def choose(self, candidates: np.ndarray, context: np.ndarray, user: int) -> int:
        n, s = self.c.of(candidates)
        draws = self.rng.beta(self.alpha0 + s, self.beta0 + n - s)             # (C,)
        return _argmax_lowest(candidates, draws)

    def update(self, arm: int, context: np.ndarray, user: int, reward: float) -> None:
        self.c.add(arm, reward)


class UCB1:
    """UCB1: untried arms first; else ``mean + sqrt(2 ln t / n)``, ``t`` = updates so far.

    >>> p = UCB1()
    >>> for arm, r in [(1, 1), (1, 0), (2, 1)]:
    ...     p.update(arm, None, 0, r)
    >>> p.choose(np.array([1, 2, 3]), None, 0)     # arm 3 never tried
    3
    >>> p.choose(np.array([1, 2]), None, 0)         # 0.5 + sqrt(2 ln3 / 2) = 1.548 < 1 + sqrt(2 ln3) = 2.482
    2
    """

    def __init__(self, name: str = "ucb1") -> None:
        self.c, self.t, self.name = _Counts(), 0, name

    def bounds(self, candidates: np.ndarray) -> np.ndarray:
        """(C,) upper confidence bounds; ``inf`` for untried arms."""
        n, s = self.c.of(candidates)
        with np.errstate(divide="ignore", invalid="ignore"):
            b = s / n + np.sqrt(2.0 * np.log(max(self.t, 1)) / n)
        return np.where(n > 0, b, np.inf)

    def choose(self, candidates: np.ndarray, context: np.ndarray, user: int) -> int:
        return _argmax_lowest(candidates, self.bounds(candidates))

    def update(self, arm: int, context: np.ndarray, user: int, reward: float) -> None:
        self.c.add(arm, reward)
        self.t += 1


class LinUCB:
    """Disjoint LinUCB (Li et al. 2010, Algorithm 1): per arm ``A_a = I + sum x x^T``, ``b_a = sum r x``,
    ``theta_a = A_a^-1 b_a``, score ``x^T theta_a + alpha sqrt(x^T A_a^-1 x)``.

    Args:
        dim: context dimension D.
        alpha: width of the confidence bound (> 0).

    >>> p = LinUCB(dim=1, alpha=1.0)
    >>> p.update(1, np.array([1.0]), 0, 1.0)        # A_1 = 2, b_1 = 1: 0.5 + sqrt(1/2) = 1.207
    >>> p.choose(np.array([1, 2]), np.array([1.0]), 0)   # arm 2: 0 + sqrt(1) = 1.0
    1
    """

    def __init__(self, dim: int, alpha: float = 1.0, name: str | None = None) -> None:
        if dim < 1 or alpha <= 0:
            raise ValueError(f"dim must be >= 1 and alpha > 0, got {dim}, {alpha}")
        self.dim, self.alpha = dim, alpha
        self.a_inv: dict[int, np.ndarray] = {}
        self.b: dict[int, np.ndarray] = {}
        self.name = name or f"linucb({alpha:g})"

    def scores(self, candidates: np.ndarray, context: np.ndarray) -> np.ndarray:
        x = np.asarray(context, dtype=np.float64)
        out = np.empty(candidates.size)
        for i, a in enumerate(candidates.tolist()):
            a_inv = self.a_inv.get(a, np.eye(self.dim))
            theta = a_inv @ self.b.get(a, np.zeros(self.dim))                 # (D,)
            out[i] = x @ theta + self.alpha * np.sqrt(x @ a_inv @ x)
        return out

    def choose(self, candidates: np.ndarray, context: np.ndarray, user: int) -> int:
        return _argmax_lowest(candidates, self.scores(candidates, context))

    def update(self, arm: int, context: np.ndarray, user: int, reward: float) -> None:
        x = np.asarray(context, dtype=np.float64)
        a_inv = self.a_inv.get(arm, np.eye(self.dim))
        ax = a_inv @ x                                                        # Sherman-Morrison rank-1 update
        self.a_inv[arm] = a_inv - np.outer(ax, ax) / (1.0 + x @ ax)
        self.b[arm] = self.b.get(arm, np.zeros(self.dim)) + reward * x


class Popularity:
    """Most clicks: ``prior`` counts (N,) (e.g. training interactions) plus clicks on kept events."""

    def __init__(self, prior: np.ndarray | None = None, name: str = "popularity") -> None:
        self.c, self.name = _Counts(), name
        if prior is not None:
            self.c.s = np.asarray(prior, dtype=np.float64).copy()
            self.c.n = np.zeros_like(self.c.s)

    def choose(self, candidates: np.ndarray, context: np.ndarray, user: int) -> int:
        _, s = self.c.of(candidates)
        return _argmax_lowest(candidates, s)

    def update(self, arm: int, context: np.ndarray, user: int, reward: float) -> None:
        self.c.add(arm, reward)


class EmbeddingPolicy:
    """Frozen trained-embedding policy: arm = argmax of ``user_vectors[user] . item_vectors[arm]``.

    Args:
        item_vectors: (N, D); user_vectors: (U, D).
    """

    def __init__(self, item_vectors: np.ndarray, user_vectors: np.ndarray, name: str = "embedding") -> None:
        self.items, self.users, self.name = np.asarray(item_vectors), np.asarray(user_vectors), name

    def choose(self, candidates: np.ndarray, context: np.ndarray, user: int) -> int:
        return _argmax_lowest(candidates, self.items[candidates] @ self.users[user])

    def update(self, arm: int, context: np.ndarray, user: int, reward: float) -> None:
        pass
