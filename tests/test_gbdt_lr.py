"""GBDT+LR: the tree inputs by hand, the leaves against a plain walk of the booster's dumped trees, the logit as the
sum of the leaves' rows plus the bias, the booster carried by the state dict through the artifact format, and the
trees fitted once on rank 0 by the CTR task and shared by both ranks of a sharded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from training.data import CtrShard, kjt_of_rows, synthetic_vocab_sizes
from training.models.gbdt_lr import GBDTLR, LEAF_TABLE, GBDTLRConfig
from training.modules.gbdt import TreeInputs, TreesNotCompatibleError

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")
CONFIG = GBDTLRConfig(num_trees=6, num_leaves=4, min_data_in_leaf=5, tree_learning_rate=0.3, dense_features=DENSE)
ONE_HOT = ("user_idx", "item_idx", "age_idx", "gender_idx", "occupation_idx", "zip_idx")


def _shard(n: int, seed: int) -> CtrShard:
    """Rows whose label follows the item (a categorical split) and the second dense column (a numerical one)."""
    r = np.random.default_rng(seed)
    ids = {"user_idx": r.integers(0, 30, n), "item_idx": r.integers(1, 40, n), "age_idx": r.integers(0, 8, n),
           "gender_idx": r.integers(0, 3, n), "occupation_idx": r.integers(0, 22, n), "zip_idx": r.integers(0, 12, n)}
    lengths = r.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dense = r.normal(size=(n, len(DENSE))).astype(np.float32)
    label = (np.isin(ids["item_idx"] % 5, (0, 3)) ^ (dense[:, 1] > 1.0)).astype(np.float32)
    return CtrShard(ids, {"genre_idx": r.integers(1, 20, offsets[-1])}, {"genre_idx": offsets}, label,
                    ids["user_idx"], None, dense)


def _rows(shard: CtrShard, rows) -> list[dict]:
    off, genres = shard.offsets["genre_idx"], shard.values["genre_idx"]
    return [{**{f: int(shard.ids[f][i]) for f in ONE_HOT}, "genre_idx": genres[off[i]:off[i + 1]].tolist()}
            for i in rows]


def _fitted(seed: int = 0) -> tuple[GBDTLR, dict]:
    model = GBDTLR(VOCAB, CONFIG)
    fitted, figures = model.prefit(_shard(300, seed), _shard(100, seed + 1), seed=0)
    model.load_prefit(fitted)
    torch.manual_seed(seed)
    with torch.no_grad():
        table = model.sparse_arch.embedding_bag_collection.embedding_bags[LEAF_TABLE].weight
        table[:, 0].normal_()
        table[:, 1:] = 100.0  # the padding columns: never read
        model.bias.fill_(-0.25)
    return model.eval(), figures


def _walk(node: dict, x: np.ndarray) -> int:
    """The leaf of one dumped LightGBM tree (``Booster.dump_model``) that the row ``x`` reaches: the reference the
    booster's ``pred_leaf`` is checked against."""
    while "split_feature" in node:
        v = x[node["split_feature"]]
        if node["decision_type"] == "==":  # categorical: the listed categories go left
            left = int(v) in {int(c) for c in str(node["threshold"]).split("||")}
        else:
            missing = node["missing_type"] == "Zero" and v == 0
            left = node["default_left"] if missing else v <= node["threshold"]
        node = node["left_child"] if left else node["right_child"]
    return node.get("leaf_index", 0)


