"""evaluation.replay (and the evaluate stage, evaluation.evaluate) on hand-made logs whose HR@K / NDCG@K are
computed by hand, the strict time order of the popularity baseline, and the seen-item rule of evaluation.cases
(every item of the user's events strictly before the case in ``(event_time, event_id)`` order is never
recommended, by any policy), against a naive oracle and on a user whose excluded item lies beyond the 50 items of
``hist_item_idx``."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.cases import build_cases, build_log, first_k_allowed
from evaluation.evaluate import run_evaluation
from evaluation.replay import ReplayParams, item_matrix, policy_lists, popularity_recs
from features.config import PlatformConfig
from features.results import read_stage_result
from serving.ann import HnswParams, ItemIndex, l2_normalise
from serving.export import run_export

MAX_HISTORY = 50   # hist_item_idx's length in the export (features.definitions.MAX_HISTORY)


def _ts(t: int) -> datetime:
    return datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=t)


def _split_table(rows) -> pa.Table:
    """rows: (event_id, user_idx, item_idx, rating, t seconds, split, hist_item_idx) -> the export's columns."""
    return pa.table({                                                # Spark's layout: no split column in files
        "event_id": pa.array([e[0] for e in rows], pa.string()),
        "user_id": pa.array([100 + e[1] for e in rows], pa.int32()),
        "item_id": pa.array([1000 + e[2] for e in rows], pa.int32()),
        "rating": pa.array([e[3] for e in rows], pa.float32()),
        "label": pa.array([int(e[3] >= 4) for e in rows], pa.int32()),
        "event_time": pa.array([_ts(e[4]) for e in rows], pa.timestamp("us", tz="UTC")),
        "user_idx": pa.array([e[1] for e in rows], pa.int32()),
        "item_idx": pa.array([e[2] for e in rows], pa.int32()),
        "hist_item_idx": pa.array([e[6] for e in rows], pa.list_(pa.int32())),
    })


def _inputs(events):
    """(cases, log) as run_evaluation builds them from the export holding ``events``."""
    tables = [_split_table([e for e in events if e[5] == split]) for split in ("train", "valid", "test")]
    log_ = build_log(tables)
    return build_cases(tables[2], log_), log_


def _with_history(events):
    """``events`` without hist_item_idx, given the pipeline's: the user's items at a strictly earlier second, in
    ``(event_time, event_id)`` order, the last ``MAX_HISTORY``."""
    out = []
    for e in events:
        earlier = sorted((x[4], x[0], x[2]) for x in events if x[1] == e[1] and x[4] < e[4])
        out.append((*e, [i for _, _, i in earlier][-MAX_HISTORY:]))
    return out


def test_popularity_counts_only_strictly_earlier_events():
    # item 1 once at t=1; item 2 three times at t=5 and once at t=6; item 3 twice at t=9 (after every case)
    events = [("a1", 1, 1, 5, 1, "test", []),
              ("b1", 2, 2, 5, 5, "test", []), ("b2", 3, 2, 1, 5, "train", []), ("b3", 4, 2, 1, 5, "train", []),
              ("c1", 1, 2, 5, 6, "test", [1]),
              ("d1", 5, 3, 1, 9, "train", []), ("d2", 6, 3, 1, 9, "train", [])]
    cases, log_ = _inputs(events)
    recs = popularity_recs(cases, log_, k=3, n_items=4)
    # t=1: nothing before (the t=1 event itself does not count): all zero, ties by item_idx
    # t=5: only item 1 (t=1); the three t=5 events are not strictly earlier
    # t=6: item 2 (3) > item 1 (1) > item 3 (0); user 1 rated item 1 at t=1, so it is removed
    assert recs.tolist() == [[1, 2, 3], [1, 2, 3], [2, 3, -1]]


def test_first_k_allowed_removes_seen_zero_and_padding():
    cands = np.array([[0, 4, 7, 5, 6], [3, -1, -1, -1, -1]])
    seen = np.zeros((2, 8), dtype=bool)
    seen[0, [7, 4]] = True
    assert first_k_allowed(cands, seen, k=2).tolist() == [[5, 6], [3, -1]]
    with pytest.raises(TypeError, match="bool mask"):               # a list of item_idx is not a mask
        first_k_allowed(cands, np.array([[-1, 7, 4], [-1, -1, -1]]), k=2)


