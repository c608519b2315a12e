"""The replay estimator of Li et al. 2011 ("Unbiased offline evaluation of contextual-bandit-based news article
recommendation algorithms", Algorithm 3) on logged uniformly random exposures.

Input: a logged-bandit table, one row per exposure, in the shape of the generator's random slice
(pipelines/generator.py, issue 3): ``event_time``, ``user_id``, context feature columns, ``candidates``
(array<int>, the arm set), ``item_id`` (the logged arm, drawn uniformly from ``candidates``), ``click`` (0/1),
``is_random`` (true). Rows whose ``is_random`` is false are not used (their exposures are not uniform).

The events are replayed in time order. For each, the policy chooses an arm from the candidates given the context
and what it has learnt so far; the event is *kept* when that arm equals the logged one, and then the policy is
updated with the logged click. The estimate is the click-through rate over the kept events. Under uniform logging
with ``C`` candidates about ``E / C`` events are kept, and for a policy that does not learn the estimate is
unbiased for its CTR (Li et al. 2011, Theorem 1); for a learning policy it estimates the CTR of the policy run on
a stream ``C`` times shorter.

The interval is the Wilson score interval for a binomial proportion (Wilson 1927) over the kept clicks; for a
learning policy, whose kept clicks are not identically distributed, it is an approximation.

Legend: E events, C candidates per event, D context dimension, N arms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from evaluation.policies import UCB1, EmbeddingPolicy, EpsilonGreedy, LinUCB, Policy, Popularity, ThompsonSampling
from features.errors import PlatformError

RESERVED = ("event_time", "user_id", "candidates", "item_id", "click", "is_random")


class BanditLogError(PlatformError):
    """A logged-bandit table lacks a column, or a logged item is not among its candidates."""


@dataclass(frozen=True)
class BanditLog:
    """Uniformly random exposures in time order.

    Args:
        user: (E,) int64; context: (E, D) float64; candidates: (E, C) int64 (every event offers C arms);
        item: (E,) int64 the logged arm; click: (E,) float64 0/1.
    """

    user: np.ndarray
    context: np.ndarray
    candidates: np.ndarray
    item: np.ndarray
    click: np.ndarray

    def __len__(self) -> int:
        return int(self.item.shape[0])


def bandit_log(df: pd.DataFrame, context_cols: tuple[str, ...] | None = None, hashed_dim: int = 0) -> BanditLog:
    """The random rows of a logged-bandit table as a BanditLog, sorted by ``event_time`` (stable).

    Args:
        df: columns ``RESERVED`` plus the context features.
        context_cols: context columns; ``None`` takes every numeric column that is not reserved.
        hashed_dim: when > 0 the context columns are categorical and enter hashed (``hashed_context``) into this
            many dimensions; 0 takes their values as they are.

    Raises:
        BanditLogError: a required column is missing, candidate sets differ in size, or a logged item is not
            among its candidates.
    """
    missing = [c for c in RESERVED if c not in df.columns]
    if missing:
        raise BanditLogError(f"logged-bandit table lacks columns {missing}; it needs {list(RESERVED)} plus "
                             "context features (see pipelines/generator.py)")
    df = df[df["is_random"].astype(bool)].sort_values("event_time", kind="stable")
    if context_cols is None:
        context_cols = tuple(c for c in df.columns if c not in RESERVED and pd.api.types.is_numeric_dtype(df[c]))
    sizes = {len(c) for c in df["candidates"]}
    if len(sizes) > 1:
        raise BanditLogError(f"candidate sets have sizes {sorted(sizes)}; the replay estimator needs one size")
    cands = np.array([np.asarray(c, dtype=np.int64) for c in df["candidates"]]).reshape(len(df), -1)
    item = df["item_id"].to_numpy(dtype=np.int64)
    bad = ~(cands == item[:, None]).any(axis=1)
    if bad.any():
        raise BanditLogError(f"{int(bad.sum())} logged items are not among their candidates (first at "
                             f"event_time {df['event_time'].iloc[int(np.argmax(bad))]}); fix the logger")
    if hashed_dim:
        ctx = hashed_context(df, tuple(context_cols), hashed_dim)
    else:
        ctx = df[list(context_cols)].to_numpy(dtype=np.float64) if context_cols else np.zeros((len(df), 0))
    return BanditLog(user=df["user_id"].to_numpy(dtype=np.int64), context=ctx, candidates=cands, item=item,
                     click=df["click"].to_numpy(dtype=np.float64))


def hashed_context(df: pd.DataFrame, cols: tuple[str, ...], dim: int) -> np.ndarray:
    """Categorical context as a hashed one-hot vector (Weinberger et al. 2009) plus a constant 1 in the last slot,
    so a linear policy (LinUCB) can use fields with 10^6 values.

    Args:
        df: E rows; cols: categorical (integer) columns; dim: output width D (>= 2).

    Returns:
        (E, D) float64, at most ``len(cols) + 1`` ones per row.

    >>> hashed_context(pd.DataFrame({"a": [1, 1], "b": [5, 6]}), ("a", "b"), 4).sum(axis=1).tolist()
    [3.0, 3.0]
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    out = np.zeros((len(df), dim), dtype=np.float64)
    out[:, -1] = 1.0
    rows = np.arange(len(df))
    for j, c in enumerate(cols):
        v = df[c].to_numpy(dtype=np.int64)
        slot = ((v * 0x9E3779B1 + (j + 1) * 0x85EBCA77) % 2_147_483_647) % (dim - 1)   # multiplicative hash
        out[rows, slot] += 1.0
    return out


