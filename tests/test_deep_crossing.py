"""Deep Crossing: the residual unit ReLU(x + W_2 ReLU(W_1 x + b_1) + b_2) by hand, a unit with zero inner weights is
ReLU(x), the logit by hand from its parts (x_0 = [embeddings, dense], the residual units in turn, one scoring unit),
the config's checks."""

from __future__ import annotations

import pytest
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.deep_crossing import DeepCrossing, DeepCrossingConfig
from training.modules import ResidualUnit
from training.registry import ModelOptionError, get_model

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def _relu(v: list[float]) -> list[float]:
    return [max(0.0, a) for a in v]


def _unit_by_hand(x: list[float], w1: list[list[float]], b1: list[float], w2: list[list[float]],
                  b2: list[float]) -> list[float]:
    h = _relu([sum(w * a for w, a in zip(row, x)) + b for row, b in zip(w1, b1)])  # (H,)
    r = [sum(w * a for w, a in zip(row, h)) + b for row, b in zip(w2, b2)]  # (d,)
    return _relu([a + c for a, c in zip(x, r)])


def _set(unit: ResidualUnit, w1, b1, w2, b2) -> None:
    with torch.no_grad():
        unit.inner.weight.copy_(torch.tensor(w1))
        unit.inner.bias.copy_(torch.tensor(b1))
        unit.outer.weight.copy_(torch.tensor(w2))
        unit.outer.bias.copy_(torch.tensor(b2))


def test_one_residual_unit_by_hand():
    unit = ResidualUnit(3, hidden=2)
    w1, b1 = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]], [0.0, -1.0]
    w2, b2 = [[1.0, 0.0], [-1.0, 2.0], [0.0, -3.0]], [0.5, 0.0, -0.5]
    _set(unit, w1, b1, w2, b2)
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, -1.0, 0.0]])
    # row 0: W_1 x + b_1 = (1 - 3, 3 - 1) = (-2, 2) -> h = (0, 2); W_2 h + b_2 = (0.5, 4, -6.5)
    #        x + that = (1.5, 6, -3.5) -> (1.5, 6, 0)
    # row 1: W_1 x + b_1 = (2, 0.5 - 1) = (2, -0.5) -> h = (2, 0); W_2 h + b_2 = (2.5, -2, -0.5)
    #        x + that = (4.5, -3, -0.5) -> (4.5, 0, 0)
    want = torch.tensor([[1.5, 6.0, 0.0], [4.5, 0.0, 0.0]])
    torch.testing.assert_close(unit(x), want)
    torch.testing.assert_close(unit(x), torch.tensor([_unit_by_hand(r, w1, b1, w2, b2) for r in x.tolist()]))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        unit(torch.zeros(4, 5))


def test_a_unit_with_zero_inner_weights_is_relu_of_its_input():
    unit = ResidualUnit(4, hidden=3)
    with torch.no_grad():
        unit.outer.weight.zero_()
        unit.outer.bias.zero_()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert (x < 0).any()  # the ReLU after the addition has something to clip
    torch.testing.assert_close(unit(x), torch.relu(x))
    with torch.no_grad():  # W_1, b_1 no longer matter once W_2 and b_2 are 0; zeroing every weight gives the same
        unit.inner.weight.zero_()
        unit.inner.bias.zero_()
    torch.testing.assert_close(unit(x), torch.relu(x))


@torch.no_grad()
def test_logit_is_the_scoring_unit_over_the_residual_units_of_x0():
    torch.manual_seed(0)
    config = DeepCrossingConfig(embedding_dim=4, residual_units=2, residual_hidden=5, init_range=0.5,
                                dense_features=DENSE)
    model = DeepCrossing(VOCAB, config).eval()
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt, dense)
    assert logits.shape == (2,)
    emb = model.sparse_arch(kjt)  # (B, F, D)
    units = list(model.dense_arch)
    assert len(units) == 2 and all(isinstance(u, ResidualUnit) for u in units)
    want = []
    for b in range(2):
        x = emb[b].flatten().tolist() + dense[b].tolist()  # the dense features are x_0's last columns
        assert len(x) == units[0].in_features == len(model.sparse_arch.feature_names) * 4 + 2
        for u in units:
            x = _unit_by_hand(x, u.inner.weight.tolist(), u.inner.bias.tolist(), u.outer.weight.tolist(),
                              u.outer.bias.tolist())
        want.append(float(model.over_arch.weight[0] @ torch.tensor(x)) + model.over_arch.bias.item())
    torch.testing.assert_close(logits, torch.tensor(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        model(kjt)


def test_output_shape_without_dense_features_and_with_dropout():
    model = DeepCrossing(VOCAB, DeepCrossingConfig(residual_units=1, dropout=0.5))
    assert model(kjt_of_rows(_rows() * 3)).shape == (6,)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.dense_arch) == 1


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        DeepCrossingConfig(embedding_dim=18)
    with pytest.raises(ValueError, match="residual_units"):
        DeepCrossingConfig(residual_units=0)
    with pytest.raises(ValueError, match="residual_hidden"):
        DeepCrossingConfig(residual_hidden=0)
    with pytest.raises(ValueError, match="dropout"):
        DeepCrossingConfig(dropout=1.0)
    with pytest.raises(ValueError, match="H >= 1"):
        ResidualUnit(3, hidden=0)
    spec = get_model("deep_crossing")
    assert (spec.kind, spec.task) == ("ranker", "ctr")
    assert spec.make_config({"residual_units": "5", "residual_hidden": "64"}).residual_units == 5
    with pytest.raises(ModelOptionError, match="residual_units"):
        spec.make_config({"residual_units": "0"})
