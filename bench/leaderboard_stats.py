"""Statistics of the CTR leaderboard: paired cluster-bootstrap intervals of a metric's difference between two
models scored on the same test rows, a verdict from such an interval, and the spread over seeds.

The inputs are per-row test predictions (``training.artifacts.PREDICTION_COLUMNS``: ours in a model folder's
``predictions.parquet`` written with ``--save-predictions``, the peers' by ``bench/peers.py --predictions``), each
a mapping of equal-length columns ``row``, ``event_id`` (when the export has it), ``user``, ``label`` and
``score`` (a click probability) -- a dict of arrays, a pandas DataFrame or a pyarrow Table (``read_predictions``).

The bootstrap resamples test USERS, not rows (a cluster bootstrap: Davison & Hinkley 1997, section 3.8; Field &
Welsh 2007): a user's impressions are correlated (one taste, one rating scale), so resampling rows independently
would understate the variance. Each draw takes U users with replacement out of the U test users, all rows of a
drawn user together (a user drawn k times counts k times), and computes the metric of both models on that same
draw (paired), so the interval is the one of the DIFFERENCE, which is much narrower than the two models' own
intervals when their errors are correlated. The interval is the percentile interval (Efron & Tibshirani 1993,
chapter 13) of the draws' differences; the point estimate is the difference on the test split itself.

Metrics (as ``training.metrics``, which the unweighted case reproduces exactly):

- ``auc``: the Mann-Whitney statistic over all rows, ties counting one half (Fawcett 2006); a user drawn k times
  weighs each of its rows k;
- ``gauc``: per-user AUC weighted by the user's impressions, over users with both classes (Zhou et al. 2018, DIN);
- ``logloss``: mean binary cross-entropy in nats, probabilities clipped to [1e-7, 1 - 1e-7]; LOWER is better.

Everything is vectorised numpy: the draws are a (B, U) matrix of user multiplicities; GAUC and logloss are matrix
products with per-user sums, AUC a cumulative sum over the rows sorted once by score. 1,000 draws over 10,000 rows
take well under a second.

Legend: N rows, U users (clusters), B bootstrap draws, T distinct scores.

>>> rng = np.random.default_rng(0)
>>> y = rng.integers(0, 2, 2000)
>>> good = {"row": np.arange(2000), "user": np.repeat(np.arange(200), 10), "label": y,
...         "score": np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 2000), 0, 1)}
>>> noise = {**good, "score": rng.uniform(0, 1, 2000)}
>>> r = paired_bootstrap(good, noise, "auc", n_boot=200)
>>> verdict(r["low"], r["high"]), r["low"] > 0.3
('above', True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

#: metric -> whether a higher value is better.
METRICS = {"auc": True, "gauc": True, "logloss": False}
CLUSTERS = ("user", "row")
#: logloss clips probabilities to [EPS, 1 - EPS] (as training.metrics.logloss).
EPS = 1e-7
#: Rows x draws held in memory at once by the AUC bootstrap (float64: 16 MiB per array).
_CHUNK_CELLS = 2_000_000


class PredictionsMismatchError(ValueError):
    """Two sets of predictions do not cover the same test rows (keys missing on one side, or repeated), or a row has
    another label or user on each side: they were not scored on the same split. The message names the counts and a
    few keys; re-score both models on the same export."""


# --------------------------------------------------------------------------------------------------- inputs
def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """A predictions file (``training.artifacts.PREDICTION_COLUMNS``) as ``{column: (N,) array}``, with its Parquet
    key-value metadata (``model_version``, ``implementation``, ``seed``, ...) under ``"metadata"``.

    Raises:
        FileNotFoundError: no such file (train with ``--save-predictions``, or run ``bench/peers.py`` with
            ``--predictions``).
        ValueError: a required column is missing.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    out = _columns(table)
    meta = table.schema.metadata or {}
    out["metadata"] = {k.decode(): v.decode() for k, v in meta.items()}
    return out


