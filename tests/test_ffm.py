"""The field-aware factorization machine: the pairwise term takes, for each pair of fields, each side's vector that
faces the other side's field, compared with brute-force loops that build the (F - 1) * D rows from named
field-specific vectors; the model's logit by hand from its tables; the exported item vectors."""

from __future__ import annotations

import pytest
import torch

from features.definitions import SPARSE_FEATURES
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.ffm import FFM, FFMConfig, item_vectors
from training.modules import FieldAwareInteraction, field_block

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")
F, D = len(SPARSE_FEATURES), 4


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def test_field_aware_pairs_match_a_loop_over_field_pairs():
    g = torch.Generator().manual_seed(0)
    fields, batch = 4, 3
    # v[b][i][f]: sample b, feature i's vector facing field f (f != i)
    v = [[{f: torch.randn(D, generator=g) for f in range(fields) if f != i} for i in range(fields)]
         for _ in range(batch)]
    rows = torch.stack([torch.stack([torch.cat([v[b][i][f] for f in sorted(v[b][i])]) for i in range(fields)])
                        for b in range(batch)])  # (B, F, (F-1)*D): the other fields in order
    want = [sum(float(v[b][i][j] @ v[b][j][i]) for i in range(fields) for j in range(i + 1, fields))
            for b in range(batch)]
    torch.testing.assert_close(FieldAwareInteraction(fields, D)(rows), torch.tensor(want))
    assert [field_block(3, j) for j in range(3)] == [0, 1, 2] and field_block(0, 3) == 2


def test_logit_by_hand_from_the_tables():
    torch.manual_seed(0)
    model = FFM(VOCAB, FFMConfig(embedding_dim=D, init_range=0.5, dense_features=DENSE)).eval()
    with torch.no_grad():
        for bag in model.interaction_arch.first_order.weights.values():
            bag.weight.normal_(0, 0.3)
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    first = model.interaction_arch.first_order
    dense = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt_of_rows(_rows()), dense)
    assert logits.shape == (2,) and tables["t_user"].weight.shape == (VOCAB["user"], (F - 1) * D)
    with torch.no_grad():  # the reference reads the tables' rows one by one
        want = []
        for row, z in zip(_rows(), dense):
            ids = {f.name: row[f.name] if f.multi_hot else [row[f.name]] for f in SPARSE_FEATURES}

            def vec(i: int, j: int) -> torch.Tensor:  # feature i's pooled vector facing field j
                f, k = SPARSE_FEATURES[i], j if j < i else j - 1
                return sum((tables[f.table].weight[x, k * D:(k + 1) * D] for x in ids[f.name]), torch.zeros(D))

            pairs = sum(float(vec(i, j) @ vec(j, i)) for i in range(F) for j in range(i + 1, F))
            linear = first.bias.item() + sum(first.weights[f.table].weight[x, 0].item()
                                             for f in SPARSE_FEATURES for x in ids[f.name])
            want.append(pairs + linear + float(model.dense_arch.weight[0] @ z))
    torch.testing.assert_close(logits, torch.tensor(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        model(kjt_of_rows(_rows()))


def test_item_vectors_are_the_items_side_of_the_user_item_pair():
    config = FFMConfig(embedding_dim=D, init_range=0.5)
    torch.manual_seed(0)
    model = FFM(VOCAB, config)
    state = model.state_dict()
    items = item_vectors(state, config)  # (R, D)
    table = model.sparse_arch.embedding_bag_collection.embedding_bags
    assert items.shape == (VOCAB["item"], D)
    # item is field 1, user field 0: v_{item, f_user} is block 0 of the item row (its other fields: 0, 2, ...)
    torch.testing.assert_close(torch.from_numpy(items), table["t_item"].weight[:, :D].detach())


def test_errors_name_the_shape_and_the_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        FFMConfig(embedding_dim=10)
    with pytest.raises(ValueError, match=r"takes \(B, 3, 8\)"):
        FieldAwareInteraction(3, 4)(torch.zeros(2, 3, 12))
    with pytest.raises(ValueError, match="distinct"):
        field_block(2, 2)
