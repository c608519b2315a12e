"""Mini-batch aware regularisation (Zhou et al. 2018, section 4.2): n_j counted once per sample, the penalty's
gradient ``lambda * w_j / n_j`` on each row the batch touched (once, however often it occurs), none elsewhere, the
same through DistributedModelParallel's fused table optimizer, and ``mba_lambda = 0`` giving the previous loss."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked
from training.data import CtrBatch, kjt_of_rows, synthetic_vocab_sizes
from training.models import DIN, DIN_FEATURES, DeepFM, DeepFMConfig, DINConfig
from training.modules.regularization import MiniBatchAwareL2, sample_counts
from training.registry import get_model
from training.tasks.ctr import CtrObjective
from training.trainer import TrainOptions

LAM = 0.3
USER_T = "sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"
ITEM_T = "sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight"


def _row(user: int, item: int, hist: list[int] | None = None) -> dict:
    row = {"user_idx": user, "item_idx": item, "age_idx": 1, "gender_idx": 1, "occupation_idx": 2, "zip_idx": 3,
           "genre_idx": [1, 4]}
    return row if hist is None else row | {"hist_item_idx": hist}


def _batch(rows: list[dict], features=None, weight=None) -> CtrBatch:
    kjt = kjt_of_rows(rows) if features is None else kjt_of_rows(rows, features)
    n = len(rows)
    w = torch.ones(n) if weight is None else torch.tensor(weight, dtype=torch.float32)
    return CtrBatch(kjt, torch.tensor([1.0, 0.0] * (n // 2) + [1.0] * (n % 2)), w, torch.zeros(n, dtype=torch.int64))


def _counts(vocab: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"t_user": torch.randint(1, 50, (vocab["user"],), generator=g),
            "t_item": torch.randint(1, 50, (vocab["item"],), generator=g)}


def _expected_grad(table: torch.Tensor, touched: list[int], n: torch.Tensor, lam: float = LAM) -> torch.Tensor:
    """The paper's term on the touched rows (each once), 0 on every other row."""
    expected = torch.zeros_like(table)
    for j in set(touched):
        expected[j] = lam * table[j] / n[j]
    return expected


def test_sample_counts_once_per_sample_and_truncated():
    user = np.array([3, 3, 1, 0])
    assert sample_counts(5, [user]).tolist() == [1, 1, 0, 2, 0]
    # item table: candidates [2, 2, 4] and histories [2, 2, 1], [], [4, 1, 3]; max_history 2 keeps [4, 1] of the last
    cand = np.array([2, 2, 4])
    hist = (np.array([2, 2, 1, 4, 1, 3]), np.array([0, 3, 3, 6]), 2)
    # sample 0 holds {2} (candidate and twice in its history: once), sample 1 {2}, sample 2 {4, 1} (3 cut off)
    assert sample_counts(6, [cand], [hist]).tolist() == [0, 1, 2, 0, 1, 0]
    with pytest.raises(ValueError, match="different numbers of samples"):
        sample_counts(6, [cand], [(hist[0], np.array([0, 6]), 2)])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        sample_counts(3, [np.array([0, 3])])


def test_penalty_alone_matches_the_papers_term():
    w = torch.randn(6, 4, requires_grad=True)
    n = torch.tensor([0, 1, 2, 3, 4, 5])
    ids = torch.tensor([2, 5, 2, 2, 1])
    penalty = MiniBatchAwareL2({"t": n}, LAM)({"t": [(ids, w[ids])]})
    expected = 0.5 * LAM * sum(float(w[j].detach().pow(2).sum()) / int(n[j]) for j in (1, 2, 5))
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    torch.testing.assert_close(w.grad, _expected_grad(w.detach(), [1, 2, 5], n.float()))
    with pytest.raises(ValueError, match=">= 0"):
        MiniBatchAwareL2({"t": n}, -1.0)


def test_deepfm_penalty_gradient_on_touched_rows_only():
    torch.manual_seed(0)
    vocab = synthetic_vocab_sizes()
    model = DeepFM(vocab, DeepFMConfig(embedding_dim=8, hidden=(16,), dropout=0.0))
    counts = _counts(vocab)
    objective = CtrObjective(model, get_model("deepfm").id_lookups, counts, LAM)
    # user 7 three times, item 11 twice; the last row is padding (weight 0): user 29 / item 39 are not penalised
    rows = [_row(7, 11), _row(7, 12), _row(7, 11), _row(2, 5), _row(29, 39)]
    total, data, penalty = objective(_batch(rows, weight=[1, 1, 1, 1, 0]))
    params = dict(model.named_parameters())
    penalty.backward()
    user_t, item_t = params[USER_T], params[ITEM_T]
    torch.testing.assert_close(user_t.grad, _expected_grad(user_t.detach(), [7, 2], counts["t_user"].float()))
    torch.testing.assert_close(item_t.grad, _expected_grad(item_t.detach(), [11, 12, 5], counts["t_item"].float()))
    assert total.item() == pytest.approx(data.item() + penalty.item(), rel=1e-6)
    # the data part is untouched by the penalty: the objective's gradient = data gradient + the paper's term
    model.zero_grad()
    objective(_batch(rows, weight=[1, 1, 1, 1, 0]))[1].backward()
    data_grad = user_t.grad.clone()
    model.zero_grad()
    objective(_batch(rows, weight=[1, 1, 1, 1, 0]))[0].backward()
    torch.testing.assert_close(user_t.grad - data_grad,
                               _expected_grad(user_t.detach(), [7, 2], counts["t_user"].float()))


