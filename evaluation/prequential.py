"""Prequential (test-then-train) replay of the MovieLens log with rolling retraining (Gama et al. 2013, "On
evaluating stream learning algorithms"; the replay of Li et al. 2011 applied to top-K retrieval).

The logged events are put in time order and cut into ``n_windows + 1`` windows holding equally many events.
Window 0 only trains. For every later window ``w``:

1. every model is (re)trained on all events strictly before the window's first event;
2. every positive event (``label = 1``) of the window is a case: the model *as it stood at the window's start*
   ranks all items for the case's user, given the user's history strictly before the event (``hist_item_idx``,
   which keeps growing inside the window: the model is frozen, the history is not). Never recommended, as in the
   static replay (the rule of evaluation.cases): item 0 and every item of every logged event of the user (any
   label, any window) strictly before the case in log order, i.e. with a smaller ``(event_time, event_id)`` (an
   event of the same user at the same ``event_time`` is excluded when its ``event_id`` is smaller); later events
   are never excluded. Inside a window this includes events the frozen model was not trained on: the exclusion is
   what the online system knows of the user, not what the model learnt;
3. the case is scored (evaluation.metrics): HR@K, NDCG@K, MRR@K, and per window the catalogue coverage
   (distinct recommended items / catalogue size) and the novelty (mean self-information ``-log2 p(i)`` of the
   recommended items, ``p`` the item's smoothed share of the training events; Zhou et al. 2010).

Models, retrained per window:

- ``cooccurrence``: item-item cosine similarity of the binary user x item matrix of the training events
  (Sarwar et al. 2001, item-based CF); a case scores item ``j`` by the summed similarity of ``j`` to the user's
  ``n_recent`` last history items. Chosen because retraining is one sparse product ``X^T X`` (1,682 x 1,682 on
  MovieLens-100K: milliseconds), it has no randomness or tuning, and it captures the same item-to-item signal as
  item2vec (Levy & Goldberg 2014 show skip-gram with negative sampling factorises a shifted PMI co-occurrence
  matrix), so it stands in for the trained embeddings at every window without a Ray job per window.
- ``popularity``: items by number of training events, ties by ascending item_idx.

Legend: E events, B cases in a window (or a batch of them), N items (max item_idx + 1), L longest history,
K list length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from evaluation.cases import COLUMNS, micros, padded_lists, replay_order, seen_before
from evaluation.metrics import coverage, hit_rate, mrr, ndcg, novelty

MODELS = ("cooccurrence", "popularity")


@dataclass(frozen=True)
class PrequentialParams:
    """Args:
        n_windows: evaluated windows (the log is cut into ``n_windows + 1``; the first only trains).
        k: list length.
        n_recent: history items that make a co-occurrence query.
        batch: cases scored per step (memory: a few batch x N arrays of float64 and bool).

    Raises:
        ValueError: a value below 1.
    """

    n_windows: int = 8
    k: int = 10
    n_recent: int = 15
    batch: int = 2048

    def __post_init__(self) -> None:
        if min(self.n_windows, self.k, self.n_recent, self.batch) < 1:
            raise ValueError(f"n_windows, k, n_recent and batch must be >= 1, got {self.n_windows}, {self.k}, "
                             f"{self.n_recent}, {self.batch}")


@dataclass(frozen=True)
class EventLog:
    """Every logged event in time order (ties by event_id).

    Args:
        event_time: (E,) int64 microseconds since the epoch (UTC).
        user_idx, item_idx, label: (E,) int64.
        hist: (E, L) int64 items the user rated strictly before the event, most recent last, left-padded with -1.
    """

    event_time: np.ndarray
    user_idx: np.ndarray
    item_idx: np.ndarray
    label: np.ndarray
    hist: np.ndarray

    def __len__(self) -> int:
        return int(self.item_idx.shape[0])


def event_log(tables: list[pa.Table]) -> EventLog:
    """The ctr_samples splits (columns ``evaluation.cases.COLUMNS``) as one EventLog in replay order."""
    t = replay_order(pa.concat_tables([x.select(list(COLUMNS)) for x in tables]))
    hist, _ = padded_lists(t.column("hist_item_idx"))
    col = lambda c: t.column(c).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    return EventLog(event_time=micros(t.column("event_time")), user_idx=col("user_idx"),
                    item_idx=col("item_idx"), label=col("label"), hist=hist)


def window_bounds(n_events: int, n_windows: int) -> np.ndarray:
    """Start offsets of ``n_windows + 1`` equal-count windows, plus the end.

    >>> window_bounds(10, 4).tolist()
    [0, 2, 4, 6, 8, 10]

    Raises:
        ValueError: fewer events than windows.
    """
    if n_events < n_windows + 1:
        raise ValueError(f"{n_events} events cannot fill {n_windows + 1} windows; lower n_windows")
    return np.linspace(0, n_events, n_windows + 2).round().astype(np.int64)


def cooccurrence_model(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Item-item cosine similarity of the binary user x item matrix; diagonal and item 0 set to 0.

    Args:
        users, items: (E,) training events.

    Returns:
        (N, N) float32 ``S[i, j] = |U_i & U_j| / sqrt(|U_i| |U_j|)``, ``U_i`` the users of item ``i``.

    >>> s = cooccurrence_model(np.array([1, 1, 2, 2, 3]), np.array([1, 2, 1, 2, 1]), n_items=3)
    >>> np.round(s.astype(float), 4).tolist()   # items 1 and 2 share users {1, 2}: 2 / sqrt(3 * 2)
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.8165], [0.0, 0.8165, 0.0]]
    """
    n_users = int(users.max(initial=0)) + 1
    x = np.zeros((n_users, n_items), dtype=np.float32)                 # (U, N) binary
    x[users, items] = 1.0
    c = x.T @ x                                                        # (N, N) co-occurrence counts
    deg = np.sqrt(np.diag(c))                                          # (N,)
    s = c / np.maximum(np.outer(deg, deg), 1e-12)
    np.fill_diagonal(s, 0.0)
    s[0, :] = s[:, 0] = 0.0
    return s.astype(np.float32)


