"""The leaderboard's statistics (``bench.leaderboard_stats``) against hand-computed values and a naive bootstrap, and
the per-row predictions that feed them: ours (``training.tasks.ctr``, off by default) and the peers'
(``bench/peers.py``) have the same columns and keys for the same test rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked
from bench import peers
from bench.leaderboard_stats import (METRICS, PredictionsMismatchError, metric_value, paired_bootstrap,
                                     read_predictions, seed_summary, verdict)
from training.artifacts import PREDICTION_COLUMNS, ModelLayout
from training.data import read_ctr_shard, synthetic_vocab_sizes
from training.metrics import auc, gauc, logloss
from training.artifacts import write_predictions
from training.tasks.ctr import read_event_ids


def _preds(user, label, score, key: str = "event_id") -> dict[str, np.ndarray]:
    n = len(label)
    keys = {"event_id": np.array([f"e{i:05d}" for i in range(n)])} if key == "event_id" else {}
    return {"row": np.arange(n), **keys, "user": np.asarray(user), "label": np.asarray(label, float),
            "score": np.asarray(score, float)}


def _synthetic(n_users: int = 150, per_user: int = 8, seed: int = 0):
    """(user, label) of ``n_users`` x ``per_user`` rows, labels drawn with a per-user click rate."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(100, 100 + n_users), per_user)
    rate = rng.uniform(0.2, 0.8, n_users)
    label = (rng.uniform(size=len(user)) < np.repeat(rate, per_user)).astype(float)
    return user, label, rng


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_of_a_tiny_hand_made_case():
    user = [1, 1, 2, 2, 2, 3]
    label = [0, 1, 0, 1, 1, 1]
    score = [0.2, 0.9, 0.5, 0.4, 0.6, 0.1]
    p = _preds(user, label, score)
    # AUC: positives 0.9, 0.4, 0.6, 0.1 against negatives 0.2, 0.5: 2 + 1 + 2 + 0 of 8 pairs
    assert metric_value(p, "auc") == pytest.approx(5 / 8)
    # GAUC: user 1 AUC 1 (2 rows), user 2 AUC 1/2 (3 rows), user 3 one class only (skipped)
    assert metric_value(p, "gauc") == pytest.approx((2 * 1.0 + 3 * 0.5) / 5)
    expected_ll = -np.mean(np.log([0.8, 0.9, 0.5, 0.4, 0.6, 0.1]))
    assert metric_value(p, "logloss") == pytest.approx(expected_ll)
    ties = _preds([1, 1, 2, 2], [0, 1, 1, 0], [0.5, 0.5, 0.3, 0.3])  # every pair tied: 1/2
    assert metric_value(ties, "auc") == 0.5 and metric_value(ties, "gauc") == 0.5
    user, label, rng = _synthetic()
    score = np.round(rng.uniform(size=len(label)), 2)  # many ties
    p = _preds(user, label, score)
    assert metric_value(p, "auc") == pytest.approx(auc(label, score), abs=1e-12)
    assert metric_value(p, "gauc") == pytest.approx(gauc(user, label, score), abs=1e-12)
    assert metric_value(p, "logloss") == pytest.approx(logloss(label, score), abs=1e-12)
    with pytest.raises(ValueError, match="undefined"):
        metric_value(_preds([1, 2], [1, 1], [0.3, 0.4]), "auc")