def test_din_penalty_counts_candidate_and_history_rows_once():
    torch.manual_seed(1)
    vocab = synthetic_vocab_sizes()
    config = DINConfig(embedding_dim=8, attention_hidden=(6,), hidden=(16,), dropout=0.0, max_history=3,
                       history_ratings=False)
    model = DIN(vocab, config)
    counts = _counts(vocab, seed=1)
    objective = CtrObjective(model, get_model("din").id_lookups, counts, LAM)
    # item 9: candidate of row 0 and in two histories; item 33 lies beyond max_history (not looked up); row 3 is
    # padding (its user 28, items 38 and 37 are not penalised)
    rows = [_row(4, 9, [9, 20, 21]), _row(4, 10, [9, 22, 23, 33]), _row(6, 9, []), _row(28, 38, [37])]
    _, _, penalty = objective(_batch(rows, DIN_FEATURES, weight=[1, 1, 1, 0]))
    penalty.backward()
    params = dict(model.named_parameters())
    user_t = params["sparse_arch.pooled.embedding_bag_collection.embedding_bags.t_user.weight"]
    item_t = params["sparse_arch.sequence.embedding_collection.embeddings.t_item.weight"]
    torch.testing.assert_close(user_t.grad, _expected_grad(user_t.detach(), [4, 6], counts["t_user"].float()))
    torch.testing.assert_close(item_t.grad, _expected_grad(item_t.detach(), [9, 20, 21, 10, 22, 23],
                                                           counts["t_item"].float()))


def test_lambda_zero_is_exactly_the_previous_loss():
    torch.manual_seed(2)
    model = DeepFM(synthetic_vocab_sizes(), DeepFMConfig(embedding_dim=8, hidden=(16,), dropout=0.0))
    batch = _batch([_row(1, 2), _row(3, 4), _row(5, 6)], weight=[1, 1, 0])
    objective = CtrObjective(model, get_model("deepfm").id_lookups, None, 0.0)
    total, data, penalty = objective(batch)
    previous = (torch.nn.BCEWithLogitsLoss(reduction="none")(model(batch.features), batch.label)
                * batch.weight).sum() / batch.weight.sum().clamp_min(1.0)  # _train_ctr's loss before the penalty
    assert penalty is None and total is data and torch.equal(total, previous)
    assert not model.sparse_arch._forward_hooks  # nothing attached when off
    assert TrainOptions(model="deepfm").mba_lambda == 0.0 and TrainOptions(model="din").mba_lambda == 0.0
    with pytest.raises(ValueError, match="mba_lambda"):
        TrainOptions(model="item2vec", mba_lambda=0.1)


LR = 0.5


def _fused_worker(rank: int, port: int, done_dir: str) -> None:
    """One rank, DMP with TorchRec's fused in-backward SGD on the tables: the penalty moves exactly the touched
    rows by ``-LR * lambda * w_j / n_j`` on top of the data step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from training.distributed import ShardingConfig, gather_full_state_dict, load_full_state_dict
    from training.distributed import plan_sharding, shard_model

    vocab, config = synthetic_vocab_sizes(), DeepFMConfig(embedding_dim=8, hidden=(16,), dropout=0.0)
    torch.manual_seed(3)
    full_sd = {k: v.clone() for k, v in DeepFM(vocab, config).state_dict().items()}
    counts = _counts(vocab, seed=3)
    rows = [_row(7, 11), _row(7, 12), _row(3, 11)]
    after = {}
    for lam in (0.0, LAM):
        model = DeepFM(vocab, config, sparse_device=torch.device("meta"))
        apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": LR})
        dmp = shard_model(model, plan_sharding(model, 1, ShardingConfig()))
        load_full_state_dict(dmp, full_sd)
        CtrObjective(dmp, get_model("deepfm").id_lookups, counts, lam)(_batch(rows))[0].backward()  # the fused kernel steps here
        after[lam] = gather_full_state_dict(dmp)
    for key, touched, n in ((USER_T, [7, 3], counts["t_user"]), (ITEM_T, [11, 12], counts["t_item"])):
        step = after[LAM][key] - after[0.0][key]
        torch.testing.assert_close(step, -LR * _expected_grad(full_sd[key], touched, n.float()), rtol=1e-4,
                                   atol=1e-7)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


def test_fused_table_optimizer_applies_the_penalty(tmp_path):
    spawn_checked(_fused_worker, (free_port(),), 1, tmp_path)
