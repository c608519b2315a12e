"""The replay estimator (Li et al. 2011) on logs built here from a known CTR per item, so its expectation is
known; a hand-made table; the Wilson interval; the checks on the logged-bandit table."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.estimators import (BanditLogError, bandit_log, replay_estimate, simulate_uniform_log,
                                   wilson_interval)
from evaluation.policies import UCB1, EmbeddingPolicy


def uniform_log(ctr: np.ndarray, n_events: int, n_candidates: int, seed: int) -> pd.DataFrame:
    """Uniformly random exposures: C distinct arms per event, the logged one uniform among them, click ~
    Bernoulli(ctr[item]); one context feature ``x0`` = 1."""
    rng = np.random.default_rng(seed)
    cands = np.argsort(rng.random((n_events, ctr.size)), axis=1)[:, :n_candidates]
    item = cands[np.arange(n_events), rng.integers(0, n_candidates, n_events)]
    return pd.DataFrame({"event_time": np.arange(n_events), "user_id": 0, "x0": 1.0, "candidates": list(cands),
                         "item_id": item, "click": (rng.random(n_events) < ctr[item]).astype(int),
                         "is_random": True})


class LowestId:
    """Static policy: the lowest arm id of the candidates; counts its updates."""

    name = "lowest_id"

    def __init__(self) -> None:
        self.updates = 0

    def choose(self, candidates, context, user):
        return int(candidates.min())

    def update(self, arm, context, user, reward):
        self.updates += 1


def test_static_policy_estimate_matches_its_known_ctr():
    ctr = np.array([0.05, 0.30, 0.10, 0.20, 0.15, 0.02, 0.25, 0.08])
    n, c = ctr.size, 3
    log_ = bandit_log(uniform_log(ctr, 60_000, c, seed=0))
    # P(min of a uniform C-subset of {0..N-1} is a) = C(N-1-a, C-1) / C(N, C)
    p_min = np.array([math.comb(n - 1 - a, c - 1) for a in range(n)]) / math.comb(n, c)
    expected = float(p_min @ ctr)                                           # 0.1525
    policy = LowestId()
    est = replay_estimate(log_, policy)
    se = math.sqrt(expected * (1 - expected) / est.kept)
    assert est.kept == policy.updates                                       # updated on kept events only
    assert est.kept == pytest.approx(60_000 / c, rel=0.03)                  # about E / C kept
    assert abs(est.ctr - expected) < 3 * se
    assert est.low < est.ctr < est.high and est.events == 60_000


def test_interval_covers_the_known_ctr_about_95_percent_of_the_time():
    ctr = np.array([0.2, 0.5, 0.1, 0.3])
    p_min = np.array([math.comb(3 - a, 1) for a in range(4)]) / math.comb(4, 2)   # C = 2 of N = 4
    expected = float(p_min @ ctr)                                                  # 0.3
    covered = [(e := replay_estimate(bandit_log(uniform_log(ctr, 1_200, 2, seed=100 + s)), LowestId())).low
               < expected < e.high for s in range(120)]
    assert 0.88 <= np.mean(covered) <= 0.995


def test_hand_table():
    # policy LowestId; kept where the logged item is the lowest candidate: events 0 and 2
    df = pd.DataFrame({"event_time": [3, 1, 2, 4], "user_id": 0, "candidates": [[4, 2], [1, 3], [3, 5], [2, 1]],
                       "item_id": [4, 1, 3, 2], "click": [1, 1, 0, 1], "is_random": [True, True, True, False]})
    # sorted by time: (t1: [1,3] item 1 click 1: kept), (t2: [3,5] item 3 click 0: kept), (t3: [4,2] item 4: no);
    # t4 is not random and is dropped
    est = replay_estimate(bandit_log(df, context_cols=()), LowestId())
    assert (est.kept, est.clicks, est.events, est.ctr) == (2, 1.0, 3, 0.5)


def test_learning_policy_approaches_best_arm():
    ctr = np.array([0.05, 0.10, 0.40, 0.15])
    log_ = bandit_log(uniform_log(ctr, 40_000, 4, seed=1))                  # every arm offered every time
    est = replay_estimate(log_, UCB1())
    assert est.ctr > 0.35                                                   # uniform would give 0.175
    assert est.high > est.ctr > est.low


def test_simulated_log_static_embedding_policy_matches_truth():
    df, truth = simulate_uniform_log(30_000, n_arms=20, n_candidates=5, n_users=50, dim=3,
                                     rng=np.random.default_rng(2), scale=2.0)
    log_ = bandit_log(df)
    policy = EmbeddingPolicy(truth.item_vectors, truth.user_context)
    est = replay_estimate(log_, policy)
    chosen = np.array([policy.choose(c, None, u) for c, u in zip(log_.candidates, log_.user)])
    expected = float(truth.ctr(log_.user, chosen).mean())                 # the policy's true CTR on these events
    assert abs(est.ctr - expected) < 3 * math.sqrt(expected * (1 - expected) / est.kept)


def test_wilson_interval_by_hand():
    low, high = wilson_interval(2, 4)        # p = .5, z^2 = 3.8416: centre .5, half = 1.96*sqrt(.0625+.0600)/1.9604
    half = 1.96 * math.sqrt(0.25 / 4 + 3.8416 / 64) / (1 + 3.8416 / 4)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bad_tables_raise():
    good = {"event_time": [1], "user_id": [0], "candidates": [[1, 2]], "item_id": [1], "click": [1],
            "is_random": [True]}
    with pytest.raises(BanditLogError, match="lacks columns"):
        bandit_log(pd.DataFrame({k: v for k, v in good.items() if k != "click"}))
    with pytest.raises(BanditLogError, match="not among their candidates"):
        bandit_log(pd.DataFrame(good | {"item_id": [7]}))
    with pytest.raises(BanditLogError, match="sizes"):
        bandit_log(pd.DataFrame({k: v * 2 for k, v in good.items()} | {"candidates": [[1, 2], [1, 2, 3]]}))


OBP_PYTHON = Path(__file__).resolve().parent.parent / ".venv-obp" / "bin" / "python"
OBP_SCRIPT = """
import sys, numpy as np
from obp.ope import ReplayMethod
for path in sys.argv[1:]:
    d = np.load(path)
    print(ReplayMethod().estimate_policy_value(reward=d["reward"], action=d["action"], action_dist=d["action_dist"]))
