"""The neighbourhood retrievers, ItemCF (Sarwar et al. 2001, ``itemcf``) and UserCF (Resnick et al. 1994,
``usercf``), fitted in closed form by the ``closed_form`` task:

- on a hand-made 4 x 5 matrix, the scores through the query encoder and the exported item vectors (UserCF: MIPS),
  and through the model's forward, equal the cosine formulas computed by hand;
- on a random matrix, the order the cosine index returns (exact flat search, and the HNSW index) is the order of a
  naive pure-Python oracle of the formulas;
- the query is built from the point-in-time history it is given, never from the user's train row;
- a vocabulary above the memory cap is a clear error before any table is allocated;
- end to end (integration): ``python -m training.train --model itemcf`` through Ray Train on 2 gloo workers saves
  the closed-form table, and its stage result gives the fit's figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.modules.neighbourhood import CF_FEATURES, ITEM_TABLE, NeighbourhoodTooLargeError, table_dim
from training.registry import ModelOptionError, get_model
from training.tasks.closed_form import load_fitted, positives_matrix

#: users 1..4 x items 1..5 (row and column 0: the OOV user and item, empty)
HAND = np.array([[1, 1, 0, 0, 0],
                 [1, 0, 1, 1, 0],
                 [0, 1, 1, 0, 1],
                 [1, 1, 1, 0, 0]])
HAND_VOCAB = {"user": 5, "item": 6}
S3, S6 = math.sqrt(3), math.sqrt(6)


def _hand_positives():
    users, items = np.nonzero(HAND)
    # every positive twice (counts once), a label-0 row and rows of the OOV user / item (left out)
    u = np.r_[users + 1, users + 1, 2, 0, 3]
    i = np.r_[items + 1, items + 1, 5, 2, 0]
    label = np.r_[np.ones(2 * len(users)), 0, 1, 1]
    return positives_matrix(u, i, label, HAND_VOCAB["user"], HAND_VOCAB["item"])


def _fitted(name: str, positives, vocab):
    """The model fitted in closed form (unsharded) and its saved-state view."""
    spec = get_model(name)
    model = spec.build(vocab, spec.default_config()).eval()
    load_fitted(model, model.closed_form(positives))
    return spec, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _search_scores(spec, state, histories):
    """(B, R_items) ``<query, item vector>`` through the encoder and the exported vectors (what the index ranks)."""
    vectors = spec.item_vectors(state, spec.default_config()) if spec.item_vectors else state[ITEM_TABLE].numpy()
    queries, ok = spec.query_encoder(state, spec.default_config()).encode(np.arange(len(histories)), histories)
    return queries @ vectors.T, ok, vectors, queries


def _forward(model, history, n_items):
    rows = [{"item_idx": j, "hist_item_idx": list(history)} for j in range(n_items)]
    with torch.no_grad():
        return model(kjt_of_rows(rows, CF_FEATURES)).numpy()


def test_positives_matrix_is_binary_label_1_without_the_oov_rows():
    r = _hand_positives()
    assert r.shape == (5, 6) and r.dtype == np.float32
    np.testing.assert_array_equal(r.toarray()[1:, 1:], HAND)
    assert r.toarray()[0].sum() == 0 and r.toarray()[:, 0].sum() == 0


def test_itemcf_scores_are_the_sum_of_item_cosines_by_hand():
    spec, model, state = _fitted("itemcf", _hand_positives(), HAND_VOCAB)
    table = state[ITEM_TABLE].numpy()
    assert table.shape == (6, table_dim(5)) and not table[0].any() and not table[:, 5:].any()
    # column norms over users 1..4: items 1-3 sqrt(3), items 4-5 1; cos(1,2) = cos(1,3) = cos(2,3) = 2/3,
    # cos(1,4) = cos(2,5) = cos(3,4) = cos(3,5) = 1/sqrt(3), cos(1,5) = cos(2,4) = cos(4,5) = 0
    history = [1, 4]
    want = [0.0, 1 + 1 / S3, 2 / 3, 2 / 3 + 1 / S3, 1 / S3 + 1, 0.0]
    scores, ok, vectors, _ = _search_scores(spec, state, [np.array(history)])
    assert ok.tolist() == [True]
    np.testing.assert_allclose(scores[0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_forward(model, history, 6), want, rtol=1e-6, atol=1e-7)
    # every item with a positive has a unit vector, so cosine (what the index computes) orders as the score
    np.testing.assert_allclose(np.linalg.norm(vectors[1:], axis=1), 1.0, rtol=1e-6)
    # a repeated history item counts once; the OOV item and ids beyond the table are ignored
    again, _, _, _ = _search_scores(spec, state, [np.array([4, 1, 4, 0, 99])])
    np.testing.assert_allclose(again[0], want, rtol=1e-6, atol=1e-7)


def test_usercf_scores_are_the_cosine_weighted_neighbours_by_hand():
    spec, model, state = _fitted("usercf", _hand_positives(), HAND_VOCAB)
    # r = items {1, 4}, |r| = sqrt(2); user norms sqrt(2), sqrt(3), sqrt(3), sqrt(3):
    # cos(r, u1) = 1/2, cos(r, u2) = 2/sqrt(6), cos(r, u3) = 0, cos(r, u4) = 1/sqrt(6)
    s = [0.5, 2 / S6, 0.0, 1 / S6]
    want = [0.0, s[0] + s[1] + s[3], s[0] + s[2] + s[3], s[1] + s[2] + s[3], s[1], s[2]]
    scores, ok, vectors, queries = _search_scores(spec, state, [np.array([1, 4])])
    assert ok.tolist() == [True]
    np.testing.assert_allclose(queries[0, 1:5], s, rtol=1e-6, atol=1e-7)  # the query is s_u, user 0 empty
    np.testing.assert_allclose(scores[0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_forward(model, [1, 4], 6), want, rtol=1e-6, atol=1e-7)
    # the exported vectors are R's columns MIPS-transformed: one norm for every item, so cosine orders as <s_u, .>
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(norms, norms.max(), rtol=1e-6)
    np.testing.assert_array_equal(vectors[1:, 1:5], HAND.T)


def _naive_scores(r: np.ndarray, history: list[int], name: str) -> np.ndarray:
    """The formulas in pure Python loops over the dense 0/1 matrix ``r`` (U, R_items): the oracle."""
    n_users, n_items = r.shape
    h = sorted({i for i in history if 0 < i < n_items})

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        return dot / (na * nb) if na and nb else 0.0

    cols = [[r[v][j] for v in range(n_users)] for j in range(n_items)]
    if name == "itemcf":
        return np.array([sum(cos(cols[i], cols[j]) for i in h) for j in range(n_items)])
    ru = [1 if j in h else 0 for j in range(n_items)]
    sim = [cos(ru, list(r[v])) for v in range(n_users)]
    return np.array([sum(sim[v] * r[v][j] for v in range(n_users)) for j in range(n_items)])


def _random_case(seed: int = 3):
    vocab = synthetic_vocab_sizes()  # 30 users, 40 items
    rng = np.random.default_rng(seed)
    dense = (rng.random((vocab["user"], vocab["item"])) < 0.15).astype(np.int64)
    dense[0], dense[:, 0], dense[:, 37:] = 0, 0, 0  # OOV rows; items 37..39 without a train positive
    u, i = np.nonzero(dense)
    histories = [rng.choice(np.arange(1, vocab["item"]), size=rng.integers(1, 8), replace=False) for _ in range(12)]
    histories.append(np.array([38, 39]))  # only items without a positive: no query (popularity fallback)
    return vocab, dense, positives_matrix(u, i, np.ones(len(u)), vocab["user"], vocab["item"]), histories


@pytest.mark.parametrize("name", ["itemcf", "usercf"])
def test_search_order_is_the_brute_force_score_order(name):
    """The cosine index over the exported vectors, queried by the model's encoder, returns the items in the order of
    the naive oracle's scores: along the returned order the oracle's scores never rise (ties may come in any
    order), exactly (flat index) and through the HNSW index the platform serves from."""
    from serving.ann import HnswParams, ItemIndex, exact_search

    vocab, dense, positives, histories = _random_case()
    spec, _, state = _fitted(name, positives, vocab)
    scores, ok, vectors, queries = _search_scores(spec, state, histories)
    ids = np.arange(vocab["item"])
    index = ItemIndex.build(vectors, ids, HnswParams(m=8, ef_construction=200, ef_search=200))
    assert ok.tolist() == [True] * (len(histories) - 1) + [False]
    for b, h in enumerate(histories[:-1]):
        oracle = _naive_scores(dense, h.tolist(), name)
        np.testing.assert_allclose(scores[b], oracle, rtol=1e-5, atol=1e-6)
        for order in (exact_search(vectors, ids, queries[b:b + 1], len(ids))[0],
                      index.search(queries[b:b + 1], len(ids))[1][0]):
            assert sorted(order.tolist()) == ids.tolist()
            along = oracle[order]
            assert np.all(np.diff(along) <= 1e-6), (name, b, along)
    assert not queries[-1].any()


@pytest.mark.parametrize("name", ["itemcf", "usercf"])
def test_query_is_the_point_in_time_history_not_the_train_row(name):
    """A train user's query is built from the history it is given at that point in time: the same history gives
    the same query whoever the user is, an empty history gives none even for a user with train positives, and a
    user who has no train row at all (a new user) is scored from its history."""
    vocab, dense, positives, _ = _random_case()
    spec, _, state = _fitted(name, positives, vocab)
    encoder = spec.query_encoder(state, spec.default_config())
    train_user = int(np.flatnonzero(dense.sum(axis=1) >= 3)[0])
    train_row = np.flatnonzero(dense[train_user])
    earlier = train_row[:1]  # what the user had done at an earlier point in time
    q, ok = encoder.encode(np.array([train_user, 0, train_user]), [earlier, earlier, np.array([], np.int64)])
    assert ok.tolist() == [True, True, False]
    np.testing.assert_array_equal(q[0], q[1])
    full, _ = encoder.encode(np.array([train_user]), [train_row])
    assert not np.allclose(q[0], full[0])  # the train row would give another query
    scores = q[0] @ (spec.item_vectors(state, spec.default_config()) if spec.item_vectors
                     else state[ITEM_TABLE].numpy()).T
    np.testing.assert_allclose(scores, _naive_scores(dense, earlier.tolist(), name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["itemcf", "usercf"])
def test_a_table_above_the_memory_cap_is_a_clear_error(name):
    spec = get_model(name)
    big = {"user": 200_000, "item": 60_000}  # 12e9 floats: would take 45 GiB as float32
    with pytest.raises(NeighbourhoodTooLargeError, match=r"60000 items x 200000 users.*max_table_floats"):
        spec.build(big, spec.default_config(), torch.device("meta"))
    small = spec.make_config({"max_table_floats": "100"})
    with pytest.raises(NeighbourhoodTooLargeError, match="max_table_floats=100"):
        spec.build(synthetic_vocab_sizes(), small)
    spec.build(synthetic_vocab_sizes(), spec.make_config({"max_table_floats": str(40 * 32)}))  # exactly the cap
    with pytest.raises(ModelOptionError, match="max_table_floats must be >= 1"):
        spec.make_config({"max_table_floats": "0"})


def test_the_fit_rejects_a_matrix_of_other_vocabularies():
    spec = get_model("itemcf")
    model = spec.build(synthetic_vocab_sizes(), spec.default_config())
    with pytest.raises(ValueError, match=r"\(5, 6\).*\(30, 40\)"):
        model.closed_form(_hand_positives())


@pytest.mark.integration
@pytest.mark.parametrize("name, sharding", [("itemcf", "planner"), ("usercf", "row_wise")])
def test_train_fits_in_closed_form_through_the_trainer(name, sharding, ray_cluster, cfg, tmp_path):
    """``training.train`` on 2 gloo Ray workers, the synthetic lake of tests/test_train_ray.py: one epoch of no
    step; the saved state is the closed-form fit of the train split's label-1 rows (every rank read all of it and
    filled its shards: the whole table on one rank, or row-wise halves on both), the stage result gives the fit's
    figures, and the saved model answers queries."""
    import pyarrow.parquet as pq

    from features.config import PlatformConfig
    from features.results import read_stage_result
    from features.tables import CTR_SAMPLES, parquet_export
    from test_train_ray import write_synthetic_lake
    from training.artifacts import ModelLayout, load_model
    from training.query import own_query_encoder
    from training.train import TrainOptions, train

    local = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", train=cfg.train)
    vocab = write_synthetic_lake(local.lake_dir, {"train": 600, "valid": 150, "test": 150})
    rows = pq.read_table(Path(parquet_export(CTR_SAMPLES, local.lake_dir)) / "split=train" / "part-0.parquet",
                         columns=["user_idx", "item_idx", "label"]).to_pydict()
    result = train(local, TrainOptions(model=name, sharding=sharding))

    dense = np.zeros((vocab["user"], vocab["item"]), np.int64)
    for u, i, y in zip(rows["user_idx"], rows["item_idx"], rows["label"]):
        if y == 1 and u > 0 and i > 0:
            dense[u, i] = 1
    assert result["epochs"] == 1 and result["task"] == "closed_form" and result["train_rows"] == 600
    assert result["positives"] == int(dense.sum()) and result["users"] == int((dense.sum(axis=1) > 0).sum())
    assert result["items"] == int((dense.sum(axis=0) > 0).sum()) and result["fit_s"] >= 0
    assert result == read_stage_result(local, f"train_{name}")
    if sharding == "row_wise":
        assert {p.split("@rank")[1] for p in result["sharding_plan"].values()} == {"0,1"}
    folder = local.run_dir / "models" / name
    loaded = load_model(folder)
    _, _, want = _fitted(name, positives_matrix(*np.nonzero(dense), np.ones(int(dense.sum())), vocab["user"],
                                                vocab["item"]), vocab)
    for key, value in want.items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value)
    np.testing.assert_array_equal(np.load(ModelLayout(folder).item_embeddings),
                                  loaded.spec.item_vectors(want, loaded.config) if loaded.spec.item_vectors
                                  else want[ITEM_TABLE].numpy())
    encoder, _ = own_query_encoder(folder)
    history = np.flatnonzero(dense[int(np.flatnonzero(dense.sum(axis=1))[0])])
    q, ok = encoder.encode(np.array([0]), [history])
    vectors = np.load(ModelLayout(folder).item_embeddings)
    assert ok.all()
    np.testing.assert_allclose(q[0] @ vectors.T, _naive_scores(dense, history.tolist(), name), rtol=1e-5, atol=1e-6)
