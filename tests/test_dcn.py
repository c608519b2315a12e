"""DCN: the cross layer x_0 * (x_l . w) + b + x_l by hand for one and two layers, the logit by hand from its parts
(x_0 = [embeddings, dense], the cross network and the DNN side by side, one output unit), the config's checks."""

from __future__ import annotations

import pytest
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.dcn import DCN, DCNConfig
from training.modules import CrossNetwork
from training.registry import ModelOptionError, get_model

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def _cross_by_hand(x0: list[float], weights: list[list[float]], biases: list[list[float]]) -> list[float]:
    x = list(x0)
    for w, b in zip(weights, biases):
        s = sum(x_k * w_k for x_k, w_k in zip(x, w))  # x_l . w_l, one scalar
        x = [x0_k * s + b_k + x_k for x0_k, b_k, x_k in zip(x0, b, x)]
    return x


def test_one_cross_layer_by_hand():
    cross = CrossNetwork(3, num_layers=1)
    with torch.no_grad():
        cross.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        cross.bias.copy_(torch.tensor([[0.1, 0.2, 0.3]]))
    x0 = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    # row 0: x.w = 0.5 - 2 + 6 = 4.5 -> x0 * 4.5 + b + x0 = (5.6, 11.2, 16.8)
    # row 1: x.w = 0 + 1 + 2 = 3 -> (0.1, -3.8, 4.3)
    torch.testing.assert_close(cross(x0), torch.tensor([[5.6, 11.2, 16.8], [0.1, -3.8, 4.3]]))


def test_two_cross_layers_by_hand():
    cross = CrossNetwork(3, num_layers=2)
    with torch.no_grad():
        cross.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]))
        cross.bias.copy_(torch.tensor([[0.1, 0.2, 0.3], [-0.1, 0.0, 0.1]]))
    x0 = torch.tensor([[1.0, 2.0, 3.0]])
    # layer 1 as above: x_1 = (5.6, 11.2, 16.8); x_1.w_1 = 5.6 - 8.4 = -2.8
    # x_2 = x0 * -2.8 + b_1 + x_1 = (-2.8 - 0.1 + 5.6, -5.6 + 11.2, -8.4 + 0.1 + 16.8) = (2.7, 5.6, 8.5)
    torch.testing.assert_close(cross(x0), torch.tensor([[2.7, 5.6, 8.5]]))
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    want = [_cross_by_hand(row, cross.weight.tolist(), cross.bias.tolist()) for row in x0.tolist()]
    torch.testing.assert_close(cross(x0), torch.tensor(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        cross(torch.zeros(4, 5))


@torch.no_grad()
def test_logit_is_one_unit_over_the_cross_output_and_the_dnn_of_x0():
    torch.manual_seed(0)
    config = DCNConfig(embedding_dim=4, cross_layers=2, hidden=(8,), init_range=0.5, dense_features=DENSE)
    model = DCN(VOCAB, config).eval()
    with torch.no_grad():
        model.interaction_arch.bias.normal_(0, 0.3)  # the cross biases start at 0: make them count
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt, dense)
    assert logits.shape == (2,)
    emb = model.sparse_arch(kjt)  # (B, F, D)
    layer, out = model.dense_arch.layers[0], model.over_arch
    want = []
    for b in range(2):
        x0 = emb[b].flatten().tolist() + dense[b].tolist()  # the dense features are x_0's last columns
        assert len(x0) == model.interaction_arch.in_features == len(model.sparse_arch.feature_names) * 4 + 2
        x_cross = _cross_by_hand(x0, model.interaction_arch.weight.tolist(), model.interaction_arch.bias.tolist())
        hidden = torch.relu(layer.weight @ torch.tensor(x0) + layer.bias)  # (H,)
        want.append(float(out.weight[0] @ torch.cat([torch.tensor(x_cross), hidden])) + out.bias.item())
    torch.testing.assert_close(logits, torch.tensor(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        model(kjt)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        DCNConfig(embedding_dim=18)
    with pytest.raises(ValueError, match="cross_layers"):
        DCNConfig(cross_layers=0)
    with pytest.raises(ValueError, match="hidden layer"):
        DCNConfig(hidden=())
    assert get_model("dcn").make_config({"cross_layers": "5"}).cross_layers == 5
    with pytest.raises(ModelOptionError, match="cross_layers"):
        get_model("dcn").make_config({"cross_layers": "0"})
