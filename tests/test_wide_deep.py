"""Wide & Deep: the crossed ids and the wide part's logit by hand, the deep part as DeepFM's DNN without the FM
term, the dense features in both parts."""

from __future__ import annotations

import pytest
import torch

from features.definitions import SPARSE_FEATURES
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.wide_deep import WideDeep, WideDeepConfig
from training.modules import CrossProduct

F = {f.name: f for f in SPARSE_FEATURES}
VOCAB = synthetic_vocab_sizes()


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def test_crossed_ids_pair_the_one_hot_side_with_every_value_of_the_multi_hot_side():
    cross = CrossProduct([(F["genre_idx"], F["age_idx"])], VOCAB)  # the multi-hot side may come first
    (ids, offsets), = cross.crossed_ids(kjt_of_rows(_rows()))
    n_genres = VOCAB["genre"]
    assert ids.tolist() == [3 * n_genres + 2, 3 * n_genres + 7] and offsets.tolist() == [0, 2, 2]
    with torch.no_grad():
        cross.weights[0].weight[3 * n_genres + 2] = 0.5
        cross.weights[0].weight[3 * n_genres + 7] = -2.0
    assert cross(kjt_of_rows(_rows())).tolist() == [-1.5, 0.0]  # a sample without genres has no crossed feature
    with pytest.raises(ValueError, match="multi-hot"):
        CrossProduct([(F["genre_idx"], F["genre_idx"])], VOCAB)


def test_logit_is_the_wide_part_plus_the_deep_part():
    torch.manual_seed(0)
    config = WideDeepConfig(embedding_dim=8, hidden=(16,), crosses=("gender_idx*genre_idx",),
                            dense_features=("user_prior_rating", "item_prior_events"))
    model = WideDeep(VOCAB, config).eval()
    with torch.no_grad():
        for bag in model.wide_arch.first_order.weights.values():
            bag.weight.normal_(0, 0.3)
        model.wide_arch.crosses.weights[0].weight.normal_(0, 0.3)
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt, dense)
    wide = []
    for row, z in zip(_rows(), dense):
        w = model.wide_arch.first_order.bias.item()
        for name, table in model.wide_arch.first_order.table_of.items():
            ids = row[name] if isinstance(row[name], list) else [row[name]]
            w += sum(model.wide_arch.first_order.weights[table].weight[i, 0].item() for i in ids)
        w += sum(model.wide_arch.crosses.weights[0].weight[row["gender_idx"] * VOCAB["genre"] + g, 0].item()
                 for g in row["genre_idx"])
        wide.append(w + float(model.wide_arch.dense_linear.weight[0].detach() @ z))
    x = torch.cat([model.sparse_arch(kjt).flatten(1), dense], dim=1)  # (B, F*D + F_dense)
    deep = model.over_arch(model.dense_arch(x)).squeeze(1)
    torch.testing.assert_close(logits, torch.tensor(wide) + deep, rtol=1e-5, atol=1e-5)


def test_config_rejects_a_cross_of_an_undeclared_feature():
    with pytest.raises(ValueError, match="cross"):
        WideDeepConfig(crosses=("age_idx*shoe_size",))
    with pytest.raises(ValueError, match="dense"):
        WideDeep(VOCAB, WideDeepConfig(dense_features=("user_prior_rating",)))(kjt_of_rows(_rows()))
