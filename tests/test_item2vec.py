"""item2vec's SGNS scorer (shared by DeepWalk and node2vec): the logits and loss by hand, the tables read through one
EmbeddingCollection, the scorer sharded over 2 gloo ranks = unsharded, in its forward and in one step of the
trainer's fused row-wise Adagrad, and its checkpoint (tables and Adagrad state) resumed; and the skip-gram task's
alias sampler of the negatives."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked
from training.data import sgns_kjt
from training.models.item2vec import ITEM_TABLE, Item2Vec, Item2VecConfig, sgns_loss
from training.registry import get_model, list_models
from training.tasks.skipgram import alias_table, draw_alias

SKIPGRAM_MODELS = list_models(task="skipgram")


def test_item2vec_loss_by_hand():
    model = Item2Vec(4, Item2VecConfig(embedding_dim=4, num_negatives=2))
    tables = model.sparse_arch.embeddings
    with torch.no_grad():
        tables["t_item_in"].weight.copy_(torch.tensor([[0.0] * 4, [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5] * 4]))
        tables["t_item_out"].weight.copy_(torch.tensor([[0.0] * 4, [2.0, 0, 0, 0], [0, 0, 1.0, 0], [1.0] * 4]))
    # pair (center 1, context 1, negatives 3, 2): <u1, v1> = 2, <u1, v3> = 1, <u1, v2> = 0
    # pair (center 3, context 2, negatives 1, 0): <u3, v2> = 0.5, <u3, v1> = 1, <u3, v0> = 0
    logits = model(sgns_kjt(torch.tensor([1, 3]), torch.tensor([1, 2]), torch.tensor([[3, 2], [1, 0]])))
    torch.testing.assert_close(logits, torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.0, 0.0]]))
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))
    first, second = -ls(2.0) - ls(-1.0) - ls(0.0), -ls(0.5) - ls(-1.0) - ls(0.0)
    assert sgns_loss(logits).item() == pytest.approx((first + second) / 2, rel=1e-6)
    # padding rows (weight 0) do not count
    assert sgns_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(first, rel=1e-6)


@pytest.mark.parametrize("name", SKIPGRAM_MODELS)
def test_exported_table_is_the_input_table(name):
    spec = get_model(name)
    config = spec.default_config()
    model = spec.build({"item": 7}, config)
    assert spec.item_table == ITEM_TABLE
    assert sorted(model.state_dict()) == [ITEM_TABLE, ITEM_TABLE.replace("t_item_in", "t_item_out")]
    assert model.state_dict()[ITEM_TABLE].shape == (7, config.embedding_dim)
    # word2vec's initialisation: input rows in [-0.5/D, 0.5/D], output rows zero
    assert model.state_dict()[ITEM_TABLE].abs().max() <= 0.5 / config.embedding_dim
    assert not model.state_dict()[ITEM_TABLE.replace("t_item_in", "t_item_out")].any()


def test_alias_table_gives_back_the_distribution():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(50, 0.3)) * (rng.random(50) > 0.2)  # skewed, some items never drawn
    p /= p.sum()
    accept, alias = alias_table(p)
    # P(k) = (its own column's accept + what the columns aliased to k give away) / R
    np.testing.assert_allclose((accept + np.bincount(alias, weights=1 - accept, minlength=50)) / 50, p, atol=1e-12)
    draws = draw_alias(rng, accept, alias, (100_000, 4))
    assert draws.shape == (100_000, 4) and draws.dtype == np.int64
    assert not np.isin(draws, np.flatnonzero(p == 0)).any()
    freq = np.bincount(draws.ravel(), minlength=50) / draws.size
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / draws.size))  # within 5 binomial std


WORLD, BATCH, ITEMS, LR = 2, 8, 13, 0.3  # ranks, pairs per rank, item rows, the tables' Adagrad lr


def _pairs(rank: int, k: int) -> tuple:
    """This rank's (center (B,), context (B,), negatives (B, K)); the ranks share some ids, so a row's update sums
    the gradients of both ranks."""
    g = torch.Generator().manual_seed(rank)
    return (torch.randint(1, ITEMS, (BATCH,), generator=g), torch.randint(1, ITEMS, (BATCH,), generator=g),
            torch.randint(1, ITEMS, (BATCH, k), generator=g))


def _rowwise_adagrad(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One step of row-wise Adagrad from a zero state: each row's state is the mean of its squared gradient."""
    state = (grad ** 2).mean(dim=1, keepdim=True)  # (R, 1)
    return weight - LR * grad / (state.sqrt() + 1e-8)