def popularity_scores(items: np.ndarray, n_items: int) -> np.ndarray:
    """(N,) float64 training counts minus a tie-break that favours the lower item_idx; item 0 is -inf."""
    s = np.bincount(items, minlength=n_items).astype(np.float64) - np.arange(n_items) / (n_items + 1.0)
    s[0] = -np.inf
    return s


def top_k(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """Top-k items per row with the seen items and item 0 removed.

    Args:
        scores: (B, N) higher is better; seen: (B, N) bool, True where the row must not get the item
            (evaluation.cases.SeenItems.mask).

    Returns:
        (B, k) int64, best first; ties by ascending item_idx; ``-1`` where fewer than k items are allowed.

    Raises:
        TypeError: ``seen`` is not boolean (e.g. a (B, L) list of item_idx instead of a mask).

    >>> seen = np.array([[False, False, True, False, False]])
    >>> top_k(np.array([[0.0, 3.0, 5.0, 5.0, 1.0]]), seen, k=2).tolist()
    [[3, 1]]
    """
    if seen.dtype != np.bool_:
        raise TypeError(f"seen must be a (B, N) bool mask, got dtype {seen.dtype}")
    s = scores.astype(np.float64, copy=True)
    s[:, 0] = -np.inf
    s[seen] = -np.inf
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]                    # (B, k) some k best, unordered
    kth = np.take_along_axis(s, part, axis=1).min(axis=1, keepdims=True)   # (B, 1) k-th best score
    # every item tied with the k-th best competes for the last places: sort the rows' candidates by
    # (score desc, item_idx asc) among the items scoring >= the k-th best
    out = np.empty((s.shape[0], k), dtype=np.int64)
    for b in range(s.shape[0]):
        cand = np.flatnonzero(s[b] >= kth[b, 0])
        out[b] = cand[np.lexsort((cand, -s[b, cand]))][:k]
    out[np.take_along_axis(s, out, axis=1) == -np.inf] = -1               # fewer than k allowed items
    return out


def recommend_cooccurrence(sim: np.ndarray, hist: np.ndarray, seen: np.ndarray, n_recent: int, k: int,
                           fallback: np.ndarray) -> np.ndarray:
    """Top-k by summed similarity to the ``n_recent`` last history items, seen items removed; a row whose scores
    are all 0 (cold user or items never seen in training) takes the popularity order ``fallback`` (N,).

    Args:
        sim: (N, N); hist: (B, L) item_idx, -1 pads (the query only); seen: (B, N) bool (``top_k``).

    Returns:
        (B, k) int64.
    """
    recent = hist[:, -n_recent:]                                           # (B, n)
    valid = (recent > 0) & (recent < sim.shape[0])
    onehot = np.zeros((hist.shape[0], sim.shape[0]), dtype=np.float32)     # (B, N) recent-history counts
    np.add.at(onehot, (np.repeat(np.arange(hist.shape[0]), recent.shape[1])[valid.reshape(-1)],
                       recent[valid]), 1.0)
    scores = onehot @ sim                                                  # (B, N) summed similarities
    cold = ~(scores > 0).any(axis=1)
    scores[cold] = fallback[None, :]
    return top_k(scores, seen, k)


