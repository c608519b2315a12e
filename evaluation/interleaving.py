"""Team-draft interleaving (Radlinski, Kurup & Joachims 2008, "How does clickthrough data reflect retrieval
quality?", Algorithm 2) simulated on the logged cases.

For each case two rankers' lists A and B are merged: in each round a fair coin decides which team picks first,
then each team in turn adds its highest-ranked item not yet in the merged list, until K items are shown. The
logged target item plays the user's click: if it is in the merged list, the team that contributed it wins the
case; otherwise (or when neither list reaches it) the case is a tie. The preference of A over B is
``(wins_A - wins_B) / cases`` in [-1, 1]; its sign is compared with the sign of the difference of the two rankers'
replay metric (HR@K) on the same cases.

Legend: B cases, K list length.
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import hit_rate


def team_draft(a: np.ndarray, b: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Interleave two ranked lists.

    Args:
        a, b: (K_a,), (K_b,) item ids, best first; ``-1`` pads (ignored).
        k: length of the merged list.
        rng: the coin of each round.

    Returns:
        merged (<= k,) item ids and team (<= k,) int8: 0 where the item came from ``a``, 1 from ``b``.

    >>> class Heads:  # a picks first in every round
    ...     def random(self): return 0.0
    >>> m, t = team_draft(np.array([1, 2, 3]), np.array([2, 4, 5]), 4, Heads())
    >>> m.tolist(), t.tolist()
    ([1, 2, 3, 4], [0, 1, 0, 1])
    """
    lists = [[x for x in a.tolist() if x >= 0], [x for x in b.tolist() if x >= 0]]
    ptr, merged, team, seen = [0, 0], [], [], set()
    while len(merged) < k:
        order = (0, 1) if rng.random() < 0.5 else (1, 0)
        added = False
        for t in order:
            if len(merged) >= k:
                break
            while ptr[t] < len(lists[t]) and lists[t][ptr[t]] in seen:
                ptr[t] += 1
            if ptr[t] < len(lists[t]):
                item = lists[t][ptr[t]]
                merged.append(item)
                team.append(t)
                seen.add(item)
                added = True
        if not added:
            break
    return np.array(merged, dtype=np.int64), np.array(team, dtype=np.int8)


def interleave(recs_a: np.ndarray, recs_b: np.ndarray, targets: np.ndarray, k: int,
               rng: np.random.Generator) -> dict:
    """Team-draft outcome over cases.

    Args:
        recs_a, recs_b: (B, K) lists of the two rankers; targets: (B,) the clicked (logged) item.

    Returns:
        ``{"wins_a", "wins_b", "ties", "cases", "preference"}``, preference = (wins_a - wins_b) / cases.
    """
    wins = np.zeros(2, dtype=np.int64)
    for a, b, t in zip(recs_a, recs_b, targets):
        merged, team = team_draft(a, b, k, rng)
        hit = np.flatnonzero(merged == t)
        if hit.size:
            wins[team[hit[0]]] += 1
    n = int(targets.size)
    return {"wins_a": int(wins[0]), "wins_b": int(wins[1]), "ties": n - int(wins.sum()), "cases": n,
            "preference": float((wins[0] - wins[1]) / n) if n else float("nan")}


def sign_agreement(preferences: list[float], metric_diffs: list[float]) -> float:
    """Share of comparisons where interleaving and the replay metric prefer the same ranker (both signs equal;
    a zero counts as agreeing only with a zero).

    >>> sign_agreement([0.1, -0.2, 0.05], [0.02, 0.01, 0.3])
    0.6666666666666666
    """
    if not preferences:
        return float("nan")
    return float(np.mean(np.sign(preferences) == np.sign(metric_diffs)))


def pairwise_comparisons(lists: dict[str, np.ndarray], targets: np.ndarray, k: int, label: str,
                         rng: np.random.Generator) -> list[dict]:
    """Team-draft interleaving of every pair of policies on the same cases, beside the difference of their HR@k.

    Args:
        lists: policy name -> (B, K') recommended lists, K' >= k, best first (``-1`` pads).
        targets: (B,) the logged item of each case (the simulated click).
        k: length of each policy's list that is interleaved, and the HR cut-off.
        label: what the cases are (``"test"``, ``"window 3"``), recorded as ``on``.
        rng: the coins of every team draft, drawn pair by pair in sorted order of the names.

    Returns:
        One dict per pair ``a < b`` (by name): ``{"on", "a", "b", "wins_a", "wins_b", "ties", "cases",
        "preference", "hr_diff"}``, ``hr_diff`` = HR@k(a) - HR@k(b).

    >>> lists = {"x": np.array([[1, 2]]), "y": np.array([[3, 4]])}   # x has the target first: shown whoever starts
    >>> [(c["a"], c["b"], c["preference"], c["hr_diff"]) for c in
    ...  pairwise_comparisons(lists, np.array([1]), 2, "test", np.random.default_rng(0))]
    [('x', 'y', 1.0, 1.0)]
    """
    names, out = sorted(lists), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            r = interleave(lists[a][:, :k], lists[b][:, :k], targets, k, rng)
            out.append({"on": label, "a": a, "b": b, **r,
                        "hr_diff": hit_rate(lists[a], targets, k) - hit_rate(lists[b], targets, k)})
    return out