def _columns(p) -> dict[str, np.ndarray]:
    """``{column: (N,) array}`` of a predictions mapping, DataFrame or pyarrow Table, checked.

    Raises:
        ValueError: ``user``, ``label``, ``score`` or both keys (``event_id``, ``row``) missing, or lengths differ.
    """
    names = list(p.column_names) if hasattr(p, "column_names") else list(p.keys())
    get = (lambda c: p.column(c).to_numpy()) if hasattr(p, "column_names") else (lambda c: np.asarray(p[c]))
    missing = [c for c in ("user", "label", "score") if c not in names]
    if missing or not {"event_id", "row"} & set(names):
        raise ValueError(f"predictions need user, label, score and a key (event_id or row); missing "
                         f"{missing or ['event_id/row']}, have {names}")
    out = {c: get(c) for c in ("row", "event_id", "user", "label", "score") if c in names}
    lengths = {c: len(v) for c, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"prediction columns differ in length: {lengths}")
    return out


def join_key(a: Mapping, b: Mapping) -> str:
    """The key two predictions are joined on: ``event_id`` when both have it (the sample's id in
    ``gold.ctr_samples``), else ``row`` (the position in the exported split, which both read in file order).

    Raises:
        PredictionsMismatchError: they share neither key.
    """
    for key in ("event_id", "row"):
        if key in a and key in b:
            return key
    raise PredictionsMismatchError(f"the predictions share no key: {sorted(a)} and {sorted(b)}")


def align(a, b) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows of ``a`` and ``b`` joined on their key (``join_key``), sorted by it.

    Returns:
        (key, user (N,), label (N,) float64 0/1, score of a (N,), score of b (N,)).

    Raises:
        PredictionsMismatchError: a key repeats, the two key sets differ, or a joined row has another label or user
            on each side.
        ValueError: a column is missing (``_columns``), a label is not 0/1, or no rows.
    """
    a, b = _columns(a), _columns(b)
    key = join_key(a, b)
    ka, kb = np.asarray(a[key]), np.asarray(b[key])
    oa, ob = np.argsort(ka, kind="stable"), np.argsort(kb, kind="stable")
    ka, kb = ka[oa], kb[ob]
    for name, k in (("a", ka), ("b", kb)):
        dup = k[1:][k[1:] == k[:-1]]
        if len(dup):
            raise PredictionsMismatchError(f"{key} repeats in {name}: {np.unique(dup)[:5].tolist()}")
    if len(ka) != len(kb) or not np.array_equal(ka, kb):
        only_a, only_b = np.setdiff1d(ka, kb), np.setdiff1d(kb, ka)
        raise PredictionsMismatchError(
            f"the predictions cover different rows ({key}): {len(ka)} and {len(kb)} rows, {len(only_a)} only in a "
            f"(e.g. {only_a[:3].tolist()}), {len(only_b)} only in b (e.g. {only_b[:3].tolist()}); score both on the "
            f"same export")
    if len(ka) == 0:
        raise ValueError("no rows to compare")
    user, label = np.asarray(a["user"])[oa], np.asarray(a["label"], np.float64)[oa]
    if not np.array_equal(user, np.asarray(b["user"])[ob]) \
            or not np.array_equal(label, np.asarray(b["label"], np.float64)[ob]):
        raise PredictionsMismatchError(f"rows joined on {key} differ in user or label: not the same test split")
    if not np.isin(label, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return key, user, label, np.asarray(a["score"], np.float64)[oa], np.asarray(b["score"], np.float64)[ob]


# ------------------------------------------------------------------------------------------ weighted metrics
def _draws(n_clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, U) float64: how often each of the U clusters is drawn in each draw (U draws with replacement,
    rows summing to U)."""
    idx = rng.integers(0, n_clusters, size=(n_boot, n_clusters))  # (B, U)
    flat = (idx + n_clusters * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_clusters).reshape(n_boot, n_clusters).astype(np.float64)


class _AucBoot:
    """The weighted AUC of one score vector under many row weightings: rows sorted by score once, ties grouped
    (T groups); for row weights w (B, N) it is sum_g P_g (cumN_{<g} + N_g / 2) / (P N), P_g and N_g the weight of
    the positives and negatives of group g -- the Mann-Whitney statistic of the rows repeated w times."""

    def __init__(self, label: np.ndarray, score: np.ndarray) -> None:
        self.order = np.argsort(score, kind="mergesort")
        s = score[self.order]
        self.starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]  # (T,) first sorted row of each tie group
        self.pos = label[self.order]  # (N,) 0/1 in sorted order

    def __call__(self, w: np.ndarray) -> np.ndarray:
        """(B,) AUC for row weights ``w`` (B, N) in the original row order; nan where a class has no weight."""
        w = w[:, self.order]  # (B, N) sorted by score
        wp = w * self.pos
        p = np.add.reduceat(wp, self.starts, axis=1)  # (B, T)
        n = np.add.reduceat(w - wp, self.starts, axis=1)  # (B, T)
        below = np.cumsum(n, axis=1) - n  # negatives' weight strictly below each group
        tot_p, tot_n = p.sum(1), n.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (p * (below + 0.5 * n)).sum(1) / (tot_p * tot_n)