def _naive_bootstrap(a, b, metric: str, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """The oracle: per draw, the users drawn (as ``paired_bootstrap`` draws them) copied row by row, each copy a
    user of its own, and both models scored by ``training.metrics`` on that data."""
    fn = {"auc": lambda u, y, s: auc(y, s), "gauc": gauc, "logloss": lambda u, y, s: logloss(y, s)}[metric]
    users, inverse = np.unique(a["user"], return_inverse=True)
    rows_of = [np.flatnonzero(inverse == k) for k in range(len(users))]
    draws = np.random.default_rng(seed).integers(0, len(users), size=(n_boot, len(users)))
    diffs = []
    for d in draws:
        rows = np.concatenate([rows_of[k] for k in d])
        copy = np.concatenate([np.full(len(rows_of[k]), j) for j, k in enumerate(d)])  # a drawn copy = a user
        y = a["label"][rows]
        diffs.append(fn(copy, y, a["score"][rows]) - fn(copy, y, b["score"][rows]))
    return tuple(np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)]))


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_the_bootstrap_is_the_naive_cluster_bootstrap(metric):
    user, label, rng = _synthetic(n_users=40, per_user=6)
    a = _preds(user, label, np.clip(0.5 + 0.2 * (label - 0.5) + rng.normal(0, 0.2, len(label)), 0.01, 0.99))
    b = _preds(user, label, np.round(rng.uniform(0.05, 0.95, len(label)), 1))  # with ties
    r = paired_bootstrap(a, b, metric, n_boot=200, seed=3)
    low, high = _naive_bootstrap(a, b, metric, 200, 3)
    assert (r["low"], r["high"]) == pytest.approx((low, high), abs=1e-12)
    assert r["diff"] == pytest.approx(metric_value(a, metric) - metric_value(b, metric), abs=1e-12)
    assert r["n_clusters"] == 40 and r["n_rows"] == 240 and r["key"] == "event_id"


def test_a_model_against_itself_is_level_at_zero():
    user, label, rng = _synthetic()
    p = _preds(user, label, rng.uniform(0.05, 0.95, len(label)))
    for metric, higher in METRICS.items():
        r = paired_bootstrap(p, p, metric, n_boot=300)
        assert (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
        assert verdict(r["low"], r["high"], higher) == "level"


def test_a_clearly_better_model_is_above_and_the_reverse_below():
    user, label, rng = _synthetic(n_users=300, per_user=10)
    good = _preds(user, label, np.clip(0.25 + 0.5 * label + rng.normal(0, 0.05, len(label)), 0.01, 0.99))
    noise = _preds(user, label, rng.uniform(0.01, 0.99, len(label)))
    for metric, higher in METRICS.items():
        r = paired_bootstrap(good, noise, metric, n_boot=300)
        assert r["low"] <= r["diff"] <= r["high"]
        assert verdict(r["low"], r["high"], higher) == "above", (metric, r)
        back = paired_bootstrap(noise, good, metric, n_boot=300)
        assert verdict(back["low"], back["high"], higher) == "below", (metric, back)
        assert back["diff"] == pytest.approx(-r["diff"])


def test_users_are_resampled_whole():
    """Every row of a user has the user's score: the rows of a user are one observation, not several. With whole
    users drawn, repeating each user's rows k times changes nothing (the same users are drawn, each weighing k times
    as much); rows drawn independently ignore the clustering, and their interval narrows as rows are repeated, below
    the users' one."""
    user, label, rng = _synthetic(n_users=120, per_user=6)
    _, inverse = np.unique(user, return_inverse=True)
    per_user = rng.uniform(0.05, 0.95, (2, inverse.max() + 1))
    a = _preds(user, label, per_user[0][inverse])  # (N,) the user's score on each of its rows
    b = _preds(user, label, per_user[1][inverse])
    k = 4
    rep = {c: np.repeat(v, k) for c, v in a.items() if c != "event_id"}
    rep["row"] = np.arange(len(rep["user"]))
    a_k, b_k = rep, {**rep, "score": np.repeat(b["score"], k)}
    for metric in ("auc", "logloss"):
        once = paired_bootstrap(a, b, metric, n_boot=300, seed=1)
        repeated = paired_bootstrap(a_k, b_k, metric, n_boot=300, seed=1)
        assert repeated["key"] == "row"
        assert (repeated["low"], repeated["high"]) == pytest.approx((once["low"], once["high"]), abs=1e-12)
        rows = paired_bootstrap(a, b, metric, n_boot=300, seed=1, cluster="row")
        rows_k = paired_bootstrap(a_k, b_k, metric, n_boot=300, seed=1, cluster="row")
        width = {name: r["high"] - r["low"] for name, r in (("user", once), ("row", rows), ("row_k", rows_k))}
        assert width["row_k"] < 0.7 * width["row"] and width["row_k"] < 0.7 * width["user"], (metric, width)
    with pytest.raises(ValueError, match="whole users"):
        paired_bootstrap(a, b, "gauc", cluster="row")


def test_mismatched_rows_raise():
    user, label, rng = _synthetic(n_users=20, per_user=5)
    a = _preds(user, label, rng.uniform(size=len(label)))
    fewer = {c: v[1:] for c, v in a.items()}
    with pytest.raises(PredictionsMismatchError, match="different rows"):
        paired_bootstrap(a, fewer, "auc", n_boot=10)
    renamed = {**a, "event_id": np.array([f"x{i}" for i in range(len(label))])}
    with pytest.raises(PredictionsMismatchError, match="different rows"):
        paired_bootstrap(a, renamed, "auc", n_boot=10)
    repeated = {**a, "event_id": np.r_[a["event_id"][:-1], a["event_id"][:1]]}
    with pytest.raises(PredictionsMismatchError, match="repeats"):
        paired_bootstrap(a, repeated, "auc", n_boot=10)
    flipped = {**a, "label": 1.0 - a["label"]}
    with pytest.raises(PredictionsMismatchError, match="user or label"):
        paired_bootstrap(a, flipped, "auc", n_boot=10)
    no_key = {c: v for c, v in a.items() if c not in ("event_id", "row")}
    with pytest.raises(ValueError, match="key"):
        paired_bootstrap(a, no_key, "auc", n_boot=10)
    # joined on event_id, whatever the row order: the same rows shuffled are the same predictions
    order = rng.permutation(len(label))
    shuffled = {c: v[order] for c, v in a.items()}
    assert paired_bootstrap(a, shuffled, "gauc", n_boot=50)["high"] == 0.0


def test_verdict_and_seed_summary():
    assert verdict(0.001, 0.01) == "above" and verdict(-0.01, -0.001) == "below" and verdict(-0.01, 0.0) == "level"
    assert verdict(0.001, 0.01, higher_is_better=False) == "below"
    assert verdict(-0.01, -0.001, higher_is_better=False) == "above"
    with pytest.raises(ValueError):
        verdict(0.1, -0.1)
    s = seed_summary([0.70, 0.72, 0.74])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.72) and s["std"] == pytest.approx(0.02)
    one = seed_summary([0.7])
    assert one["n"] == 1 and one["mean"] == 0.7 and np.isnan(one["std"])
    with pytest.raises(ValueError):
        seed_summary([])


