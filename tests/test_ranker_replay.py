"""Rankers in the replay (evaluation.ranking): each ranker reorders a case's candidates with the case's
point-in-time features, batched, exactly as a one-row-at-a-time reference built by hand; the item counters at a
case are the item's events at strictly earlier seconds."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.config import PlatformConfig
from features.definitions import DENSE_FEATURES, dense_inputs
from evaluation.ranking import ItemHistory, RankingParams, rank_candidates, read_case_features
from training.artifacts import load_model, save_model
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.registry import get_model

DENSE = tuple(f.name for f in DENSE_FEATURES)


def _export(cfg: PlatformConfig) -> list[dict]:
    """ctr_samples export: user u rates items (5u + 3j) % 39 + 1 at second 10j + u (users interleaved, so item
    counters change between cases), stars (u + j) % 5 + 1; its history and stars and counters as the features job
    writes them."""
    rows, t0 = [], datetime(2024, 1, 1, tzinfo=timezone.utc)
    for u in range(1, 5):
        for j in range(6):
            item = (5 * u + 3 * j) % 39 + 1
            rows.append({"event_id": f"e{u}-{j}", "user_idx": u, "item_idx": item, "sec": 10 * j + u,
                         "rating": float((u + j) % 5 + 1)})
    for r in rows:
        before = sorted((x for x in rows if x["user_idx"] == r["user_idx"] and x["sec"] < r["sec"]),
                        key=lambda x: x["sec"])
        r |= {"age_idx": r["user_idx"] % 7 + 1, "gender_idx": r["user_idx"] % 2 + 1, "occupation_idx": 3,
              "zip_idx": r["user_idx"], "genre_idx": [r["item_idx"] % 19 + 1, 5] if r["item_idx"] % 2 else [],
              "hist_item_idx": [x["item_idx"] for x in before],
              "hist_rating": [int(math.floor(x["rating"] + 0.5)) for x in before],
              "user_prior_events": len(before) or None,
              "user_prior_rating": sum(x["rating"] for x in before) / len(before) if before else None,
              "event_time": t0 + timedelta(seconds=r["sec"]), "label": int(r["rating"] >= 4)}
    d = cfg.lake_dir / "export" / "ctr_samples" / "split=test"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "sec"} for r in rows]),
                   d / "part-0.parquet")
    return rows


def test_item_counters_count_strictly_earlier_seconds_only():
    h = ItemHistory.of(np.array([3, 3, 3, 4]), np.array([5, 5, 9, 1]), np.array([5.0, 1.0, 4.0, 2.0]))
    c = h.counters(np.array([3, 3, 3, 4, 7]), np.array([5, 6, 10, 1, 100]))
    assert c["item_prior_events"].tolist() == [0, 2, 3, 0, 0]
    np.testing.assert_allclose(c["item_prior_rating"], [np.nan, 3.0, 10 / 3, np.nan, np.nan])


@pytest.mark.parametrize("name", ["deepfm", "din"])
def test_rank_candidates_matches_a_row_by_row_reference(name, tmp_path):
    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    rows = _export(cfg)
    spec = get_model(name)
    config = spec.make_config({"embedding_dim": "8", "dense_features": ",".join(DENSE), "init_range": "0.5"})
    torch.manual_seed(0)
    model = spec.build(synthetic_vocab_sizes(), config).eval()
    save_model(tmp_path / name, spec, config, model.state_dict(), model_version=f"{name}-1", options={},
               vocab_sizes=synthetic_vocab_sizes(), sharding_plan={}, metrics={}, training_versions={})
    loaded = load_model(tmp_path / name)
    cases = [r for r in rows if r["event_id"] in ("e1-5", "e3-2", "e4-4")]
    feats = read_case_features(cfg, np.array([r["event_id"] for r in cases]))
    cands = np.array([[2, 7, 11, 20, 33], [9, 2, 14, -1, -1], [1, 38, 6, 27, 12]])
    ranked = rank_candidates(loaded, feats, cands, RankingParams(candidates=5, k=3, batch_cases=2))
    genres = {r["item_idx"]: r["genre_idx"] for r in rows}
    for case, cand, got in zip(cases, cands, ranked):
        scored = []
        for c in cand[cand > 0].tolist():
            earlier = [r["rating"] for r in rows if r["item_idx"] == c and r["sec"] < case["sec"]]
            row = {k: case[k] for k in ("user_idx", "age_idx", "gender_idx", "occupation_idx", "zip_idx",
                                        "hist_item_idx", "hist_rating")} | {"item_idx": c,
                                                                             "genre_idx": genres.get(c, [])}
            dense = dense_inputs({"user_prior_events": [case["user_prior_events"]],
                                  "user_prior_rating": [case["user_prior_rating"]],
                                  "item_prior_events": [len(earlier) or None],
                                  "item_prior_rating": [sum(earlier) / len(earlier) if earlier else None]})
            with torch.no_grad():
                logit = float(model(kjt_of_rows([row], spec.features_of(config)), torch.from_numpy(dense))[0])
            scored.append((c, logit))
        want = [c for c, _ in sorted(scored, key=lambda x: (-x[1], x[0]))][:3]
        assert got.tolist() == want + [-1] * (3 - len(want))