def _per_user_auc(user_idx: np.ndarray, label: np.ndarray, score: np.ndarray, n_users: int):
    """Per-user AUC, vectorised: ranks within each user (ties averaged) from one lexsort.

    Returns:
        (auc (U,), valid (U,) bool: the user has both classes; auc is 0 where not valid).
    """
    order = np.lexsort((score, user_idx))  # by user, then score
    u, s, y = user_idx[order], score[order], label[order]
    n = len(u)
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_run = new_user | np.r_[True, s[1:] != s[:-1]]
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], n]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))  # first sorted row of the row's user
    rank = np.repeat((run_start + run_end + 1) / 2.0, run_end - run_start) - user_start  # 1-based within user
    n_pos = np.bincount(u, weights=y, minlength=n_users)
    n_all = np.bincount(u, minlength=n_users).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(u, weights=rank * y, minlength=n_users)
    valid = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(valid, (rank_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg), 0.0)
    return auc, valid


def _logloss_terms(label: np.ndarray, score: np.ndarray) -> np.ndarray:
    p = np.clip(score, EPS, 1.0 - EPS)
    return -(label * np.log(p) + (1.0 - label) * np.log(1.0 - p))  # (N,) nats


def _metric_fn(metric: str, cluster_idx: np.ndarray, n_clusters: int, label: np.ndarray, score: np.ndarray):
    """``f(counts (B, K)) -> (B,)``: the metric of ``score`` when cluster k's rows count counts[:, k] times."""
    if metric == "logloss":
        loss = np.bincount(cluster_idx, weights=_logloss_terms(label, score), minlength=n_clusters)  # (K,)
        rows = np.bincount(cluster_idx, minlength=n_clusters).astype(np.float64)
        return lambda c: (c @ loss) / (c @ rows)
    if metric == "gauc":
        auc_u, valid = _per_user_auc(cluster_idx, label, score, n_clusters)
        weight = np.bincount(cluster_idx, minlength=n_clusters) * valid  # (U,) impressions of users with both
        with np.errstate(invalid="ignore", divide="ignore"):
            return lambda c: (c @ (weight * auc_u)) / (c @ weight)
    boot = _AucBoot(label, score)
    return lambda c: boot(c[:, cluster_idx])


# ------------------------------------------------------------------------------------------------ the API
def metric_value(predictions, metric: str) -> float:
    """``metric`` of one set of predictions on all its rows (as ``training.metrics``' ``auc``, ``gauc``,
    ``logloss``).

    Raises:
        ValueError: unknown metric, a column missing, or the metric undefined (one class only; no user with both).
    """
    p = _columns(predictions)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    users, cluster_idx = np.unique(np.asarray(p["user"]), return_inverse=True)
    value = float(_metric_fn(metric, cluster_idx, len(users), np.asarray(p["label"], np.float64),
                             np.asarray(p["score"], np.float64))(np.ones((1, len(users))))[0])
    if math.isnan(value):
        raise ValueError(f"{metric} is undefined on these rows (one class only, or no user with both)")
    return value