# ------------------------------------------------------------------------------------------- predictions
def test_predictions_are_off_by_default_and_written_with_the_declared_columns(tmp_path):
    from training.train import parser
    from training.trainer import TrainOptions

    assert TrainOptions(model="deepfm").save_predictions is False
    assert parser().parse_args(["--model", "deepfm"]).save_predictions is False
    assert parser().parse_args(["--model", "deepfm", "--save-predictions"]).save_predictions is True
    with pytest.raises(ValueError, match="save_predictions"):
        TrainOptions(model="item2vec", save_predictions=True)
    layout = ModelLayout(tmp_path / "models" / "deepfm")
    assert layout.predictions == tmp_path / "models" / "deepfm" / "predictions.parquet"

    frame = {"row": np.array([2, 0, 1]), "event_id": np.array(["c", "a", "b"]), "user": np.array([5, 3, 5]),
             "label": np.array([1.0, 0.0, 1.0], np.float32), "score": np.array([0.9, 0.2, 0.6], np.float32)}
    write_predictions(layout.predictions, frame, {"model_version": "deepfm-1"})
    t = pq.read_table(layout.predictions)
    assert tuple(t.column_names) == PREDICTION_COLUMNS
    assert [t.schema.field(c).type for c in PREDICTION_COLUMNS] == [pa.int64(), pa.string(), pa.int64(), pa.int8(),
                                                                     pa.float64()]
    assert t.to_pydict() == {"row": [0, 1, 2], "event_id": ["a", "b", "c"], "user": [3, 5, 5], "label": [0, 1, 1],
                             "score": pytest.approx([0.2, 0.6, 0.9])}
    read = read_predictions(layout.predictions)
    assert read["metadata"] == {"model_version": "deepfm-1"}
    assert not list(layout.root.glob("*.tmp"))

    unkeyed = {c: v for c, v in frame.items() if c != "event_id"}
    assert pq.read_table(write_predictions(tmp_path / "p.parquet", unkeyed)).column_names == \
        [c for c in PREDICTION_COLUMNS if c != "event_id"]
    for bad, match in (({**frame, "label": np.array([0, 2, 1])}, "0/1"),
                       ({**frame, "score": np.array([0.1, 1.5, 0.3])}, "0/1"),
                       ({**frame, "row": np.array([0, 0, 1])}, "repeat"),
                       ({c: v for c, v in frame.items() if c != "score"}, "lack")):
        with pytest.raises(ValueError, match=match):
            write_predictions(tmp_path / "bad.parquet", bad)


