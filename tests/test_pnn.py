"""PNN: the inner products of every field pair and the sum-pooled outer product by hand (explicit loops over fields
and pairs), the product layer's modes, the logit by hand from its parts (l_1 = relu(W_z z + W_p p + b_1) with z the
embeddings and the dense features, then the hidden layers and one output unit) for each product mode, the config's
checks."""

from __future__ import annotations

import pytest
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.pnn import PNN, PNNConfig
from training.modules import ProductLayer
from training.modules.product import inner_products, outer_product
from training.registry import ModelOptionError, get_model

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")
MODES = ("inner", "outer", "both")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def _inner_by_hand(fields: list[list[float]]) -> list[float]:
    """<f_i, f_j> for i < j, row-major over the upper triangle."""
    return [sum(a * b for a, b in zip(fields[i], fields[j]))
            for i in range(len(fields)) for j in range(i + 1, len(fields))]


def _outer_by_hand(fields: list[list[float]]) -> list[float]:
    """sum over every (i, j), both orders and i = j, of f_i f_j^T, flattened row-major: no sum-pooling trick."""
    dim = len(fields[0])
    return [sum(f_i[a] * f_j[b] for f_i in fields for f_j in fields) for a in range(dim) for b in range(dim)]


def test_inner_products_by_hand():
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]],
                      [[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]])  # (B=2, F=3, D=2)
    # row 0: (1*3 + 2*4, 1*5 - 2*6, 3*5 - 4*6) = (11, -7, -9); row 1: (0, 1, 2)
    torch.testing.assert_close(inner_products(v), torch.tensor([[11.0, -7.0, -9.0], [0.0, 1.0, 2.0]]))
    v = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))  # (B, F, D)
    want = [_inner_by_hand(row) for row in v.tolist()]
    got = inner_products(v)
    assert got.shape == (3, 10)  # P = 5 * 4 / 2
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_outer_product_is_the_sum_pooled_outer_product_of_every_pair():
    v = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [0.5, 1.0]]])  # (1, 3, 2): f_sigma = (4.5, -1)
    # f_sigma f_sigma^T = [[20.25, -4.5], [-4.5, 1]], flattened row-major
    torch.testing.assert_close(outer_product(v), torch.tensor([[20.25, -4.5, -4.5, 1.0]]))
    torch.testing.assert_close(outer_product(v), torch.tensor([_outer_by_hand(v[0].tolist())]))
    v = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))  # (B, F, D)
    got = outer_product(v)
    assert got.shape == (3, 16)  # D * D
    torch.testing.assert_close(got, torch.tensor([_outer_by_hand(row) for row in v.tolist()]), rtol=1e-5, atol=1e-5)
    f_sigma = v.sum(dim=1)  # (B, D)
    by_hand = [[f_sigma[b, i].item() * f_sigma[b, j].item() for i in range(4) for j in range(4)] for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(by_hand), rtol=1e-5, atol=1e-5)


def test_product_layer_modes_and_errors():
    v = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))  # (B, F=4, D=3)
    widths = {"inner": 6, "outer": 9, "both": 15}
    for mode in MODES:
        layer = ProductLayer(4, 3, mode)
        assert layer.out_features == widths[mode] and layer(v).shape == (2, widths[mode])
    torch.testing.assert_close(ProductLayer(4, 3, "both")(v), torch.cat([inner_products(v), outer_product(v)], 1))
    with pytest.raises(ValueError, match="product must be one of"):
        ProductLayer(4, 3, "kernel")
    with pytest.raises(ValueError, match="F >= 2"):
        ProductLayer(1, 3)
    with pytest.raises(ValueError, match=r"\(B, 4, 3\)"):
        ProductLayer(4, 3)(torch.zeros(2, 4, 5))


@pytest.mark.parametrize("mode", MODES)
def test_output_shape_for_each_product_mode(mode):
    kjt = kjt_of_rows(_rows())
    assert PNN(VOCAB, PNNConfig(product=mode)).eval()(kjt).shape == (2,)
    model = PNN(VOCAB, PNNConfig(product=mode, dense_features=DENSE)).eval()
    assert model(kjt, torch.zeros(2, 2)).shape == (2,)
    with pytest.raises(ValueError, match="dense"):
        model(kjt)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_logit_is_relu_of_lz_plus_lp_then_the_hidden_layers(mode):
    torch.manual_seed(0)
    config = PNNConfig(embedding_dim=4, product=mode, hidden=(8, 4), init_range=0.5, dense_features=DENSE)
    model = PNN(VOCAB, config).eval()
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt, dense)
    emb = model.sparse_arch(kjt)  # (B, F, D)
    num_fields = emb.shape[1]
    width_z = num_fields * 4 + 2
    first, second, out = model.dense_arch.layers[0], model.dense_arch.layers[2], model.over_arch
    w_z, w_p = first.weight[:, :width_z], first.weight[:, width_z:]  # the paper's W_z and W_p
    want = []
    for b in range(2):
        fields = emb[b].tolist()
        z = torch.tensor(emb[b].flatten().tolist() + dense[b].tolist())  # the dense features are z's last columns
        p = {"inner": _inner_by_hand(fields), "outer": _outer_by_hand(fields),
             "both": _inner_by_hand(fields) + _outer_by_hand(fields)}[mode]
        assert w_p.shape[1] == len(p)
        l1 = torch.relu(w_z @ z + w_p @ torch.tensor(p) + first.bias)  # (H_1,)
        l2 = torch.relu(second.weight @ l1 + second.bias)  # (H,)
        want.append(float(out.weight[0] @ l2) + out.bias.item())
    torch.testing.assert_close(logits, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        PNNConfig(embedding_dim=18)
    with pytest.raises(ValueError, match="product must be one of.*'kernel'"):
        PNNConfig(product="kernel")
    with pytest.raises(ValueError, match="hidden layer"):
        PNNConfig(hidden=())
    with pytest.raises(ValueError, match="dropout"):
        PNNConfig(dropout=1.0)
    assert get_model("pnn").make_config({"product": "outer"}).product == "outer"
    with pytest.raises(ModelOptionError, match="product"):
        get_model("pnn").make_config({"product": "Inner"})
