"""Every registered model trained on the CTR samples, sharded by the planner over 2 gloo processes on CPU, gives the
same logits as the unsharded model with the same weights (TorchRec's own multi-process check, for each model of
the registry: a new model is covered by registering it)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked
from training.registry import list_models

pytestmark = pytest.mark.integration

WORLD, BATCH = 2, 6  # rows per rank
DENSE = ("user_prior_rating", "item_prior_events")


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    rows = []
    for _ in range(n):
        history = [r(1, 40) for _ in range(r(0, 6))]
        rows.append({"user_idx": r(0, 30), "item_idx": r(1, 40), "age_idx": r(0, 8), "gender_idx": r(0, 3),
                     "occupation_idx": r(0, 22), "zip_idx": r(0, 12), "genre_idx": [r(1, 20) for _ in range(r(0, 4))],
                     "hist_item_idx": history, "hist_rating": [r(1, 6) for _ in history]})
    return rows


def _worker(rank: int, port: int, name: str, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from training.data import kjt_of_rows, synthetic_vocab_sizes
    from training.distributed import ShardingConfig, load_full_state_dict, plan_sharding, shard_model
    from training.registry import get_model

    spec, vocab = get_model(name), synthetic_vocab_sizes()
    config = spec.default_config()
    if any(f.name == "dense_features" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, dense_features=DENSE)
    features = spec.features_of(config)
    torch.manual_seed(0)
    reference = spec.build(vocab, config).eval()
    with torch.no_grad():  # the 1-dim weights (first order, crosses, biases) start at 0: make them count
        for key, p in reference.named_parameters():
            if "embedding_bags" not in key and "embeddings" not in key and p.dim() == 2 and p.shape[1] == 1:
                p.normal_(0, 0.3)
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    sharded = spec.build(vocab, config, torch.device("meta"))
    dmp = shard_model(sharded, plan_sharding(sharded, WORLD, ShardingConfig(strategy="planner")))
    load_full_state_dict(dmp, full)
    dmp.eval()
    rows = _rows(WORLD * BATCH, seed=1)[rank * BATCH:(rank + 1) * BATCH]
    dense = torch.randn(BATCH, len(DENSE), generator=torch.Generator().manual_seed(rank))  # (B, F_dense)
    with torch.no_grad():
        got = dmp(kjt_of_rows(rows, features), dense)
        want = reference(kjt_of_rows(rows, features), dense)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.parametrize("name", list_models(task="ctr"))
def test_sharded_model_matches_unsharded(name, tmp_path):
    spawn_checked(_worker, (free_port(), name), WORLD, tmp_path)
