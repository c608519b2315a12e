"""AFM: the attention weights (a softmax over the pairs) and the pooled vector against a brute-force loop over the
pairs, the logit by hand from its parts, the dense features as a linear term only, the config's checks."""

from __future__ import annotations

import math

import pytest
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.afm import AFM, AFMConfig
from training.modules import AttentionalPooling, FactorizationMachine
from training.registry import ModelOptionError, get_model

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def _brute_force(pool: AttentionalPooling, v: torch.Tensor) -> tuple[list[list[float]], list[list[float]]]:
    """The weights and the pooled vector of every sample by loops over the pairs i < j, in plain floats."""
    W, b, h = pool.attention.weight.tolist(), pool.attention.bias.tolist(), pool.score.weight[0].tolist()
    weights, pooled = [], []
    for sample in v.tolist():
        products = [[x * y for x, y in zip(sample[i], sample[j])]
                    for i in range(len(sample)) for j in range(i + 1, len(sample))]
        scores = [sum(h_k * max(0.0, sum(w * p for w, p in zip(W_k, prod)) + b_k) for W_k, b_k, h_k in zip(W, b, h))
                  for prod in products]
        total = sum(math.exp(s) for s in scores)
        a = [math.exp(s) / total for s in scores]
        weights.append(a)
        pooled.append([sum(a_p * prod[d] for a_p, prod in zip(a, products)) for d in range(len(sample[0]))])
    return weights, pooled


def _model() -> AFM:
    torch.manual_seed(0)
    model = AFM(VOCAB, AFMConfig(embedding_dim=4, attention_factor=3, init_range=0.5, dense_features=DENSE)).eval()
    with torch.no_grad():  # the first-order weights and the bias start at 0: make them count
        for bag in model.linear_arch.first_order.weights.values():
            bag.weight.normal_(0, 0.3)
        model.linear_arch.first_order.bias.fill_(0.1)
        model.over_arch[1].weight.normal_(0, 1.0)  # p starts at ones: make each dimension count differently
    return model


def test_attention_weights_sum_to_one_and_the_pooled_vector_is_the_weighted_sum_over_pairs():
    torch.manual_seed(0)
    pool = AttentionalPooling(embedding_dim=3, attention_factor=5)
    v = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))  # (B, F, D): 6 pairs
    pooled, weights = pool(v)
    assert pooled.shape == (2, 3) and weights.shape == (2, 6)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    want_weights, want_pooled = _brute_force(pool, v)
    torch.testing.assert_close(weights, torch.tensor(want_weights), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, torch.tensor(want_pooled), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 6))  # the weights are not FM's uniform ones
    with pytest.raises(ValueError, match="F >= 2"):
        pool(torch.zeros(2, 1, 3))


@torch.no_grad()
def test_logit_is_the_linear_part_plus_p_over_the_attention_pooled_pairs():
    model = _model()
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt, dense)
    assert logits.shape == (2,)
    first = model.linear_arch.first_order
    _, pooled = _brute_force(model.interaction_arch, model.sparse_arch(kjt))
    p = model.over_arch[1].weight[0].tolist()
    want = []
    for row, z, vec in zip(_rows(), dense, pooled):
        linear = first.bias.item() + float(model.linear_arch.dense_linear.weight[0] @ z)
        for name, table in first.table_of.items():
            ids = row[name] if isinstance(row[name], list) else [row[name]]
            linear += sum(first.weights[table].weight[i, 0].item() for i in ids)
        want.append(linear + sum(p_d * x for p_d, x in zip(p, vec)))
    torch.testing.assert_close(logits, torch.tensor(want), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_at_the_start_with_uniform_attention_the_interaction_is_fm_averaged_over_the_pairs():
    model = AFM(VOCAB, AFMConfig(embedding_dim=4, init_range=0.5)).eval()
    assert model.over_arch[1].weight.eq(1.0).all()  # p = 1
    model.interaction_arch.score.weight.zero_()  # h = 0: a_ij = 1 / P
    emb = model.sparse_arch(kjt_of_rows(_rows()))  # (B, F, D)
    pooled, weights = model.interaction_arch(emb)
    pairs = emb.shape[1] * (emb.shape[1] - 1) // 2
    torch.testing.assert_close(weights, torch.full((2, pairs), 1 / pairs))
    torch.testing.assert_close(model.over_arch(pooled).squeeze(1), FactorizationMachine()(emb) / pairs)


def test_dense_features_enter_linearly_only():
    model = _model()
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    step = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    w = model.linear_arch.dense_linear.weight[0]  # (F_dense,)
    torch.testing.assert_close(model(kjt, dense + step) - model(kjt, dense), step @ w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dense"):
        model(kjt)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        AFMConfig(embedding_dim=10)
    with pytest.raises(ValueError, match="attention_factor"):
        AFMConfig(attention_factor=0)
    with pytest.raises(ValueError, match="dropout"):
        AFMConfig(dropout=1.0)
    with pytest.raises(ModelOptionError, match="attention_factor"):
        get_model("afm").make_config({"attention_factor": "0"})
