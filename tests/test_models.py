"""Unsharded models and metrics against hand-computed or naive references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from features.definitions import SPARSE_FEATURES
from training.data import (ctr_batches, keep_probabilities, kjt_of_rows, negative_distribution,
                           skipgram_pairs, synthetic_vocab_sizes, CtrShard)
from training.metrics import auc, gauc, logloss
from training.models import DeepFM, DeepFMConfig
from training.modules import FactorizationMachine

ROWS = [
    {"user_idx": 1, "item_idx": 5, "age_idx": 2, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4, "genre_idx": [1, 7]},
    {"user_idx": 2, "item_idx": 9, "age_idx": 3, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2, "genre_idx": []},
    {"user_idx": 3, "item_idx": 5, "age_idx": 1, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 9, "genre_idx": [2]},
]


def test_fm_equals_naive_pairwise_sum():
    v = torch.randn(4, 6, 8, dtype=torch.float64)  # (B, F, D)
    naive = torch.stack([sum((v[b, i] * v[b, j]).sum() for i, j in itertools.combinations(range(6), 2))
                         for b in range(4)])
    torch.testing.assert_close(FactorizationMachine()(v), naive)


def test_deepfm_shapes_and_parts():
    torch.manual_seed(0)
    model = DeepFM(synthetic_vocab_sizes(), DeepFMConfig(embedding_dim=8, hidden=(16,), dropout=0.0))
    kjt = kjt_of_rows(ROWS)
    emb = model.sparse_arch(kjt)
    assert emb.shape == (3, len(SPARSE_FEATURES), 8)  # (B, F, D)
    # the multi-hot genre is the sum of its rows; an empty genre list pools to zero
    table = model.sparse_arch.embedding_bag_collection.embedding_bags["t_genre"].weight
    torch.testing.assert_close(emb[0, -1], table[1] + table[7])
    assert torch.all(emb[1, -1] == 0)
    logits = model(kjt)
    assert logits.shape == (3,)
    # logit = first order + FM + deep part, recomputed by hand
    first = model.interaction_arch.first_order(kjt)
    deep = model.over_arch(model.dense_arch(emb.flatten(1))).squeeze(1)
    torch.testing.assert_close(logits, first + FactorizationMachine()(emb) + deep)
    # the item table is one shared table: same item -> same embedding row
    torch.testing.assert_close(emb[0, 1], emb[2, 1])


def test_ctr_batches_pad_with_zero_weight():
    shard = CtrShard(ids={f.name: np.arange(3) for f in SPARSE_FEATURES if not f.multi_hot},
                     values={"genre_idx": np.array([1, 2, 3])}, offsets={"genre_idx": np.array([0, 2, 2, 3])},
                     label=np.array([1.0, 0.0, 1.0], np.float32), user=np.arange(3))
    batches = list(ctr_batches(shard, batch_size=2, n_batches=2))
    assert [b.weight.tolist() for b in batches] == [[1.0, 1.0], [1.0, 0.0]]
    assert batches[0].features["genre_idx"].values().tolist() == [1, 2]
    assert batches[0].features["genre_idx"].lengths().tolist() == [2, 0]


def test_skipgram_window_subsampling_and_negatives():
    rng = np.random.default_rng(0)
    c, x = skipgram_pairs([np.array([1, 2, 3, 4])], window=2, rng=np.random.default_rng(1))
    pairs = set(zip(c.tolist(), x.tolist()))
    assert {(1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3)} <= pairs  # distance 1 is always inside the window
    assert all(abs(a - b) <= 2 for a, b in pairs) and all((b, a) in pairs or abs(a - b) == 2 for a, b in pairs)
    # keep probability 0 drops an item from every pair
    keep = np.array([1.0, 1.0, 0.0, 1.0, 1.0])
    c, x = skipgram_pairs([np.array([1, 2, 3, 4])] * 5, window=1, rng=rng, keep_prob=keep)
    assert 2 not in c and 2 not in x and (1, 3) in set(zip(c.tolist(), x.tolist()))
    counts = np.array([0, 10, 100, 1000])
    assert keep_probabilities(counts)[3] < keep_probabilities(counts)[1] <= 1.0
    p = negative_distribution(counts)
    np.testing.assert_allclose(p, counts ** 0.75 / (counts ** 0.75).sum())


def test_auc_logloss_gauc_by_hand_and_sklearn():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.5, 0.5, 0.9, 0.3, 0.2])
    # pairs (pos, neg): 9 in all; wins: 0.5>{0.1,0.3}=2 + tie with 0.5 = 0.5; 0.9 beats 3; 0.2 beats 0.1 = 1
    assert auc(y, s) == pytest.approx((2.5 + 3 + 1) / 9)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))
    rng = np.random.default_rng(0)
    y2, s2 = rng.integers(0, 2, 500), rng.integers(0, 20, 500) / 20  # many ties
    assert auc(y2, s2) == pytest.approx(roc_auc_score(y2, s2))
    p = np.array([0.9, 0.2, 0.6])
    assert logloss(np.array([1, 0, 0]), p) == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
    assert logloss(y2, s2.clip(0.05, 0.95)) == pytest.approx(log_loss(y2, s2.clip(0.05, 0.95)))
    users = np.array([7, 7, 7, 8, 8, 9])
    # user 7: labels 0,0,1 scores .1,.5,.5 -> (1 + 0.5)/2 = 0.75 (3 samples); user 8: 1,0 .9,.3 -> 1 (2); user 9 skipped
    assert gauc(users, y, s) == pytest.approx((3 * 0.75 + 2 * 1.0) / 5)
    with pytest.raises(ValueError):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_deepfm_reads_dense_features_in_its_linear_part_and_dnn():
    torch.manual_seed(0)
    names = ("user_prior_events", "item_prior_rating")
    model = DeepFM(synthetic_vocab_sizes(), DeepFMConfig(embedding_dim=8, hidden=(16,), dropout=0.0,
                                                         dense_features=names))
    kjt, dense = kjt_of_rows(ROWS), torch.randn(3, 2)  # (B, F_dense)
    logits = model(kjt, dense)
    emb = model.sparse_arch(kjt)
    first = model.interaction_arch.first_order(kjt) + model.dense_linear(dense).squeeze(1)
    deep = model.over_arch(model.dense_arch(torch.cat([emb.flatten(1), dense], dim=1))).squeeze(1)
    torch.testing.assert_close(logits, first + FactorizationMachine()(emb) + deep)
    assert not torch.allclose(model(kjt, dense + 1.0), logits)  # the input is read
    with pytest.raises(ValueError, match="dense features.*user_prior_events"):
        model(kjt)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        model(kjt, torch.zeros(3, 3))


def test_dense_inputs_of_a_shard_follow_the_declared_transform():
    from features.definitions import DENSE_FEATURES, RATING_CENTER, dense_inputs

    raw = {"user_prior_events": [0, 9], "user_prior_rating": [None, 4.0], "item_prior_events": [3, 0],
           "item_prior_rating": [2.5, float("nan")]}
    got = dense_inputs(raw, DENSE_FEATURES)
    want = [[0.0, 0.0, math.log1p(3), 2.5 - RATING_CENTER], [math.log1p(9), 4.0 - RATING_CENTER, 0.0, 0.0]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32 and got.shape == (2, len(DENSE_FEATURES))