def paired_bootstrap(a, b, metric: str, n_boot: int = 1000, seed: int = 0, cluster: str = "user",
                     level: float = 0.95) -> dict:
    """Paired cluster-bootstrap interval of ``metric(a) - metric(b)`` on the same test rows (see the module
    docstring: Davison & Hinkley 1997, section 3.8, for resampling clusters; Efron & Tibshirani 1993, chapter 13,
    for the percentile interval).

    Args:
        a, b: predictions of two models (``read_predictions``'s columns), joined on ``event_id`` (else ``row``).
        metric: ``auc``, ``gauc`` or ``logloss`` (lower is better: a positive difference means ``a`` is worse).
        n_boot: bootstrap draws B.
        seed: seeds the draws (the same seed draws the same users for any pair of models with the same rows).
        cluster: ``user`` (resample users, all rows of a drawn user together) or ``row`` (rows independently; not
            for ``gauc``, whose per-user AUCs need whole users).
        level: the interval's coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        ``{"metric", "diff"`` (point estimate on all rows), ``"low", "high"`` (the interval), ``"a", "b"`` (each
        model's value on all rows), ``"higher_is_better", "key", "n_rows", "n_clusters", "n_boot", "n_undefined"``
        (draws where the metric was undefined, left out), ``"cluster", "level"}``.

    Raises:
        PredictionsMismatchError: the two sets of rows differ (``align``).
        ValueError: unknown ``metric`` / ``cluster``, ``n_boot`` < 1, ``level`` outside (0, 1), ``gauc`` with
            ``cluster="row"``, or the metric undefined on all rows.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {CLUSTERS}, got {cluster!r}")
    if metric == "gauc" and cluster != "user":
        raise ValueError("gauc is a mean over users: resample whole users (cluster='user')")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"n_boot must be >= 1 and level in (0, 1), got {n_boot}, {level}")
    key, user, label, sa, sb = align(a, b)
    if cluster == "user":
        _, cluster_idx = np.unique(user, return_inverse=True)
        n_clusters = int(cluster_idx.max()) + 1
    else:
        cluster_idx, n_clusters = np.arange(len(user)), len(user)
    fa, fb = (_metric_fn(metric, cluster_idx, n_clusters, label, s) for s in (sa, sb))
    va, vb = (float(f(np.ones((1, n_clusters)))[0]) for f in (fa, fb))
    if math.isnan(va) or math.isnan(vb):
        raise ValueError(f"{metric} is undefined on these rows (one class only, or no user with both)")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // max(len(label), n_clusters)) if metric == "auc" else n_boot
    diffs = []
    for start in range(0, n_boot, per_chunk):
        c = _draws(n_clusters, min(per_chunk, n_boot - start), rng)  # (b, K)
        diffs.append(fa(c) - fb(c))
    d = np.concatenate(diffs)
    ok = d[~np.isnan(d)]
    if len(ok) == 0:
        raise ValueError(f"{metric} was undefined in every draw")
    low, high = np.percentile(ok, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return {"metric": metric, "diff": va - vb, "low": float(low), "high": float(high), "a": va, "b": vb,
            "higher_is_better": METRICS[metric], "key": key, "n_rows": len(label), "n_clusters": n_clusters,
            "n_boot": n_boot, "n_undefined": int(len(d) - len(ok)), "cluster": cluster, "level": level}


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """Whether model a is ``above`` (better than), ``level`` with, or ``below`` model b, from the interval [low,
    high] of ``metric(a) - metric(b)`` (``paired_bootstrap``): ``level`` when the interval holds 0, i.e. the
    difference is not significant at the interval's level (a test by interval inversion; Efron & Tibshirani 1993,
    chapter 16). For a metric where lower is better (logloss) pass ``higher_is_better=False``.

    >>> verdict(0.002, 0.010), verdict(-0.004, 0.003), verdict(-0.010, -0.001)
    ('above', 'level', 'below')
    >>> verdict(0.01, 0.02, higher_is_better=False)  # a's logloss is higher: a is worse
    'below'

    Raises:
        ValueError: ``low`` > ``high``, or a nan.
    """
    if not low <= high:
        raise ValueError(f"not an interval: [{low}, {high}]")
    if low > 0:
        return "above" if higher_is_better else "below"
    if high < 0:
        return "below" if higher_is_better else "above"
    return "level"


def seed_summary(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (ddof=1; nan for one value) and count of a figure over seeds.

    >>> seed_summary([0.75, 0.76, 0.77, 0.76])
    {'mean': 0.76, 'std': 0.008164965809277268, 'n': 4}

    Raises:
        ValueError: no values, or a nan among them.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if len(x) == 0 or np.isnan(x).any():
        raise ValueError(f"seed_summary needs at least one value and no nan, got {x.tolist()}")
    return {"mean": float(x.mean()), "std": float(np.std(x, ddof=1)) if len(x) > 1 else float("nan"), "n": len(x)}