def test_build_cases_orders_by_time_then_event_id():
    t = pa.table({"event_id": ["b", "a", "c", "d"], "user_idx": [1, 2, 3, 4], "item_idx": [5, 6, 7, 8],
                  "label": [1, 1, 0, 1], "event_time": pa.array([20, 20, 10, 30], pa.timestamp("s", tz="UTC")),
                  "hist_item_idx": pa.array([[1, 2], None, [3], []], pa.list_(pa.int32()))})
    c = build_cases(t, build_log([t]))
    assert c.event_id.tolist() == ["a", "b", "d"]                    # c is negative
    assert c.event_time.tolist() == [20_000_000, 20_000_000, 30_000_000]   # microseconds
    assert c.hist.tolist() == [[-1, -1], [1, 2], [-1, -1]] and c.hist_len.tolist() == [0, 2, 0]
    assert c.user.tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="test split included"):    # a log without the cases' own events
        build_cases(t, build_log([t.filter(pa.compute.equal(t.column("label"), 0))]))


# ---------------------------------------------------------------------------------------------------- seen items
def test_seen_items_match_a_naive_oracle():
    # 4 users, 6 items, times in 0..7 s so many events of a user share a second; event_ids shuffled so that
    # their order differs from the rows' order
    rng = np.random.default_rng(7)
    n = 120
    ids = [f"e{i:03d}" for i in rng.permutation(n)]
    events = [(ids[j], int(rng.integers(1, 5)), int(rng.integers(1, 7)), float(rng.choice([1, 5])),
               int(rng.integers(0, 8)), str(rng.choice(["train", "valid", "test"])), []) for j in range(n)]
    cases, log_ = _inputs(events)
    assert len(cases) > 10
    n_items = 7
    mask = cases.seen.mask(np.arange(len(cases)), n_items)
    for b in range(len(cases)):
        me = next(e for e in events if e[0] == cases.event_id[b])
        # the rule, written out: same user, any split, any rating, strictly smaller (event_time, event_id);
        # each item once, in order of its first event
        oracle = list(dict.fromkeys(e[2] for e in sorted(events, key=lambda e: (e[4], e[0]))
                                    if e[1] == me[1] and (e[4], e[0]) < (me[4], me[0])))
        assert cases.seen.of(b).tolist() == oracle
        assert mask[b].tolist() == [i in oracle for i in range(n_items)]


def test_same_second_events_are_seen_only_with_a_smaller_event_id():
    events = [("a", 1, 7, 5, 10, "train", []),     # same second as the case, smaller event_id: seen
              ("b", 1, 2, 5, 10, "test", []),      # the case
              ("c", 1, 8, 5, 10, "train", []),     # same second, larger event_id: not seen
              ("d", 1, 9, 5, 9, "valid", []),      # earlier second: seen, whatever its event_id
              ("e", 2, 5, 5, 1, "train", [])]      # another user: not seen
    cases, _ = _inputs(events)
    assert cases.event_id.tolist() == ["b"] and sorted(cases.seen.of(0).tolist()) == [7, 9]


# A heavy user (1): item 1 rated long ago (low stars, label 0), then 60 other items (10..69), so item 1 is outside
# the 50 items of hist_item_idx; the case (item 2) at t=100, then item 3 rated AFTER the case. Other users make
# popularity rank 1 > 3 > 2 > the rest before t=100; the embeddings (_heavy_vectors) rank 1 > 10..69 > 3 > 2 by
# cosine to the query. Every policy must give [3, 2]: item 1 excluded although it is not in hist_item_idx, item 3
# kept although the user rates it later.
HEAVY = _with_history(
    [("a00", 1, 1, 1, 0, "train")]
    + [(f"f{j:02d}", 1, 10 + j, 5, 1 + j, "train") for j in range(60)]
    + [(f"p{u}1", u, 1, 5, 70 + u, "train") for u in range(2, 8)]        # item 1: 6 + 1 = 7 interactions
    + [(f"p{u}3", u, 3, 5, 80 + u, "valid") for u in range(2, 6)]        # item 3: 4
    + [(f"p{u}2", u, 2, 5, 90 + u, "valid") for u in range(2, 5)]        # item 2: 3; fillers: 1 each
    + [("t01", 1, 2, 5, 100, "test"), ("t02", 1, 3, 1, 110, "test")])


