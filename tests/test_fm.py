"""The factorization machine: the logit is the bias, the ids' first-order weights, the linear dense term and the
pairwise dot products of every pair of fields, compared with a brute-force double loop over the tables' rows."""

from __future__ import annotations

import pytest
import torch

from features.definitions import SPARSE_FEATURES
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.fm import FM, FMConfig

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []},
            {"user_idx": 0, "item_idx": 1, "age_idx": 7, "gender_idx": 0, "occupation_idx": 21, "zip_idx": 11,
             "genre_idx": [19]}]


def _model(**config) -> FM:
    torch.manual_seed(0)
    model = FM(VOCAB, FMConfig(embedding_dim=8, init_range=0.5, **config)).eval()
    with torch.no_grad():
        for bag in model.interaction_arch.first_order.weights.values():
            bag.weight.normal_(0, 0.3)
        model.interaction_arch.first_order.bias.fill_(0.1)
    return model


def test_logit_is_bias_first_order_and_every_pair_of_fields_by_brute_force():
    model = _model(dense_features=DENSE)
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    first = model.interaction_arch.first_order.weights
    dense = torch.tensor([[0.5, 1.0], [-1.0, 2.0], [0.0, 0.0]])  # (B, F_dense)
    logits = model(kjt_of_rows(_rows()), dense)
    assert logits.shape == (3,)
    with torch.no_grad():  # the reference reads the tables' rows one by one
        want = []
        for row, z in zip(_rows(), dense):
            ids = {f.name: row[f.name] if f.multi_hot else [row[f.name]] for f in SPARSE_FEATURES}
            v = [sum((tables[f.table].weight[i] for i in ids[f.name]), torch.zeros(8)) for f in SPARSE_FEATURES]
            pairs = 0.0
            for a in range(len(v)):
                for b in range(a + 1, len(v)):
                    pairs += float(v[a] @ v[b])
            linear = 0.1 + sum(first[f.table].weight[i, 0].item() for f in SPARSE_FEATURES for i in ids[f.name])
            want.append(pairs + linear + float(model.dense_arch.weight[0] @ z))
    torch.testing.assert_close(logits, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_dense_features_enter_linearly_and_only_there():
    model = _model(dense_features=DENSE)
    with torch.no_grad():
        model.dense_arch.weight.copy_(torch.tensor([[2.0, -3.0]]))
    kjt = kjt_of_rows(_rows())
    shift = model(kjt, torch.tensor([[1.0, 1.0]] * 3)) - model(kjt, torch.zeros(3, 2))
    torch.testing.assert_close(shift, torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="dense"):
        model(kjt)
    assert _model().dense_arch is None


def test_config_rejects_a_width_fbgemm_cannot_use():
    with pytest.raises(ValueError, match="multiple of 4"):
        FMConfig(embedding_dim=6)
    with pytest.raises(ValueError, match="init_range"):
        FMConfig(init_range=-1.0)