def _check_checkpoint_round_trip(dmp, make_dmp, ckpt: str, rank: int, k: int) -> None:
    """Save ``dmp`` (tables and Adagrad state) as the trainer checkpoints it (DCP), load it into a fresh one, and take
    one more step with both: the same tables after it (with the Adagrad state lost, the step would differ)."""
    import torch.distributed.checkpoint as dcp

    from training.distributed import gather_full_state_dict
    from training.trainer import _sharded_state

    dcp.save(_sharded_state(dmp), checkpoint_id=ckpt)
    resumed = make_dmp()
    state = _sharded_state(resumed)
    dcp.load(state, checkpoint_id=ckpt)
    resumed.load_state_dict(state["model"])
    resumed.fused_optimizer.load_state_dict(state["sparse_opt"])
    kjt = sgns_kjt(*_pairs(WORLD + rank, k))
    for model in (dmp, resumed):
        sgns_loss(model(kjt)).backward()
    want, got = gather_full_state_dict(dmp), gather_full_state_dict(resumed)
    if rank == 0:
        assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want), ckpt


def _sharded_worker(rank: int, port: int, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from training.distributed import gather_full_state_dict, load_full_state_dict
    from training.trainer import _build

    for name in SKIPGRAM_MODELS:
        for sharding in ("planner", "row_wise"):
            spec = get_model(name)
            config = spec.default_config()
            torch.manual_seed(0)
            reference = spec.build({"item": ITEMS}, config)
            with torch.no_grad():  # the output table starts at zero: make both tables count
                for p in reference.parameters():
                    p.normal_(0, 0.5)
            full = {k: v.detach().clone() for k, v in reference.state_dict().items()}
            opts = SimpleNamespace(lr_sparse=LR, sharding=sharding, lr_dense=1e-3, weight_decay=0.0)

            def make_dmp():
                return _build(spec.build({"item": ITEMS}, config, torch.device("meta")), opts, WORLD, rank,
                              torch.device("cpu"))

            dmp, _, dense_opt = make_dmp()
            assert dense_opt is None  # the two tables are the whole model
            load_full_state_dict(dmp, full)
            kjt = sgns_kjt(*_pairs(rank, config.num_negatives))
            logits = dmp(kjt)
            torch.testing.assert_close(logits, reference(kjt), rtol=1e-5, atol=1e-5)
            sgns_loss(logits).backward()  # the fused Adagrad updates the tables here
            after = gather_full_state_dict(dmp)
            if rank == 0:  # the same step by hand: each rank's mean loss, gradients summed over the ranks
                loss = sum(sgns_loss(reference(sgns_kjt(*_pairs(r, config.num_negatives)))) for r in range(WORLD))
                loss.backward()
                for key, p in reference.named_parameters():
                    want = _rowwise_adagrad(full[key], p.grad)
                    torch.testing.assert_close(after[key], want, rtol=1e-4, atol=1e-5, msg=f"{name} {sharding} {key}")
                    assert not torch.equal(after[key], full[key])
            _check_checkpoint_round_trip(dmp, lambda: make_dmp()[0], os.path.join(done_dir, f"ckpt-{name}-{sharding}"),
                                         rank, config.num_negatives)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration
def test_sharded_scorer_matches_unsharded_its_adagrad_step_and_checkpoint(tmp_path):
    spawn_checked(_sharded_worker, (free_port(),), WORLD, tmp_path)
