"""Sharded DeepFM (DistributedModelParallel, 2 gloo processes on CPU) against the unsharded model with the same
weights: same logits, same dense gradients, same embedding update; each rank holds only its shards."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked

pytestmark = pytest.mark.integration

WORLD = 2
BATCH = 8  # rows per rank
LR = 0.5


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))
    return [{"user_idx": r(30), "item_idx": r(40), "age_idx": r(8), "gender_idx": r(3), "occupation_idx": r(22),
             "zip_idx": r(12), "genre_idx": [r(20) for _ in range(r(4))]} for _ in range(n)]


def _worker(rank: int, port: int, strategy: str, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from training.data import kjt_of_rows, synthetic_vocab_sizes
    from training.distributed import ShardingConfig, gather_full_state_dict, load_full_state_dict, placements
    from training.distributed import plan_sharding, shard_model
    from training.models import DeepFM, DeepFMConfig

    vocab = synthetic_vocab_sizes()
    config = DeepFMConfig(embedding_dim=8, hidden=(16, 8), dropout=0.0, dense_features=("a", "b", "c"))
    torch.manual_seed(0)
    reference = DeepFM(vocab, config)
    with torch.no_grad():  # non-zero first-order weights so that they are compared too
        for bag in reference.interaction_arch.first_order.weights.values():
            bag.weight.normal_(0, 0.1)
    rows = _rows(WORLD * BATCH, seed=1)
    dense = torch.randn(WORLD * BATCH, 3, generator=torch.Generator().manual_seed(2))  # (B, F_dense)
    full_sd = {k: v.clone() for k, v in reference.state_dict().items()}

    sharded = DeepFM(vocab, config, sparse_device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, sharded.sparse_arch.parameters(), {"lr": LR})
    plan = plan_sharding(sharded, WORLD, ShardingConfig(strategy=strategy))
    where = placements(plan)
    dmp = shard_model(sharded, plan)
    load_full_state_dict(dmp, full_sd)

    # each rank holds only its own shards
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            table = key.split(".")[-2]
            owners = {int(r) for r in where[table].split("@rank")[1].split(",")}
            assert bool(value.local_shards()) == (rank in owners), (rank, table, where[table])
            if strategy == "row_wise":
                assert sum(s.tensor.shape[0] for s in value.local_shards()) < value.size(0)
    if strategy == "planner":
        assert {p.split("@rank")[1] for p in where.values()} == {"0", "1"}, where
        assert all(p.startswith("table_wise@") for p in where.values())

    # forward: this rank's rows through the sharded model == the same rows through the unsharded one
    local = rows[rank * BATCH:(rank + 1) * BATCH]
    local_dense = dense[rank * BATCH:(rank + 1) * BATCH]
    logits = dmp(kjt_of_rows(local), local_dense)
    expected = reference(kjt_of_rows(local), local_dense)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)

    # backward: DDP averages dense gradients over ranks, and TorchRec's embedding all-to-all divides the tables'
    # gradients by the world size the same way (gradient division), so both see the mean over the ranks
    logits.sum().backward()
    all_logits = reference(kjt_of_rows(rows), dense)
    all_logits.sum().backward()
    dense_ref = dict(reference.named_parameters())
    for name, p in dmp.named_parameters():
        if "embedding_bags" in name or p.grad is None:
            continue
        key = name.replace("_dmp_wrapped_module.module.", "").replace("module.", "", 1) if name not in dense_ref \
            else name
        torch.testing.assert_close(p.grad, dense_ref[key].grad / WORLD, rtol=1e-4, atol=1e-6)
    gathered = gather_full_state_dict(dmp)
    if rank == 0:
        for key, value in reference.state_dict().items():
            if "embedding_bags" in key:
                updated = value - LR * dense_ref[key].grad / WORLD  # TorchRec divides table grads by world size too
                torch.testing.assert_close(gathered[key], updated, rtol=1e-4, atol=1e-6)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.parametrize("strategy", ["planner", "row_wise"])
def test_sharded_deepfm_matches_unsharded(strategy, tmp_path):
    spawn_checked(_worker, (free_port(), strategy), WORLD, tmp_path)
