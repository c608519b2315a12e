"""NFM: the bi-interaction vector against the brute-force sum over pairs, the logit by hand from its parts (linear
part + h^T hidden layers over [bi-interaction, dense]), the bi-interaction dropout, the config's checks."""

from __future__ import annotations

import pytest
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.nfm import NFM, NFMConfig
from training.modules import BiInteractionPooling
from training.registry import ModelOptionError, get_model

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def _model(**overrides) -> NFM:
    torch.manual_seed(0)
    config = NFMConfig(**{"embedding_dim": 4, "hidden": (8,), "init_range": 0.5, "dense_features": DENSE,
                          **overrides})
    model = NFM(VOCAB, config).eval()
    with torch.no_grad():  # the first-order weights and the bias start at 0: make them count
        for bag in model.linear_arch.first_order.weights.values():
            bag.weight.normal_(0, 0.3)
        model.linear_arch.first_order.bias.fill_(0.1)
    return model


def test_bi_interaction_is_the_sum_over_pairs_of_the_element_wise_products():
    v = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))  # (B, F, D)
    brute = torch.zeros(3, 4)
    for i in range(5):
        for j in range(i + 1, 5):
            brute += v[:, i] * v[:, j]
    torch.testing.assert_close(BiInteractionPooling()(v), brute)
    # a tiny case by hand: fields (1, 2), (3, -1), (0, 4) -> (1*3 + 1*0 + 3*0, 2*-1 + 2*4 + -1*4)
    assert BiInteractionPooling()(torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]]])).tolist() == [[3.0, 2.0]]
    with pytest.raises(ValueError, match=r"\(B, F, D\)"):
        BiInteractionPooling()(torch.zeros(2, 4))


@torch.no_grad()
def test_logit_is_the_linear_part_plus_h_over_the_hidden_layers_of_bi_interaction_and_dense():
    model = _model()
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt, dense)
    assert logits.shape == (2,)
    first = model.linear_arch.first_order
    emb = model.sparse_arch(kjt)  # (B, F, D)
    want = []
    for b, (row, z) in enumerate(zip(_rows(), dense)):
        linear = first.bias.item() + float(model.linear_arch.dense_linear.weight[0] @ z)
        for name, table in first.table_of.items():
            ids = row[name] if isinstance(row[name], list) else [row[name]]
            linear += sum(first.weights[table].weight[i, 0].item() for i in ids)
        bi = sum(emb[b, i] * emb[b, j] for i in range(emb.shape[1]) for j in range(i + 1, emb.shape[1]))  # (D,)
        layer = model.dense_arch.layers[0]
        hidden = torch.relu(layer.weight @ torch.cat([bi, z]) + layer.bias)  # (H,)
        want.append(linear + float(model.over_arch.weight[0] @ hidden))
    torch.testing.assert_close(logits, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_dense_features_enter_the_linear_part_and_the_hidden_layers():
    model = _model()
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    assert model.dense_arch.layers[0].in_features == 4 + len(DENSE)  # D + F_dense
    with torch.no_grad():
        model.linear_arch.dense_linear.weight.zero_()
    assert not torch.allclose(model(kjt, dense), model(kjt, dense + 1.0))  # through the hidden layers alone
    with pytest.raises(ValueError, match="dense"):
        model(kjt)
    assert NFM(VOCAB, NFMConfig()).linear_arch.dense_linear is None  # without dense features, no dense input


def test_bi_interaction_dropout_drops_or_rescales_each_entry_in_training_only():
    model = _model(bi_dropout=0.5)
    emb = torch.full((1, 3, 4000), 1.0)  # every pair product 1: the bi-interaction vector is 3 everywhere
    model.train()
    out = model.interaction_arch(emb)  # (1, 4000)
    assert set(out.unique().tolist()) == {0.0, 6.0}  # dropped, or kept and scaled by 1 / (1 - 0.5)
    assert 0.4 < (out == 0).float().mean().item() < 0.6
    model.eval()
    assert model.interaction_arch(emb).unique().tolist() == [3.0]


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        NFMConfig(embedding_dim=6)
    with pytest.raises(ValueError, match="hidden layer"):
        NFMConfig(hidden=())
    with pytest.raises(ValueError, match="bi_dropout"):
        NFMConfig(bi_dropout=1.0)
    with pytest.raises(ModelOptionError, match="bi_dropout"):
        get_model("nfm").make_config({"bi_dropout": "-0.1"})
