"""serving.replay on hand-made logs whose HR@K / NDCG@K are computed by hand, and the strict time order of the
popularity baseline."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import PlatformConfig
from features.results import read_stage_result
from serving.ann import HnswParams
from serving.export import run_export
from serving.replay import (Cases, Log, ReplayParams, build_cases, first_k_allowed, popularity_recs,
                            run_replay)


def _cases(times, targets, hists) -> Cases:
    width = max([len(h) for h in hists] + [1])
    hist = np.array([[-1] * (width - len(h)) + list(h) for h in hists], dtype=np.int64)
    return Cases(event_id=np.array([f"e{i}" for i in range(len(times))], dtype=object),
                 event_time=np.array(times, dtype=np.int64), target=np.array(targets, dtype=np.int64),
                 hist=hist, hist_len=np.array([len(h) for h in hists], dtype=np.int64))


def test_popularity_counts_only_strictly_earlier_events():
    # item 1 once at t=1; item 2 three times at t=5; item 3 twice at t=9 (after every case)
    log_ = Log(event_time=np.array([5, 1, 5, 9, 5, 9]), item_idx=np.array([2, 1, 2, 3, 2, 3]))
    cases = _cases(times=[1, 5, 6], targets=[1, 2, 2], hists=[[], [], [1]])
    recs = popularity_recs(cases, log_, k=3, n_items=4)
    # t=1: nothing before (the t=1 event itself does not count): all zero, ties by item_idx
    # t=5: only item 1 (t=1); the three t=5 events are not strictly earlier
    # t=6: item 2 (3) > item 1 (1) > item 3 (0); item 1 is in the history and removed
    assert recs.tolist() == [[1, 2, 3], [1, 2, 3], [2, 3, -1]]


def test_first_k_allowed_removes_history_zero_and_padding():
    cands = np.array([[0, 4, 7, 5, 6], [3, -1, -1, -1, -1]])
    banned = np.array([[-1, 7, 4], [-1, -1, -1]])
    assert first_k_allowed(cands, banned, k=2).tolist() == [[5, 6], [3, -1]]


def test_build_cases_orders_by_time_then_event_id():
    t = pa.table({"event_id": ["b", "a", "c", "d"], "user_idx": [1, 2, 3, 4], "item_idx": [5, 6, 7, 8],
                  "label": [1, 1, 0, 1], "event_time": pa.array([20, 20, 10, 30], pa.timestamp("s", tz="UTC")),
                  "hist_item_idx": pa.array([[1, 2], None, [3], []], pa.list_(pa.int32()))})
    c = build_cases(t)
    assert c.event_id.tolist() == ["a", "b", "d"]                    # c is negative
    assert c.event_time.tolist() == [20_000_000, 20_000_000, 30_000_000]   # microseconds
    assert c.hist.tolist() == [[-1, -1], [1, 2], [-1, -1]] and c.hist_len.tolist() == [0, 2, 0]


# ---------------------------------------------------------------------------------------------------- end to end
def _ts(t: int) -> datetime:
    return datetime(2024, 1, 1, tzinfo=timezone.utc).replace(second=t)


# (event_id, user_idx, item_idx, rating, t seconds, split, hist_item_idx)
EVENTS = [
    ("e01", 1, 1, 5, 1, "train", []),
    ("e02", 2, 3, 5, 2, "train", []),
    ("e03", 3, 3, 2, 3, "valid", []),
    ("e04", 2, 5, 4, 4, "valid", [3]),
    # test period: case A (user 1), case B (user 2) at the same second, a negative, case C (cold user 4)
    ("e10", 2, 4, 5, 10, "test", [3, 5]),
    ("e09", 1, 2, 4, 10, "test", [1]),
    ("e11", 5, 3, 1, 11, "test", []),
    ("e12", 4, 3, 5, 12, "test", []),
]

# item2vec: item 2 is item 1's nearest neighbour (case A hit at rank 0); for user 2 the query (items 3, 5) is
# nearest to item 2 then item 1, so item 4 is missed (case B).
ITEM2VEC = np.array([[0, 0], [1, 0], [0.95, 0.31], [0, 1], [-1, 0], [0.7, 0.7]], dtype=np.float32)
# deepfm: item 1 ~ items 3 and 5, so case A returns [3, 5] (miss); for user 2 the query (0, 1) gives
# item 1 (0.995) then item 4 (0.8): case B hit at rank 1.
DEEPFM = np.array([[0, 0], [0.1, 0.995], [-1, 0], [0, 1], [0.6, 0.8], [0.01, 1]], dtype=np.float32)


def _write_lake(cfg: PlatformConfig) -> None:
    root = cfg.lake_dir / "export"
    for split in ("train", "valid", "test"):
        rows = [e for e in EVENTS if e[5] == split]
        d = root / "ctr_samples" / f"split={split}"
        d.mkdir(parents=True)
        pq.write_table(pa.table({                                    # Spark's layout: no split column in files
            "event_id": [e[0] for e in rows], "user_id": [100 + e[1] for e in rows],
            "item_id": [1000 + e[2] for e in rows], "rating": pa.array([e[3] for e in rows], pa.float32()),
            "label": pa.array([int(e[3] >= 4) for e in rows], pa.int32()),
            "event_time": pa.array([_ts(e[4]) for e in rows], pa.timestamp("us", tz="UTC")),
            "user_idx": pa.array([e[1] for e in rows], pa.int32()),
            "item_idx": pa.array([e[2] for e in rows], pa.int32()),
            "hist_item_idx": pa.array([e[6] for e in rows], pa.list_(pa.int32())),
        }), d / "part-00000.parquet")
    (root / "item_vocab").mkdir(parents=True)
    pq.write_table(pa.table({"item_id": pa.array([1001, 1002, 1003, 1004, 1005], pa.int32()),
                             "item_idx": pa.array([1, 2, 3, 4, 5], pa.int32())}),
                   root / "item_vocab" / "part-00000.parquet")


def _write_model(cfg: PlatformConfig, name: str, table: np.ndarray) -> None:
    d = cfg.run_dir / "models" / name
    d.mkdir(parents=True)
    np.save(d / "item_embeddings.npy", table)
    (d / "meta.json").write_text(json.dumps({"model_version": f"{name}-1"}))


def test_replay_hand_computed(tmp_path, caplog):
    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    _write_lake(cfg)
    _write_model(cfg, "item2vec", ITEM2VEC)
    _write_model(cfg, "deepfm", DEEPFM)
    run_export(cfg, HnswParams(m=4, ef_construction=32, ef_search=32))

    result = run_replay(cfg, ReplayParams(k=2, n_recent=10))
    assert read_stage_result(cfg, "evaluate")["retrieval"] == json.loads(json.dumps(result["retrieval"]))
    assert (result["cases"], result["cold_start_cases"]) == (3, 1)
    r = result["retrieval"]
    # popularity, k=2. Before t=10: item 3 x2, items 1 and 5 x1 -> [3, 1, 5, 2, 4]
    #   A (hist [1], target 2): [3, 5] miss;  B (hist [3, 5], target 4): [1, 2] miss
    #   C at t=12 counts e09, e10, e11 too: item 3 x3, items 1, 2, 4, 5 x1 -> [3, 1]: hit at rank 0
    assert r["popularity"]["hr@2"] == pytest.approx(1 / 3)
    assert r["popularity"]["ndcg@2"] == pytest.approx(1 / 3)
    # item2vec: A hit rank 0, B miss, C falls back to popularity: hit rank 0
    assert r["item2vec"]["hr@2"] == pytest.approx(2 / 3)
    assert r["item2vec"]["ndcg@2"] == pytest.approx(2 / 3)
    assert r["item2vec"]["mrr@2"] == pytest.approx(2 / 3)
    # deepfm: A miss, B hit rank 1, C popularity hit rank 0
    assert r["deepfm"]["hr@2"] == pytest.approx(2 / 3)
    assert r["deepfm"]["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert r["deepfm"]["mrr@2"] == pytest.approx((1 / 2 + 1) / 3)
    for name in ("item2vec", "deepfm"):
        assert r[name]["cases"] == 3 and r[name]["fallback_cases"] == 1
        assert r[name]["model_version"] == f"{name}-1"
    assert result["evaluate_wall_s"] >= 0


def test_replay_skips_a_model_that_was_not_exported(tmp_path, caplog):
    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    _write_lake(cfg)
    _write_model(cfg, "item2vec", ITEM2VEC)
    run_export(cfg, HnswParams(m=4, ef_construction=32, ef_search=32))
    with caplog.at_level("WARNING"):
        result = run_replay(cfg, ReplayParams(k=2))
    assert set(result["retrieval"]) == {"popularity", "item2vec"}
    assert "deepfm" in caplog.text and "serving.export" in caplog.text