def _scores(recs: np.ndarray, targets: np.ndarray, k: int, train_items: np.ndarray, n_items: int) -> dict:
    return {f"hr@{k}": hit_rate(recs, targets, k), f"ndcg@{k}": ndcg(recs, targets, k),
            f"mrr@{k}": mrr(recs, targets, k), "coverage": coverage(recs, n_items),
            "novelty_bits": novelty(recs, train_items, n_items), "cases": int(targets.size)}


def prequential(log_: EventLog, params: PrequentialParams = PrequentialParams(),
                lists_out: list | None = None) -> dict:
    """Run the prequential replay (module docstring).

    Returns:
        ``{"windows": [{"window", "start_us", "end_us", "train_events", "cases",
        "models": {model: {"hr@K", "ndcg@K", "mrr@K", "coverage", "novelty_bits", "cases"}}}, ...],
        "overall": {model: {... over every case; coverage over the union of every window's lists}},
        "k", "n_windows", "n_recent"}``. Catalogue size for coverage = N - 1 (item 0 is padding).

    Args:
        lists_out: when given, receives per window ``({model: (B, K) lists}, (B,) targets)``.

    Raises:
        ValueError: fewer events than windows.
    """
    k = params.k
    n_items = int(max(log_.item_idx.max(initial=0), log_.hist.max(initial=0))) + 1
    bounds = window_bounds(len(log_), params.n_windows)
    # every event's excluded items at once: the log is in (event_time, event_id) order, so position = replay order
    seen = seen_before(log_.user_idx, log_.item_idx, np.arange(len(log_)))
    windows, all_recs, all_targets = [], {m: [] for m in MODELS}, []
    for w in range(1, params.n_windows + 1):
        start, end = int(bounds[w]), int(bounds[w + 1])
        tr_u, tr_i = log_.user_idx[:start], log_.item_idx[:start]
        sim = cooccurrence_model(tr_u, tr_i, n_items)
        pop = popularity_scores(tr_i, n_items)
        case = start + np.flatnonzero(log_.label[start:end] == 1)             # (B,)
        targets = log_.item_idx[case]
        parts = {m: [np.empty((0, k), dtype=np.int64)] for m in MODELS}
        for s in range(0, case.size, params.batch):
            rows = case[s:s + params.batch]                                    # (b,)
            mask = seen.mask(rows, n_items)                                    # (b, N)
            parts["cooccurrence"].append(recommend_cooccurrence(sim, log_.hist[rows], mask, params.n_recent, k,
                                                                pop))
            parts["popularity"].append(top_k(np.broadcast_to(pop, (rows.size, n_items)), mask, k))
        recs = {m: np.concatenate(p) for m, p in parts.items()}
        windows.append({"window": w, "start_us": int(log_.event_time[start]),
                        "end_us": int(log_.event_time[end - 1]), "train_events": start, "cases": int(case.size),
                        "models": {m: _scores(r, targets, k, tr_i, n_items) for m, r in recs.items()}})
        for m, r in recs.items():
            all_recs[m].append(r)
        if lists_out is not None:
            lists_out.append((recs, targets))
        all_targets.append(targets)
    targets = np.concatenate(all_targets)
    overall = {}
    for m in MODELS:
        r = np.concatenate(all_recs[m])
        overall[m] = {f"hr@{k}": hit_rate(r, targets, k), f"ndcg@{k}": ndcg(r, targets, k),
                      f"mrr@{k}": mrr(r, targets, k),
                      "coverage": coverage(r, n_items),
                      "novelty_bits": float(np.average([x["models"][m]["novelty_bits"] for x in windows],
                                                       weights=[max(x["cases"], 1) for x in windows])),
                      "cases": int(targets.size)}
    return {"windows": windows, "overall": overall, "k": k, "n_windows": params.n_windows,
            "n_recent": params.n_recent}