def _heavy_vectors() -> np.ndarray:
    """(70, 3) embeddings by item_idx. Cosine to the heavy user's query (the mean of items 60..69): 1 for item 1 (it
    is that mean), about 0.997 for the fillers 10..69 (each a little apart, so no two items tie), 0.89 for item 3,
    0.81 for item 2. The 61 excluded items are the 61 nearest, so the ANN index must be asked for all of them."""
    v = np.zeros((70, 3), dtype=np.float32)
    for i in range(10, 70):
        v[i] = [1, 0.05 if i % 2 == 0 else -0.05, 0.001 * (i - 10)]
    v[1] = l2_normalise(l2_normalise(v[60:70]).mean(axis=0, keepdims=True))[0]
    v[3], v[2] = [1, 0.5, 0], [1, 0, 0.8]
    return v


def test_heavy_user_never_gets_an_item_rated_long_ago():
    cases, log_ = _inputs(HEAVY)
    assert cases.event_id.tolist() == ["t01"]
    hist = cases.hist[0][cases.hist[0] >= 0]
    assert hist.size == MAX_HISTORY and 1 not in hist        # the excluded item lies beyond hist_item_idx
    assert sorted(cases.seen.of(0).tolist()) == [1, *range(10, 70)]
    ids = np.array([1, 2, 3, *range(10, 70)])
    vectors = _heavy_vectors()
    index = ItemIndex.build(vectors[ids], ids, HnswParams(m=8, ef_construction=64, ef_search=64))
    models = {"item2vec": (index, item_matrix(ids, vectors[ids]), "v1")}
    lists = policy_lists(cases, log_, models, ReplayParams(k=2, n_recent=10))
    # old rule (hist only): [1, 3] for popularity, [1, 10] for item2vec; excluding the later item too: [2, ...];
    # an ANN fetch of K + 50 + 1 (the history's length) would leave item2vec only excluded items: [-1, -1]
    assert {m: r.tolist() for m, r in lists.items()} == {"popularity": [[3, 2]], "item2vec": [[3, 2]]}


def test_batches_give_the_same_lists():
    cases, log_ = _inputs(HEAVY + [("t03", 2, 3, 5, 120, "test", [1, 3, 2])])     # a second case, user 2
    ids = np.array([1, 2, 3, *range(10, 70)])
    vectors = _heavy_vectors()
    index = ItemIndex.build(vectors[ids], ids, HnswParams(m=8, ef_construction=64, ef_search=64))
    models = {"item2vec": (index, item_matrix(ids, vectors[ids]), "v1")}
    one = policy_lists(cases, log_, models, ReplayParams(k=3, n_recent=10, batch=1))
    two = policy_lists(cases, log_, models, ReplayParams(k=3, n_recent=10, batch=2))
    assert {m: r.tolist() for m, r in one.items()} == {m: r.tolist() for m, r in two.items()}
    # user 2 rated 1 (t=72), 3 (t=82), 2 (t=92) before t=120: popularity skips them all
    assert one["popularity"][1].tolist() == [10, 11, 12]


# ---------------------------------------------------------------------------------------------------- end to end
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


def _write_lake(cfg: PlatformConfig, events=EVENTS) -> None:
    root = cfg.lake_dir / "export"
    for split in ("train", "valid", "test"):
        d = root / "ctr_samples" / f"split={split}"
        d.mkdir(parents=True)
        pq.write_table(_split_table([e for e in events if e[5] == split]), d / "part-00000.parquet")
    (root / "item_vocab").mkdir(parents=True)
    items = sorted({e[2] for e in events})
    pq.write_table(pa.table({"item_id": pa.array([1000 + i for i in items], pa.int32()),
                             "item_idx": pa.array(items, pa.int32())}),
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

    result = run_evaluation(cfg, ReplayParams(k=2, n_recent=10))
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
        result = run_evaluation(cfg, ReplayParams(k=2))
    assert set(result["retrieval"]) == {"popularity", "item2vec"}
    assert "deepfm" in caplog.text and "serving.export" in caplog.text


def test_replay_excludes_every_earlier_item_end_to_end(tmp_path):
    # HEAVY through the stage: both policies list [3, 2], a hit at rank 1 (the hist-only rule gave [1, 3], a miss;
    # excluding the later item 3 too would give a hit at rank 0)
    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    _write_lake(cfg, HEAVY)
    _write_model(cfg, "item2vec", _heavy_vectors())
    run_export(cfg, HnswParams(m=8, ef_construction=64, ef_search=64))
    r = run_evaluation(cfg, ReplayParams(k=2, n_recent=10), models=("item2vec",))["retrieval"]
    for name in ("popularity", "item2vec"):
        assert (r[name]["cases"], r[name]["hr@2"]) == (1, 1.0)
        assert r[name]["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert r["item2vec"]["fallback_cases"] == 0