N_TEST = 11


def _lake(root: Path) -> Path:
    """An ``export/`` whose test split is two Parquet files with ``event_id`` (not in row order), train and valid
    one file each; the features of ``SPARSE_FEATURES`` only."""
    vocab = synthetic_vocab_sizes()
    rng = np.random.default_rng(5)
    for split, sizes in (("train", (16,)), ("valid", (6,)), ("test", (6, N_TEST - 6))):
        out = root / "export" / "ctr_samples" / f"split={split}"
        out.mkdir(parents=True)
        for part, n in enumerate(sizes):
            user = rng.integers(1, 6, n)
            item = rng.integers(1, vocab["item"], n)
            pq.write_table(pa.table({
                "event_id": [f"ev-{split}-{rng.integers(10**6)}-{part}-{i}" for i in range(n)],
                "user_idx": user.astype(np.int32), "item_idx": item.astype(np.int32),
                "age_idx": (user % 8).astype(np.int32), "gender_idx": (user % 3).astype(np.int32),
                "occupation_idx": (user % 22).astype(np.int32), "zip_idx": (user % 12).astype(np.int32),
                "genre_idx": pa.array([[int(i % 19) + 1] for i in item], pa.list_(pa.int32())),
                "label": np.r_[0, 1, rng.integers(0, 2, n - 2)].astype(np.int32)}), out / f"part-{part}.parquet")
    (root / "export" / "vocab_sizes.json").write_text(json.dumps(vocab))
    return root