def test_tree_inputs_by_hand():
    rows = [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7, 2]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]
    dense = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    inputs = TreeInputs.of(SPARSE_FEATURES, VOCAB, DENSE)
    assert inputs.names[:7] == (*ONE_HOT, "genre_idx=1") and inputs.names[-2:] == DENSE
    assert len(inputs.names) == 6 + (VOCAB["genre"] - 1) + 2 and inputs.categorical == tuple(range(6))
    genre = np.zeros((2, VOCAB["genre"] - 1), np.float32)
    genre[0, [1, 6]] = 1.0  # genres 2 and 7 (2 twice: still 1); row 2 has none
    want = np.concatenate([[[1, 2, 3, 1, 5, 4], [4, 9, 0, 2, 1, 2]], genre, dense.numpy()], axis=1)
    got = inputs.of_kjt(kjt_of_rows(rows), dense)
    np.testing.assert_array_equal(got, want)
    shard = CtrShard({f: np.array([r[f] for r in rows]) for f in ONE_HOT}, {"genre_idx": np.array([2, 7, 2])},
                     {"genre_idx": np.array([0, 3, 3])}, np.zeros(2, np.float32), np.array([1, 4]), None,
                     dense.numpy())
    np.testing.assert_array_equal(inputs.of_shard(shard), want)  # what the trees are fitted on = what they read
    two_users = KeyedJaggedTensor.from_lengths_sync(keys=["user_idx"], values=torch.tensor([1, 2]),
                                                    lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match="one-hot"):
        inputs.of_kjt(two_users, None)


def test_leaves_are_the_dumped_trees_and_the_logit_sums_their_rows_plus_the_bias():
    model, figures = _fitted()
    trees = model.trees.booster.dump_model()["tree_info"]
    assert figures["trees"] == model.trees.num_trees == len(trees) >= 2 and figures["train_rows"] == 300
    decisions = {n for t in trees for n in _decisions(t["tree_structure"])}
    assert decisions == {"==", "<="}  # both kinds of split are walked: the item (categorical), the counter
    shard = _shard(40, seed=7)
    kjt, dense = kjt_of_rows(_rows(shard, range(40))), torch.from_numpy(shard.dense)
    x = model.inputs.of_kjt(kjt, dense)  # (B, C)
    walked = np.array([[_walk(t["tree_structure"], row) for t in trees] for row in x])  # (B, T)
    np.testing.assert_array_equal(model.trees.leaves(x), walked)
    assert len({tuple(r) for r in walked}) > 1  # rows reach different leaves
    table = model.sparse_arch.embedding_bag_collection.embedding_bags[LEAF_TABLE].weight.detach().numpy()
    rows = walked + np.arange(len(trees)) * CONFIG.num_leaves  # (B, T): row t * L + leaf
    want = table[rows, 0].sum(axis=1) - 0.25
    with torch.no_grad():
        np.testing.assert_allclose(model(kjt, dense).numpy(), want, rtol=1e-5, atol=1e-5)


def _decisions(node: dict):
    if "split_feature" in node:
        yield node["decision_type"]
        yield from _decisions(node["left_child"])
        yield from _decisions(node["right_child"])


def test_trees_stop_early_on_valid_and_beat_the_base_rate():
    model = GBDTLR(VOCAB, GBDTLRConfig(num_trees=60, num_leaves=4, min_data_in_leaf=5, tree_learning_rate=0.5,
                                       early_stopping_rounds=3, dense_features=DENSE))
    train, valid = _shard(1000, 0), _shard(300, 1)  # LightGBM groups an id's rows: ~25 a item
    _, figures = model.prefit(train, valid)
    p = valid.label.mean()
    base = -float(np.mean(valid.label * np.log(p) + (1 - valid.label) * np.log(1 - p)))
    assert figures["best_valid_binary_logloss"] < 0.2 * base  # the label is a rule of the item and a counter
    assert 1 <= figures["trees"] < 60  # at rate 0.5 the valid logloss stops improving long before 60 rounds


def test_save_and_load_keep_the_booster_and_the_logits(tmp_path):
    from training.artifacts import load_model, save_model
    from training.registry import get_model

    spec = get_model("gbdt_lr")
    model, _ = _fitted()
    state = model.state_dict()
    assert state["trees._extra_state"].numel() > 0
    save_model(tmp_path / "m", spec, CONFIG, state, model_version="v1", options={}, vocab_sizes=VOCAB,
               sharding_plan={}, metrics={}, training_versions={})
    loaded = load_model(tmp_path / "m").module
    assert loaded.trees.num_trees == model.trees.num_trees
    shard = _shard(20, seed=3)
    kjt, dense = kjt_of_rows(_rows(shard, range(20))), torch.from_numpy(shard.dense)
    with torch.no_grad():
        torch.testing.assert_close(loaded(kjt, dense), model(kjt, dense), rtol=0, atol=0)
    assert torch.equal(loaded.state_dict()["trees._extra_state"], state["trees._extra_state"])
    other = GBDTLR(VOCAB, GBDTLRConfig(num_trees=6, num_leaves=4, dense_features=DENSE[:1]))
    with pytest.raises(TreesNotCompatibleError, match="columns"):
        other.load_state_dict(state, strict=False)
    small = GBDTLR(VOCAB, GBDTLRConfig(num_trees=2, num_leaves=4, dense_features=DENSE))
    with pytest.raises(TreesNotCompatibleError, match="table holds 2 x 4"):
        small.trees.set_extra_state(state["trees._extra_state"])