def wilson_interval(clicks: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``clicks / n`` at ``z`` standard errors (1.96: 95 %). ``(nan, nan)`` for n = 0.

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    """
    if n == 0:
        return float("nan"), float("nan")
    p = clicks / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@dataclass(frozen=True)
class ReplayEstimate:
    """Args:
        policy: name; ctr: clicks / kept; low, high: Wilson 95 % interval; kept, events: counts; clicks: sum."""

    policy: str
    ctr: float
    low: float
    high: float
    kept: int
    clicks: float
    events: int

    def as_dict(self) -> dict:
        return asdict(self)


def replay_estimate(log_: BanditLog, policy: Policy, z: float = 1.96) -> ReplayEstimate:
    """Li et al. 2011, Algorithm 3: CTR of ``policy`` over the events where its choice equals the logged arm;
    the policy is updated on those events only.

    Raises:
        BanditLogError: the policy chose an arm outside the candidate set.
    """
    kept, clicks = 0, 0.0
    for e in range(len(log_)):
        cands, ctx, user = log_.candidates[e], log_.context[e], int(log_.user[e])
        arm = policy.choose(cands, ctx, user)
        if arm not in cands:
            raise BanditLogError(f"policy {policy.name} chose arm {arm} outside the candidates of event {e}")
        if arm == log_.item[e]:
            kept += 1
            clicks += log_.click[e]
            policy.update(arm, ctx, user, float(log_.click[e]))
    low, high = wilson_interval(clicks, kept, z)
    return ReplayEstimate(policy=policy.name, ctr=float(clicks / kept) if kept else float("nan"), low=float(low),
                          high=float(high), kept=kept, clicks=float(clicks), events=len(log_))


@dataclass(frozen=True)
class SyntheticBandit:
    """Ground truth of a simulated uniform log: ``P(click | user u, arm a) = sigmoid(bias[a] + x_u . v_a)``.

    Args:
        bias: (N,); item_vectors: (N, D) ``v``; user_context: (U, D) ``x``.
    """

    bias: np.ndarray
    item_vectors: np.ndarray
    user_context: np.ndarray

    def ctr(self, user: np.ndarray, arm: np.ndarray) -> np.ndarray:
        """(E,) click probabilities."""
        logit = self.bias[arm] + (self.user_context[user] * self.item_vectors[arm]).sum(axis=1)
        return 1.0 / (1.0 + np.exp(-logit))


def simulate_uniform_log(n_events: int, n_arms: int, n_candidates: int, n_users: int, dim: int,
                         rng: np.random.Generator, scale: float = 1.0) -> tuple[pd.DataFrame, SyntheticBandit]:
    """A logged-bandit table of uniformly random exposures with a known CTR model (a stand-in for the generator's
    random slice until pipelines/generator.py exists): per event a user, ``n_candidates`` distinct arms, one of
    them logged uniformly, a click drawn from ``SyntheticBandit.ctr``. Context columns ``x0 .. x{dim-1}`` hold
    the user's features. Base CTRs run from about 2 % to 20 % (``bias`` in logit(0.02) .. logit(0.2)).

    Returns:
        the table (columns of ``RESERVED`` plus the context) and its ground truth.
    """
    truth = SyntheticBandit(bias=rng.uniform(np.log(0.02 / 0.98), np.log(0.2 / 0.8), n_arms),
                            item_vectors=rng.normal(0, scale / math.sqrt(dim), (n_arms, dim)),
                            user_context=rng.normal(0, 1, (n_users, dim)))
    user = rng.integers(0, n_users, n_events)
    cands = np.argsort(rng.random((n_events, n_arms)), axis=1)[:, :n_candidates]     # (E, C) distinct arms
    item = cands[np.arange(n_events), rng.integers(0, n_candidates, n_events)]
    click = (rng.random(n_events) < truth.ctr(user, item)).astype(np.int64)
    df = pd.DataFrame({"event_time": pd.to_datetime(np.arange(n_events), unit="s", utc=True), "user_id": user,
                       **{f"x{j}": truth.user_context[user, j] for j in range(dim)},
                       "candidates": list(cands), "item_id": item, "click": click, "is_random": True})
    return df, truth


def bandit_evaluation(bandit_path: str | None, n_events: int, seed: int) -> dict:
    """Replay-estimator CTR of every explore/exploit policy on a logged random slice: the ``bandit`` part of the
    evaluate stage (evaluation.evaluate).

    Args:
        bandit_path: Parquet logged-bandit table in the generator's shape (pipelines/generator.py; only its
            ``is_random`` rows are read); ``None`` simulates one with known CTRs (``simulate_uniform_log``).
        n_events: events of the simulated log (unused with ``bandit_path``).
        seed: seeds the simulated log and the randomised policies.

    Returns:
        ``{"source", "events", "candidates", "expected_kept", "policies": {name: ReplayEstimate.as_dict()},
        "uniform_ctr"}``, plus on a simulated log ``"oracle_ctr"`` (the per-event best arm's true CTR) and
        ``"truth"`` (``simulated_truth``: the true values beside the estimates).

    Raises:
        BanditLogError: the table is not in the logged-bandit shape.
    """
    truth = None
    if bandit_path:
        # the generator's Parquet (pipelines/generator.py). Context = its user fields c01..c08 and context fields
        # c17..c26, hashed for LinUCB. Never the item fields c09..c16: they describe the *logged* item, and a
        # policy that sees them learns which arm was logged, breaking the replay's independence (on a 1M-event
        # log LinUCB kept 2 % of the events instead of 1 / C = 10 %).
        import pyarrow.dataset as pads

        dset = pads.dataset(bandit_path, format="parquet")
        df = dset.to_table(filter=pads.field("is_random")).to_pandas()
        source = bandit_path
        cat = tuple(f"c{j:02d}" for j in (*range(1, 9), *range(17, 27)) if f"c{j:02d}" in df.columns)
        blog = bandit_log(df, context_cols=cat, hashed_dim=32)
    else:
        df, truth = simulate_uniform_log(n_events, n_arms=50, n_candidates=10, n_users=500, dim=5,
                                         rng=np.random.default_rng(seed), scale=2.0)
        source = "simulated (evaluation.estimators.simulate_uniform_log, seed %d)" % seed
        blog = bandit_log(df)
    est = {p.name: replay_estimate(blog, p).as_dict() for p in _policies(blog, truth, seed)}
    # a policy's kept count must be near events / C: far from it, its choices depend on the logged arm
    out = {"source": source, "events": len(blog), "candidates": int(blog.candidates.shape[1]),
           "expected_kept": len(blog) / blog.candidates.shape[1], "policies": est}
    if truth is not None:   # what the best static policy would earn: the per-event best arm's true CTR
        best = truth.ctr(np.repeat(blog.user, blog.candidates.shape[1]), blog.candidates.reshape(-1))
        out["oracle_ctr"] = float(best.reshape(blog.candidates.shape).max(axis=1).mean())
    out["uniform_ctr"] = float(blog.click.mean())      # the logging policy's own CTR
    if truth is not None:
        out["truth"] = simulated_truth(blog, truth, _policies(blog, truth, seed), est, seed)
    return out


def _policies(blog: BanditLog, truth: SyntheticBandit | None, seed: int) -> list:
    """Fresh instances of the policies ``bandit_evaluation`` replays (the same seeds on every call)."""
    pols = [EpsilonGreedy(0.1, np.random.default_rng(seed + 1)), ThompsonSampling(np.random.default_rng(seed + 2)),
            UCB1(), Popularity()]
    if blog.context.shape[1]:
        pols.append(LinUCB(dim=blog.context.shape[1], alpha=1.0))
    if truth is not None:   # the trained-embedding stand-in: the true item factors seen through noise
        noisy = truth.item_vectors + np.random.default_rng(seed + 3).normal(0, 0.3, truth.item_vectors.shape)
        pols.append(EmbeddingPolicy(noisy, truth.user_context))
    return pols


def simulated_truth(blog: BanditLog, truth: SyntheticBandit, pols: list, est: dict, seed: int) -> dict:
    """What the simulator knows about its own log ``blog``, beside the replay estimates ``est``: the true click
    probabilities ``SyntheticBandit.ctr``.

    - ``uniform_ctr``: the logging policy's true CTR, the mean click probability of the logged arms (the log's
      observed ``uniform_ctr`` is a draw around it);
    - ``arm_ctr``: ``min``, ``mean``, ``max`` over the arms of each arm's true CTR averaged over the users;
    - ``policies``: per policy (``pols``: fresh instances of the replayed ones) its true value, the mean click
      probability of the arms it chooses when run online in the simulator for as many events as the replay kept
      for it (Li et al. 2011, Theorem 1: the replay estimate over ``kept`` events is distributed as that online
      run), with clicks drawn from the truth (``seed + 4``).

    Returns:
        ``{"uniform_ctr", "arm_ctr", "policies": {name: true CTR}, "method"}``.
    """
    rng = np.random.default_rng(seed + 4)
    values = {}
    for p in pols:
        steps = min(int(est[p.name]["kept"]), len(blog))
        chosen = np.empty(steps)
        for e in range(steps):                                     # the policy online, updated on every event
            user, ctx = int(blog.user[e]), blog.context[e]
            arm = p.choose(blog.candidates[e], ctx, user)
            chosen[e] = truth.ctr(np.array([user]), np.array([arm]))[0]
            p.update(arm, ctx, user, float(rng.random() < chosen[e]))
        values[p.name] = float(chosen.mean()) if steps else float("nan")
    users = np.arange(truth.user_context.shape[0])
    arms = np.arange(truth.bias.shape[0])
    per_arm = truth.ctr(np.repeat(users, arms.size), np.tile(arms, users.size)).reshape(users.size, -1).mean(axis=0)
    return {"uniform_ctr": float(truth.ctr(blog.user, blog.item).mean()),
            "arm_ctr": {"min": float(per_arm.min()), "mean": float(per_arm.mean()), "max": float(per_arm.max())},
            "policies": values,
            "method": "each policy run online in the simulator for as many events as the replay kept for it"}
