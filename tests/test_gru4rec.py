"""GRU4Rec and the ``sequence`` task: sessions cut at the gap by hand (positives only, replay order, every event),
the session-parallel layout by hand, the two losses by hand, the query encoder's order equal to the model's own
scores after the same items, and -- over 2 gloo ranks with the table sharded by DistributedModelParallel -- every
training step's loss equal to a naive one (each lane's GRU run from the zero state over its session so far, on an
unsharded copy of the weights: the state is carried within a session and reset between) and the validation figures
equal to a brute-force scoring of every case."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.models.gru4rec import ITEM_TABLE, GRU4Rec, GRU4RecConfig
from training.modules.session_gru import bpr_max_loss, items_kjt, sampled_softmax_loss, session_loss
from training.registry import ModelOptionError, get_model
from training.tasks.sequence import cut_sessions, read_events, session_parallel

N_ITEMS = 16  # item rows, OOV row 0 included
SMALL = GRU4RecConfig(embedding_dim=8, hidden_size=6, num_negatives=3, max_history=4, init_range=0.5)
MINUTE = 60_000_000  # event_time unit below: microseconds


def _write_lake(lake: Path, rows: list[tuple]) -> None:
    """``export/ctr_samples/split=<s>/part.parquet`` from rows (event_id, user, item, minute, label, split)."""
    for split in ("train", "valid", "test"):
        mine = [r for r in rows if r[5] == split]
        folder = lake / "export" / "ctr_samples" / f"split={split}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "event_id": pa.array([r[0] for r in mine], pa.string()),
            "user_idx": pa.array([r[1] for r in mine], pa.int32()),
            "item_idx": pa.array([r[2] for r in mine], pa.int32()),
            "event_time": pa.array([r[3] * MINUTE for r in mine], pa.timestamp("us")),
            "label": pa.array([r[4] for r in mine], pa.int32()),
        }), folder / "part.parquet")


def test_sessions_are_cut_where_the_gap_exceeds_the_threshold(tmp_path):
    """User 1's positives at minutes 0, 10, 40 (a gap of exactly 30 stays in the session), 71 (31 after: a new
    one); its label-0 event at minute 50 is dropped with the default. User 2's two events at the same minute are in
    event_id order (a, b), not file order. With every event, minute 50 bridges user 1's gap: one session."""
    rows = [("e1", 1, 11, 0, 1, "train"), ("e2", 1, 12, 10, 1, "train"), ("e4", 1, 9, 50, 0, "train"),
            ("e5", 1, 14, 71, 1, "train"), ("e3", 1, 13, 40, 1, "train"),
            ("b", 2, 6, 5, 1, "train"), ("a", 2, 5, 5, 1, "train"),
            ("v", 1, 3, 80, 1, "valid"), ("t", 2, 4, 90, 1, "test")]
    _write_lake(tmp_path, rows)
    events = read_events(tmp_path)
    train = events.split == 0
    assert events.item[train].tolist() == [11, 12, 13, 14, 5, 6]
    assert events.item.tolist() == [11, 12, 13, 14, 3, 5, 6, 4]  # each user's events in replay order, any split
    starts, lengths = cut_sessions(events.user[train], events.time[train], gap_s=30 * 60)
    sessions = [events.item[train][s:s + n].tolist() for s, n in zip(starts, lengths)]
    assert sessions == [[11, 12, 13], [14], [5, 6]]
    every = read_events(tmp_path, all_events=True)
    starts, lengths = cut_sessions(every.user[every.split == 0], every.time[every.split == 0], gap_s=30 * 60)
    assert [every.item[every.split == 0][s:s + n].tolist() for s, n in zip(starts, lengths)] == \
        [[11, 12, 13, 9, 14], [5, 6]]


def test_session_parallel_layout_by_hand():
    """Sessions of 4, 2, 3, 2 events on 2 lanes: each session goes to the lane that frees first (lane 0 on a
    tie), one step per event but its last; the lane's state resets where a session starts."""
    s = session_parallel(np.array([0, 4, 6, 9]), np.array([4, 2, 3, 2]), lanes=2, min_steps=5)
    assert s.current.tolist() == [[0, 4], [1, 6], [2, 7], [9, -1], [-1, -1]]
    assert s.reset.astype(int).tolist() == [[1, 1], [0, 1], [0, 0], [1, 0], [0, 0]]