def test_peers_key_the_same_rows_as_the_trainer(tmp_path):
    lake = _lake(tmp_path)
    ours = read_event_ids(lake, "test")
    keys = peers.read_keys(lake, "test")
    assert len(ours) == N_TEST and list(ours) == list(keys["event_id"])
    np.testing.assert_array_equal(keys["row"], np.arange(N_TEST))
    np.testing.assert_array_equal(keys["user"], read_ctr_shard(lake, "test").user)
    for rank in (0, 1):  # rank r reads rows r::2, the positions CtrTask.evaluate gives its scores
        np.testing.assert_array_equal(read_ctr_shard(lake, "test", rank, 2).user, keys["user"][rank::2])
    label = peers.read_split(lake, "test")["label"]
    np.testing.assert_array_equal(label, read_ctr_shard(lake, "test").label)

    rng = np.random.default_rng(0)
    score = rng.uniform(0.05, 0.95, N_TEST)
    theirs = peers.write_predictions(tmp_path / "peer.parquet", keys, label, score, {"implementation": "deepctr"})
    order = rng.permutation(N_TEST)  # ours in another order: the writer sorts by row
    mine = write_predictions(tmp_path / "ours.parquet", {"row": keys["row"][order], "event_id": ours[order],
                                                         "user": keys["user"][order], "label": label[order],
                                                         "score": score[order]})
    t_ours, t_theirs = pq.read_table(mine), pq.read_table(theirs)
    assert t_ours.schema.remove_metadata() == t_theirs.schema.remove_metadata()
    assert t_ours.to_pydict() == t_theirs.to_pydict()
    r = paired_bootstrap(read_predictions(mine), read_predictions(theirs), "logloss", n_boot=20)
    assert r["key"] == "event_id" and (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
    assert read_predictions(theirs)["metadata"] == {"implementation": "deepctr"}
    with pytest.raises(ValueError):
        peers.write_predictions(tmp_path / "x.parquet", keys, label[:-1], score[:-1])


def test_recbole_scores_are_put_back_in_row_order():
    scored = [(np.array([3.0, 1.0]), np.array([1.0, 0.0]), np.array([0.8, 0.3])),
              (np.array([0.0, 2.0]), np.array([0.0, 1.0]), np.array([0.1, 0.6]))]
    label, score = peers.recbole_by_row(scored, 4)
    assert label.tolist() == [0.0, 0.0, 1.0, 1.0] and score.tolist() == [0.1, 0.3, 0.6, 0.8]
    with pytest.raises(ValueError, match="every row"):
        peers.recbole_by_row(scored, 5)
    with pytest.raises(ValueError, match="every row"):
        peers.recbole_by_row([*scored, scored[0]], 4)


def _evaluate_worker(rank: int, port: int, lake: str, done_dir: str) -> None:
    """Two ranks evaluate one model on the test split: with ``save_predictions`` rank 0 keeps every row's score
    under its row and event id, as one process scoring the whole split gives them; without, nothing is kept."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from training.data import ctr_batches, read_vocab_sizes
    from training.registry import get_model
    from training.tasks import TaskContext
    from training.tasks.ctr import CtrTask
    from training.trainer import TrainOptions, resolve_config

    spec, vocab = get_model("deepfm"), read_vocab_sizes(lake)
    for save in (False, True):
        opts = TrainOptions(model="deepfm", dense_features=False, id_dropout=0.0, save_predictions=save)
        config = resolve_config(spec, opts, lake)
        task = CtrTask(TaskContext(spec, config, opts, lake, vocab, rank, 2, torch.device("cpu"), 4))
        torch.manual_seed(0)
        model = spec.build(vocab, config).eval()
        metrics = task.evaluate(model, "test")
        if not (save and rank == 0):
            assert task.test_predictions is None and "test_predictions" not in task.state_dict()
            continue
        p = task.test_predictions
        assert sorted(p) == ["event_id", "label", "row", "score", "user"]
        order = np.argsort(p["row"])
        np.testing.assert_array_equal(p["row"][order], np.arange(N_TEST))
        assert list(p["event_id"][order]) == list(read_event_ids(lake, "test"))
        whole = read_ctr_shard(lake, "test", features=task.features)
        np.testing.assert_array_equal(p["user"][order], whole.user)
        np.testing.assert_array_equal(p["label"][order], whole.label)
        with torch.no_grad():
            batch = next(ctr_batches(whole, N_TEST, 1, features=task.features))
            expected = torch.sigmoid(model(batch.features, batch.dense)).numpy()
        np.testing.assert_allclose(p["score"][order], expected, rtol=1e-5, atol=1e-7)
        assert metrics["auc"] == pytest.approx(auc(whole.label, expected), abs=1e-6)
        assert task.state_dict()["test_predictions"] is p  # a resumed run keeps the best epoch's rows
    dist.destroy_process_group()
    mark_done(done_dir, rank)


def test_two_ranks_keep_every_test_row_under_its_key(tmp_path):
    lake = _lake(tmp_path / "lake")
    done = tmp_path / "done"
    done.mkdir()
    spawn_checked(_evaluate_worker, (free_port(), str(lake)), 2, done)


def test_doctests():
    """bench/ is outside pytest's doctest collection (pyproject ignores it), so its examples run here."""
    import doctest

    from bench import leaderboard_stats

    assert doctest.testmod(leaderboard_stats).failed == 0 and doctest.testmod(peers).failed == 0