"""


class Recording:
    """Wraps a policy and records its choice at every event (what obp's ReplayMethod reads as action_dist)."""

    def __init__(self, policy) -> None:
        self.policy, self.name, self.choices = policy, policy.name, []

    def choose(self, candidates, context, user):
        arm = self.policy.choose(candidates, context, user)
        self.choices.append(arm)
        return arm

    def update(self, arm, context, user, reward):
        self.policy.update(arm, context, user, reward)


@pytest.mark.slow   # importing obp (torch, statsmodels, seaborn, pingouin) takes minutes on 2 busy cores
def test_matches_open_bandit_pipeline_replay_method(tmp_path):
    """obp.ope.ReplayMethod (Saito et al. 2021) on the same log and the same per-event choices, for a static and a
    learning policy: the two estimates agree to rounding."""
    if not OBP_PYTHON.exists():
        pytest.skip("no .venv-obp: run `make obp-venv` (make test does)")
    ctr = np.array([0.05, 0.30, 0.10, 0.20, 0.15, 0.02])
    log_ = bandit_log(uniform_log(ctr, 6_000, 3, seed=3))
    ours, paths = [], []
    for make_policy in (LowestId, UCB1):
        rec = Recording(make_policy())
        ours.append(replay_estimate(log_, rec).ctr)
        action_dist = np.zeros((len(log_), ctr.size, 1))                   # (E, N arms, 1 position)
        action_dist[np.arange(len(log_)), np.array(rec.choices), 0] = 1.0
        paths.append(tmp_path / f"{rec.name}.npz")
        np.savez(paths[-1], reward=log_.click, action=log_.item, action_dist=action_dist)
    out = subprocess.run([str(OBP_PYTHON), "-c", OBP_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    theirs = [float(x) for x in out.strip().splitlines()[-2:]]
    assert theirs == pytest.approx(ours, abs=1e-12)
    assert ours[1] > ours[0]                                               # UCB1 learns; lowest id does not


class UniformRandom:
    """A policy that picks uniformly among the candidates with its own RNG: independent of the logging policy, so
    its replayed CTR estimates the random slice's mean click rate, and it keeps about 1/C of the events."""

    name = "uniform_random"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, candidates, context, user):
        return int(candidates[self.rng.integers(len(candidates))])

    def update(self, arm, context, user, reward):
        pass


def test_estimator_on_the_generators_random_slice():
    """The generator's uniformly random slice (pipelines/generator.py) is a valid logged-bandit table: a policy
    independent of the log keeps ~1/C of the slice and estimates the slice's click rate within 3 standard errors;
    a static policy is updated on exactly the events it keeps."""
    from pipelines.generator import GeneratorConfig, generate, to_arrow

    cfg = GeneratorConfig(n_events=60_000, seed=3, n_users=2_000, n_items=400, random_fraction=0.5, n_candidates=4)
    df = pd.concat([to_arrow(chunk).to_pandas() for chunk in generate(cfg)], ignore_index=True)
    log_ = bandit_log(df, context_cols=())
    slice_ = df[df["is_random"].astype(bool)]
    assert len(log_) == len(slice_) > 20_000
    est = replay_estimate(log_, UniformRandom(seed=0))
    p = float(slice_["click"].mean())
    assert est.kept == pytest.approx(len(slice_) / cfg.n_candidates, rel=0.05)
    assert abs(est.ctr - p) < 3 * math.sqrt(p * (1 - p) / est.kept)
    static = LowestId()
    assert replay_estimate(log_, static).kept == static.updates > 0