def test_losses_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, 3.0], [0.5, 9.0, 9.0, 9.0]])  # column 0 the target
    mask = torch.tensor([[True, True, False], [False, False, False]])  # row 0: the 3.0 left out; row 1: no negative
    weight = torch.tensor([1.0, 1.0])
    want_softmax = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(0)))  # row 1: -log 1 = 0
    assert float(sampled_softmax_loss(logits, mask, weight)) == pytest.approx(want_softmax / 2, rel=1e-6)
    s1, s0 = math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)  # softmax over the negatives 1.0, 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want_bpr = -math.log(s1 * sig(2 - 1) + s0 * sig(2 - 0)) + 0.5 * (s1 * 1.0 + s0 * 0.0)
    assert float(bpr_max_loss(logits, mask, weight, reg=0.5)) == pytest.approx(want_bpr / 2, rel=1e-6)
    assert float(session_loss("bpr_max", logits, mask, torch.tensor([1.0, 0.0]), 0.5)) == \
        pytest.approx(want_bpr, rel=1e-6)
    for kind in ("softmax", "bpr_max"):  # a row without a negative gives finite, zero gradients
        x = logits.clone().requires_grad_()
        session_loss(kind, x, mask, weight).backward()
        assert torch.isfinite(x.grad).all() and not x.grad[1].any() and x.grad[0, 3] == 0
    with pytest.raises(ValueError, match="loss must be one of"):
        session_loss("bpr", logits, mask, weight)


def test_config_and_spec():
    spec = get_model("gru4rec")
    assert spec.kind == "retriever" and spec.task == "sequence" and spec.query_encoder and spec.item_vectors
    with pytest.raises(ModelOptionError, match="loss must be one of"):
        spec.make_config({"loss": "bpr"})
    with pytest.raises(ModelOptionError, match="session_gap_minutes"):
        spec.make_config({"session_gap_minutes": "0"})
    assert spec.make_config({"all_events": "true", "loss": "bpr_max"}).all_events
    from training.trainer import TrainOptions

    with pytest.raises(ValueError, match="mba_lambda"):  # the sequence task reads none of the CTR levers
        TrainOptions(model="gru4rec", mba_lambda=0.1)


def _steps_scores(model: GRU4Rec, history: list[int]) -> np.ndarray:
    """(R,) the model's scores of every item as the next one, by its training forward stepped over ``history``."""
    hidden = torch.zeros(1, model.config.hidden_size)
    with torch.no_grad():
        for item in history:
            logits, hidden = model(items_kjt(torch.tensor([item, *range(N_ITEMS)])), hidden)  # (1, R)
    return logits[0].numpy()


def test_query_encoder_ranks_items_as_the_model_scores_them():
    """The query after a history (cosine over the MIPS item vectors) orders the items as the model's own forward,
    stepped over the same items, scores them; a history with no item of the table has no query."""
    spec = get_model("gru4rec")
    torch.manual_seed(3)
    model = GRU4Rec(N_ITEMS, SMALL).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    vectors = spec.item_vectors(state, SMALL)  # (R, D + 1)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), np.linalg.norm(vectors, axis=1).max(), rtol=1e-5)
    histories = [np.array([3, 5, 7]), np.array([2]), np.array([], np.int64), np.array([0, 99]),
                 np.array([1, 2, 3, 4, 5, 6, 9])]  # the last: only its max_history = 4 most recent items count
    queries, ok = spec.query_encoder(state, SMALL).encode(np.arange(len(histories)), histories)
    assert ok.tolist() == [True, True, False, False, True] and queries.shape == (5, SMALL.embedding_dim + 1)
    for b, history in enumerate([[3, 5, 7], [2], None, None, [4, 5, 6, 9]]):
        if history is None:
            continue
        scores = _steps_scores(model, history)
        np.testing.assert_allclose(vectors @ queries[b], scores, rtol=1e-4, atol=1e-5)
        cosine = vectors @ queries[b] / np.linalg.norm(vectors, axis=1) / np.linalg.norm(queries[b])
        assert np.argsort(-cosine, kind="stable")[:10].tolist() == np.argsort(-scores, kind="stable")[:10].tolist()
    torch.testing.assert_close(torch.from_numpy(vectors[:, :-1]), state[ITEM_TABLE])


# -------------------------------------------------------------- the task over 2 gloo ranks, sharded by DMP
def _tiny_rows() -> list[tuple]:
    """6 users x 9 events over 15 items, gaps of 1 to 120 minutes, ~70% positive; split by global (time, id) order
    80/10/10; event ids shuffled so that they do not follow time."""
    rng = np.random.default_rng(7)
    raw = []
    for user in range(1, 7):
        minute = int(rng.integers(0, 30))
        for _ in range(9):
            minute += int(rng.choice([1, 5, 10, 45, 120]))
            raw.append((user, int(rng.integers(1, N_ITEMS)), minute, int(rng.random() < 0.7)))
    ids = rng.permutation(len(raw))
    order = sorted(range(len(raw)), key=lambda i: (raw[i][2], f"e{ids[i]:03d}"))
    split = {i: "train" if k < 0.8 * len(raw) else "valid" if k < 0.9 * len(raw) else "test"
             for k, i in enumerate(order)}
    return [(f"e{ids[i]:03d}", *raw[i], split[i]) for i in range(len(raw))]


