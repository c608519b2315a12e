"""Logistic regression: the logit is the sum of the weights of the row's ids (column 0 of the 4-wide rows) plus the
bias, the padding columns are never read nor trained, and the dense features enter linearly."""

from __future__ import annotations

import pytest
import torch

from features.definitions import SPARSE_FEATURES
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.logistic_regression import WEIGHT_WIDTH, LogisticRegression, LogisticRegressionConfig

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def _table(model: LogisticRegression, name: str) -> torch.Tensor:
    return model.sparse_arch.embedding_bag_collection.embedding_bags[name].weight


def test_logit_is_the_sum_of_the_ids_weights_plus_the_bias():
    model = LogisticRegression(VOCAB).eval()
    with torch.no_grad():
        for f in SPARSE_FEATURES:
            _table(model, f.table)[:, 1:] = 100.0  # the padding columns: never read
        _table(model, "t_user")[1, 0] = 0.5
        _table(model, "t_item")[2, 0] = -0.25
        _table(model, "t_genre")[2, 0], _table(model, "t_genre")[7, 0] = 1.0, 2.0  # multi-hot: summed
        _table(model, "t_zip")[2, 0] = 3.0  # the second row's zip
        model.over_arch.bias.fill_(-1.0)
    logits = model(kjt_of_rows(_rows()))
    assert logits.shape == (2,)
    assert logits.tolist() == [0.5 - 0.25 + 1.0 + 2.0 - 1.0, 3.0 - 1.0]


def test_logit_matches_a_loop_over_every_id_and_only_column_0_is_trained():
    torch.manual_seed(0)
    model = LogisticRegression(VOCAB, LogisticRegressionConfig(init_range=0.5))
    kjt = kjt_of_rows(_rows())
    logits = model(kjt)
    want = []
    for row in _rows():
        w = model.over_arch.bias.item()
        for f in SPARSE_FEATURES:
            ids = row[f.name] if f.multi_hot else [row[f.name]]
            w += sum(_table(model, f.table)[i, 0].item() for i in ids)
        want.append(w)
    torch.testing.assert_close(logits, torch.tensor(want))
    logits.sum().backward()
    grad = _table(model, "t_user").grad  # (V, 4)
    assert grad.shape[1] == WEIGHT_WIDTH and grad[:, 1:].abs().sum() == 0
    assert grad[1, 0] == 1.0 and grad[4, 0] == 1.0 and grad[2, 0] == 0.0  # d logit / d w_user[id]


def test_dense_features_enter_as_a_linear_term():
    model = LogisticRegression(VOCAB, LogisticRegressionConfig(dense_features=DENSE)).eval()
    with torch.no_grad():
        model.over_arch.dense_linear.weight.copy_(torch.tensor([[2.0, -3.0]]))
        _table(model, "t_user")[1, 0] = 0.5
    dense = torch.tensor([[1.0, 1.0], [0.5, 2.0]])  # (B, F_dense)
    assert model(kjt_of_rows(_rows()), dense).tolist() == [0.5 + 2.0 - 3.0, 1.0 - 6.0]
    with pytest.raises(ValueError, match="dense"):
        model(kjt_of_rows(_rows()))


def test_config_rejects_a_negative_init_range():
    with pytest.raises(ValueError, match="init_range"):
        LogisticRegressionConfig(init_range=-0.1)


WORLD, LR_SPARSE = 2, 0.01


def _sharded_worker(rank: int, port: int, done_dir: str) -> None:
    import os

    import torch.distributed as dist
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from _spawn import mark_done
    from training.distributed import (ShardingConfig, gather_full_state_dict, load_full_state_dict, plan_sharding,
                                      shard_model)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    config = LogisticRegressionConfig(dense_features=DENSE)
    torch.manual_seed(0)
    reference = LogisticRegression(VOCAB, config).eval()
    with torch.no_grad():
        for f in SPARSE_FEATURES:
            _table(reference, f.table).normal_(0, 0.3)  # column 0 the weights, 1-3 whatever: never read
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    sharded = LogisticRegression(VOCAB, config, torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, sharded.sparse_arch.parameters(), {"lr": LR_SPARSE})
    dmp = shard_model(sharded, plan_sharding(sharded, WORLD, ShardingConfig(strategy="planner")))
    load_full_state_dict(dmp, full)
    rows = _rows()[rank:rank + 1]  # one row per rank: users 1 and 4
    dense = torch.tensor([[0.5, -1.0]])  # (1, F_dense)
    got = dmp(kjt_of_rows(rows), dense)
    torch.testing.assert_close(got, reference(kjt_of_rows(rows), dense), rtol=1e-5, atol=1e-5)
    got.sum().backward()  # the fused row-wise Adagrad steps inside backward
    after = gather_full_state_dict(dmp)
    if rank == 0:
        key = "sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"
        want = full[key].clone()
        want[[1, 4], 0] -= 2 * LR_SPARSE  # first step: lr g / sqrt(mean over 4 columns of g^2) = 2 lr sign(g)
        torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration
def test_sharded_weights_match_and_a_fused_adagrad_step_moves_column_0_only(tmp_path):
    """Over 2 gloo ranks with nonzero weights (the registry's sharding test sees LR's zero start): the same logits
    as unsharded, and the first fused row-wise Adagrad step moves each looked-up weight by 2 x lr_sparse (the
    module docstring's claim) and leaves the padding columns alone."""
    from _spawn import free_port, spawn_checked

    spawn_checked(_sharded_worker, (free_port(),), WORLD, tmp_path)