# ------------------------------------------------------------------------------------- the CTR task, 2 ranks
WORLD = 2


def _task_worker(rank: int, port: int, lake: str, done_dir: str) -> None:
    import dataclasses
    import os

    import torch.distributed as dist

    from _spawn import mark_done
    from training.distributed import (ShardingConfig, gather_full_state_dict, load_full_state_dict, plan_sharding,
                                      shard_model)
    from training.registry import get_model
    from training.tasks import TaskContext
    from training.tasks.ctr import CtrTask
    from training.trainer import TrainOptions

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    spec = get_model("gbdt_lr")
    config = dataclasses.replace(CONFIG, min_data_in_leaf=10)
    opts = TrainOptions(model="gbdt_lr", batch_size=8)
    task = CtrTask(TaskContext(spec, config, opts, lake, VOCAB, rank, WORLD, torch.device("cpu"), 4))
    sharded = GBDTLR(VOCAB, config, torch.device("meta"))
    dmp = shard_model(sharded, plan_sharding(sharded, WORLD, ShardingConfig(strategy="planner")))
    task.bind(dmp)  # rank 0 fits the trees on the whole splits; every rank loads them
    booster = sharded.trees.get_extra_state()
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, booster.numpy().tobytes())
    assert sharded.trees.num_trees >= 1 and everyone[0] == everyone[1]
    if rank == 0:
        assert task.finish({})["prefit"]["train_rows"] == 120  # the whole train split, not this rank's 60
    reference = GBDTLR(VOCAB, config)
    reference.load_prefit(everyone[0])
    torch.manual_seed(0)
    with torch.no_grad():
        reference.sparse_arch.embedding_bag_collection.embedding_bags[LEAF_TABLE].weight.normal_()
        reference.bias.fill_(0.5)
    load_full_state_dict(dmp, reference.state_dict())
    dmp.eval()
    batch = next(iter(task.batches(0)))
    with torch.no_grad():
        torch.testing.assert_close(dmp(batch.features, batch.dense), reference.eval()(batch.features, batch.dense),
                                   rtol=1e-5, atol=1e-5)
    full = gather_full_state_dict(dmp)
    if rank == 0:  # what the trainer saves holds the booster
        assert torch.equal(full["trees._extra_state"], booster)
    # the trainer's checkpoint (DCP) and a resumed worker's load: the booster comes back with the shards
    import torch.distributed.checkpoint as dcp

    checkpoint = str(Path(done_dir).parent / "checkpoint")
    dcp.save({"model": dmp.state_dict()}, checkpoint_id=checkpoint)
    load_full_state_dict(dmp, GBDTLR(VOCAB, config).state_dict() | {"trees._extra_state": booster})  # zero weights
    state = {"model": dmp.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    dmp.load_state_dict(state["model"])
    assert torch.equal(sharded.trees.get_extra_state(), booster)
    with torch.no_grad():
        torch.testing.assert_close(dmp(batch.features, batch.dense), reference(batch.features, batch.dense),
                                   rtol=1e-5, atol=1e-5)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration
def test_ctr_task_fits_the_trees_once_and_both_ranks_read_them(tmp_path):
    from _spawn import free_port, spawn_checked
    from test_train_ray import write_synthetic_lake

    write_synthetic_lake(tmp_path / "lake", {"train": 120, "valid": 40, "test": 20})
    (tmp_path / "done").mkdir()
    spawn_checked(_task_worker, (free_port(), str(tmp_path / "lake")), WORLD, tmp_path / "done")