def _naive_figures(rows: list[tuple], split: str, model: GRU4Rec, max_history: int) -> dict:
    """Recall@20, MRR@20, HR@10 over ``split``'s positive events, each scored from its user's earlier positives."""
    pos = sorted((r for r in rows if r[4] == 1), key=lambda r: (r[1], r[3], r[0]))
    table = model.state_dict()[ITEM_TABLE]
    hits10 = hits20 = rr = n = 0
    for r in pos:
        if r[5] != split:
            continue
        history = [p[2] for p in pos if p[1] == r[1] and (p[3], p[0]) < (r[3], r[0])][-max_history:]
        with torch.no_grad():
            query = model.encode(items_kjt(torch.tensor(history, dtype=torch.int64), torch.tensor([len(history)])))
        scores = (query @ table.t())[0]
        scores[0] = float("-inf")
        rank = int((scores >= scores[r[2]]).sum())
        hits10, hits20, rr, n = hits10 + (rank <= 10), hits20 + (rank <= 20), rr + (rank <= 20) / rank, n + 1
    return {"recall@20": hits20 / n, "mrr@20": rr / n, "hr@10": hits10 / n, "cases": n}


def _task_worker(rank: int, port: int, lake: str, done_dir: str) -> None:
    import torch.distributed as dist

    from _spawn import mark_done
    from training.distributed import ShardingConfig, load_full_state_dict, plan_sharding, shard_model
    from training.tasks import TaskContext
    from training.tasks.sequence import SequenceTask
    from training.trainer import TrainOptions

    world, lanes = 2, 2
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = get_model("gru4rec")
    opts = TrainOptions(model="gru4rec", epochs=2, batch_size=world * lanes)
    task = SequenceTask(TaskContext(spec, SMALL, opts, lake, {"item": N_ITEMS}, rank, world, torch.device("cpu"),
                                    lanes))
    torch.manual_seed(0)
    reference = GRU4Rec(N_ITEMS, SMALL).eval()
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    sharded = GRU4Rec(N_ITEMS, SMALL, sparse_device=torch.device("meta"))
    dmp = shard_model(sharded, plan_sharding(sharded, world, ShardingConfig()))
    load_full_state_dict(dmp, full)
    schedule, items, table = task._schedule(0, task.steps_per_epoch), task.train_items, full[ITEM_TABLE]
    steps = 0
    with torch.no_grad():
        for t, batch in enumerate(task.batches(0)):
            loss = task.loss(dmp, batch)
            kjt, _, mask, weight = batch
            columns = kjt.values()[lanes:]  # (B + K,) the lanes' targets, then the negatives
            rows = []
            for b in range(lanes):
                cur = int(schedule.current[t, b])
                if cur < 0:
                    rows.append(torch.zeros(1, SMALL.embedding_dim))
                    continue
                assert int(columns[b]) == items[cur + 1]  # the target is the session's next item
                start = max(s for s in range(t + 1) if schedule.reset[s, b])
                prefix = torch.from_numpy(items[int(schedule.current[start, b]):cur + 1])  # the session so far
                rows.append(reference.encode(items_kjt(prefix, torch.tensor([len(prefix)]))))
            logits = torch.cat(rows) @ table[columns].t()  # (B, B + K)
            want = session_loss(SMALL.loss, torch.cat([logits.diagonal()[:, None], logits], 1), mask, weight)
            assert float(loss) == pytest.approx(float(want), rel=1e-4, abs=1e-6), t
            steps += 1
    assert steps == task.steps_per_epoch
    pairs = np.concatenate([np.arange(s, s + n - 1) for s, n in zip(task.starts, task.lengths)])
    assert sorted(schedule.current[schedule.current >= 0].tolist()) == sorted(pairs.tolist())  # each pair once
    assert schedule.reset.sum() == len(task.starts) >= 2  # several sessions per rank: lanes are reused
    got = task.evaluate(dmp, "valid")
    want = _naive_figures(_tiny_rows(), "valid", reference, SMALL.max_history)
    assert got["cases"] == want["cases"] > 0
    for key in ("recall@20", "mrr@20", "hr@10"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration  # two gloo processes, as tests/test_sharded_models.py
def test_sequence_task_through_dmp_matches_a_naive_session_run(tmp_path):
    from _spawn import free_port, spawn_checked

    rows = _tiny_rows()
    assert {r[5] for r in rows} == {"train", "valid", "test"}
    _write_lake(tmp_path / "lake", [(i, u, it, m, lab, s) for i, u, it, m, lab, s in rows])
    done = tmp_path / "done"
    done.mkdir()
    spawn_checked(_task_worker, (free_port(), str(tmp_path / "lake")), 2, done)
