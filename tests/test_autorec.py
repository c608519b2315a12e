"""I-AutoRec (Sedhain et al. 2015): the reconstruction and its loss by hand (observed entries only, unless the
unobserved weight says otherwise), the autoencoder task's batches and loss on a tiny export, the query encoder
ranking items as the reconstruction does (a train user's decoder row; a new user's ridge fold-in, checked against
the normal equations), the model sharded over 2 gloo ranks giving the unsharded outputs and training there, and a
run through the trainer on Ray."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked
from training.data import synthetic_vocab_sizes
from training.models.autorec import (DEC_BIAS, DEC_TABLE, ENC_BIAS, ENC_TABLE, ITEM_CODES, USER_ROWS,
                                     all_users_kjt, item_codes)
from training.modules.autorec import RidgeFoldIn, masked_sse, observed_matrix
from training.registry import ModelOptionError, get_model

SPEC = get_model("autorec")
VOCAB = synthetic_vocab_sizes()  # 30 user rows, 40 item rows


def _model(hidden: int = 8, **options):
    config = SPEC.make_config({"hidden": hidden, **options})
    torch.manual_seed(0)
    model = SPEC.build(VOCAB, config).eval()
    with torch.no_grad():  # biases start at 0: make them count
        model.enc_bias.normal_(0, 0.5)
        model.dec_bias.normal_(0, 0.5)
    return config, model


def test_reconstruction_by_hand():
    """r_hat_i = V sigmoid(W r_i + mu) + b, with W^T and V the two user tables."""
    _, model = _model()
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).integers(0, 2, (3, VOCAB["user"])).astype(np.float64)  # (B, U)
    with torch.no_grad():
        recon, codes, enc, dec = model(all_users_kjt(VOCAB["user"]), torch.from_numpy(x).float())
    h = 1 / (1 + np.exp(-(x @ state[ENC_TABLE] + state[ENC_BIAS])))  # (B, H)
    np.testing.assert_allclose(codes.numpy(), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recon.numpy(), h @ state[DEC_TABLE].T + state[DEC_BIAS], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(enc.numpy(), state[ENC_TABLE].astype(np.float32))
    np.testing.assert_allclose(item_codes(x, np.array([True, False, True]), state[ENC_TABLE], state[ENC_BIAS]),
                               h * np.array([[1], [0], [1]]), rtol=1e-5, atol=1e-6)


def test_loss_is_on_observed_entries_only():
    """The paper's loss sums over observed entries: whatever is reconstructed where nothing was observed leaves it
    unchanged, and its value is the hand sum; an unobserved weight w counts those entries as targets 0."""
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])  # (0, 1): an observed 0 (a label-0 row)
    recon = torch.tensor([[0.5, 0.25, 7.0, -3.0], [9.0, 4.0, 2.0, 3.5]])
    hand = [(1 - 0.5) ** 2 + 0.25 ** 2, (5 - 4.0) ** 2 + (3 - 3.5) ** 2]
    assert masked_sse(recon, target, mask).tolist() == pytest.approx(hand)
    moved = recon + (1 - mask) * torch.randn(2, 4) * 100  # change the unobserved entries only
    assert masked_sse(moved, target, mask).tolist() == pytest.approx(hand)
    moved = recon + mask * 0.5  # an observed entry counts
    assert masked_sse(moved, target, mask).tolist() != pytest.approx(hand)
    w = 0.25
    assert masked_sse(recon, target, mask, w).tolist() == pytest.approx(
        [hand[0] + w * (7.0 ** 2 + 3.0 ** 2), hand[1] + w * (9.0 ** 2 + 2.0 ** 2)])


def test_observed_matrix_keeps_observed_zeros_and_averages_repeats():
    values, mask = observed_matrix(np.array([1, 2, 2, 0, 3, 9]), np.array([1, 1, 1, 2, 0, 1]),
                                   np.array([0.0, 1.0, 0.0, 1.0, 1.0, 1.0]), n_users=4, n_items=3)
    assert mask.toarray().tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]  # OOV rows and user 9 left out
    assert values.toarray().tolist() == [[0, 0, 0, 0], [0, 0.0, 0.5, 0], [0, 0, 0, 0]]
    assert mask.nnz == 2  # the observed 0 of user 1 is an entry


def test_fold_in_solves_the_weighted_ridge_normal_equations():
    codes = np.random.default_rng(1).random((12, 5))
    codes[[0, 7]] = 0  # no code: never part of the fit
    history = [np.array([3, 5, 5, 7, 0]), np.array([9]), np.array([7]), np.array([], np.int64)]
    for w in (0.0, 0.3, 1.0):
        v, ok = RidgeFoldIn(codes, penalty=0.7, unobserved_weight=w)(history)
        assert ok.tolist() == [True, True, False, False] and not v[2:].any()
        for c in (0, 1):
            h = sorted({int(i) for i in history[c]} - {0, 7})
            x, xh = codes, codes[h]  # every coded row is a target 0 of weight w, the history's of weight 1
            a = w * x.T @ x + (1 - w) * xh.T @ xh + 0.7 * np.eye(5)
            np.testing.assert_allclose(v[c], np.linalg.solve(a, xh.sum(axis=0)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="penalty > 0"):
        RidgeFoldIn(codes, penalty=0.0)


def test_options_are_checked():
    with pytest.raises(ModelOptionError, match="multiple of 4"):
        SPEC.make_config({"hidden": "6"})
    with pytest.raises(ModelOptionError, match="target must be one of"):
        SPEC.make_config({"target": "stars"})
    with pytest.raises(ModelOptionError, match="unobserved_weight"):
        SPEC.make_config({"unobserved_weight": "1.5"})


def _trained_state(config, model, values, mask) -> dict:
    """The saved state as the task's ``finish`` fills it: codes from the train vectors, user rows."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    observed = mask.getnnz(axis=1) > 0
    state[ITEM_CODES] = torch.from_numpy(item_codes(values, observed, state[ENC_TABLE].numpy(),
                                                    state[ENC_BIAS].numpy()))
    state[USER_ROWS] = torch.from_numpy(mask.getnnz(axis=0).astype(np.float32))
    return state


def _random_train(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 300
    users, items = rng.integers(1, 25, n), rng.integers(1, 36, n)  # users 25..29 and items 36..39: no train row
    return observed_matrix(users, items, rng.integers(0, 2, n).astype(np.float32), VOCAB["user"], VOCAB["item"])


def test_query_encoder_ranks_items_as_the_reconstruction_does():
    """A train user's query against the exported (MIPS) vectors gives the reconstruction r_hat(u, i) as the inner
    product, for every item with a code, and 0 for an item without one; the cosine order equals it. A user
    without a train row is scored by the fold-in of its history, the other users' rows playing no part."""
    from serving.ann import exact_search

    config, model = _model(unobserved_weight="0.2")
    values, mask = _random_train()
    state = _trained_state(config, model, values, mask)
    encoder, vectors = SPEC.query_encoder(state, config), SPEC.item_vectors(state, config)
    with torch.no_grad():
        recon = model(all_users_kjt(VOCAB["user"]), torch.from_numpy(values.toarray()))[0].numpy()  # (R, U)
    coded = mask.getnnz(axis=1) > 0
    train_users = np.flatnonzero(mask.getnnz(axis=0) > 0)[:4]
    q, ok = encoder.encode(train_users, [np.array([], np.int64)] * len(train_users))  # the row, not the history
    assert ok.all()
    scores = q @ vectors.T  # (B, R)
    np.testing.assert_allclose(scores[:, coded], recon[coded][:, train_users].T, rtol=1e-4, atol=1e-5)
    assert not scores[:, ~coded].any()
    ids = np.arange(VOCAB["item"])
    for b in range(len(train_users)):
        order = exact_search(vectors, ids, q[b:b + 1], len(ids))[0]
        assert np.all(np.diff(scores[b][order]) <= 1e-5)

    history = np.array([3, 8, 38])  # 38 has no code
    new, ok = encoder.encode(np.array([27, 0, 2000]), [history, history, np.array([38])])
    assert ok.tolist() == [True, True, False]
    np.testing.assert_array_equal(new[0], new[1])
    x = np.hstack([state[ITEM_CODES].numpy(), coded[:, None]])  # (R, H + 1): the codes and the bias' 1
    want, _ = RidgeFoldIn(x, config.l2 / 2, config.unobserved_weight)([history])
    np.testing.assert_allclose(new[0, :-1], want[0], rtol=1e-5)
    assert new[0, -1] == 0  # the MIPS column of a query


def _write_lake(tmp_path):
    from test_train_ray import write_synthetic_lake

    lake = tmp_path / "lake"
    return lake, write_synthetic_lake(lake, {"train": 300, "valid": 60, "test": 60})


@pytest.mark.parametrize("world_size", [1, 2])
def test_task_batches_cover_every_item_once_and_loss_is_by_hand(tmp_path, world_size):
    """Every rank runs ``steps_per_epoch`` batches; together the ranks' real rows are each observed item exactly
    once per epoch (padding rows weigh 0); the loss is the hand objective; evaluate gives HR@10 in [0, 1]."""
    from training.tasks import TaskContext, task_class
    from training.tasks.autoencoder import read_targets

    lake, vocab = _write_lake(tmp_path)
    config, model = _model(unobserved_weight="0.1")
    opts = SimpleNamespace(seed=3)
    seen = []
    for rank in range(world_size):
        ctx = TaskContext(SPEC, config, opts, str(lake), vocab, rank, world_size, torch.device("cpu"), 16)
        task = task_class(SPEC.task)(ctx)
        task.bind(model)
        batches = list(task.batches(epoch=1))
        assert len(batches) == task.steps_per_epoch
        for inputs, m, weight in batches:  # an item's row is its (inputs, mask) pair
            seen += [x.tobytes() + mm.tobytes() for x, mm in zip(inputs[weight > 0].numpy(), m[weight > 0].numpy())]
        inputs, m, weight = batches[0]
        with torch.no_grad():
            got = float(task.loss(model, batches[0]))
            recon, _, enc, dec = model(all_users_kjt(vocab["user"]), inputs)
        err = ((recon - inputs) ** 2 * (m + 0.1 * (1 - m))).sum(dim=1)
        n = len(task.items)
        want = float((err * weight).sum() / weight.sum() + config.l2 / (2 * n) * ((enc ** 2).sum() + (dec ** 2).sum()))
        assert got == pytest.approx(want, rel=1e-5)
        figures = task.evaluate(model, "valid")
        assert 0.0 <= figures["hr10"] <= 1.0 and figures["cases"] == int(
            (read_targets(lake, "valid", "label")[2] > 0.5).sum())
    values, mask = observed_matrix(*read_targets(lake, "train", "label"), vocab["user"], vocab["item"])
    items = np.flatnonzero(mask.getnnz(axis=1) > 0)
    assert sorted(seen) == sorted(x.tobytes() + mm.tobytes() for x, mm in zip(values[items].toarray(),
                                                                             mask[items].toarray()))


def test_finish_fills_the_codes_the_evaluation_used(tmp_path):
    """``finish`` writes into the saved state the codes and user rows that the evaluation scored with."""
    from training.tasks import TaskContext, task_class

    lake, vocab = _write_lake(tmp_path)
    config, model = _model()
    ctx = TaskContext(SPEC, config, SimpleNamespace(seed=0), str(lake), vocab, 0, 1, torch.device("cpu"), 8)
    task = task_class(SPEC.task)(ctx)
    task.bind(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task.finish(state)
    live = task._state(model)
    torch.testing.assert_close(state[ITEM_CODES], live[ITEM_CODES], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[USER_ROWS], live[USER_ROWS])
    assert state[USER_ROWS].sum() == task.mask.nnz


def test_rating_target_reads_the_stars(tmp_path):
    from training.tasks.autoencoder import read_targets

    lake, _ = _write_lake(tmp_path)
    _, _, stars = read_targets(lake, "train", "rating")
    assert stars.min() >= 1 and stars.max() <= 5 and len(np.unique(stars)) > 2


def _sharded_worker(rank: int, port: int, lake: str, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from training.distributed import (ShardingConfig, gather_full_state_dict, load_full_state_dict, plan_sharding,
                                      shard_model)
    from training.tasks import TaskContext, task_class
    from training.trainer import TrainOptions, _build

    config, reference = _model()
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    sharded = SPEC.build(VOCAB, config, torch.device("meta"))
    dmp = shard_model(sharded, plan_sharding(sharded, 2, ShardingConfig(strategy="planner")))
    load_full_state_dict(dmp, full)
    dmp.eval()
    inputs = torch.from_numpy(np.random.default_rng(rank).integers(0, 2, (4, VOCAB["user"])).astype(np.float32))
    kjt = all_users_kjt(VOCAB["user"])
    with torch.no_grad():
        for got, want in zip(dmp(kjt, inputs), reference(kjt, inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # the trainer's steps on the sharded model: fused Adagrad in backward, collectives in step with the other rank
    opts = TrainOptions(model=SPEC.name, lr_sparse=0.05)
    ctx = TaskContext(SPEC, config, opts, lake, VOCAB, rank, 2, torch.device("cpu"), 8)
    task = task_class(SPEC.task)(ctx)
    dmp, _, dense_opt = _build(SPEC.build(VOCAB, config, torch.device("meta")), opts, 2, rank, torch.device("cpu"))
    load_full_state_dict(dmp, full)
    task.bind(dmp)
    before = task.evaluate(dmp, "valid")
    for epoch in range(2):
        dmp.train()
        for batch in task.batches(epoch):
            dense_opt.zero_grad()
            task.loss(dmp, batch).backward()
            dense_opt.step()
        rmse = task.end_epoch(epoch, 1.0)["train_rmse"]
    after = task.evaluate(dmp, "valid")
    state = gather_full_state_dict(dmp)
    if rank == 0:
        assert 0 <= before["hr10"] <= 1 and 0 <= after["hr10"] <= 1 and np.isfinite(rmse)
        assert not torch.equal(state[ENC_TABLE], full[ENC_TABLE]) and not torch.equal(state[DEC_TABLE], full[DEC_TABLE])
        task.finish(state)
        assert state[ITEM_CODES].abs().sum() > 0 and state[USER_ROWS].sum() == task.mask.nnz
        SPEC.build(VOCAB, config).load_state_dict(state)  # the saved layout
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration
def test_sharded_model_matches_unsharded_and_trains(tmp_path):
    """Over 2 gloo ranks the planner-sharded model gives the unsharded outputs on the same weights; the task's
    epochs then run on it as the trainer runs them (same number of steps on both ranks), the tables move, and
    ``finish`` gives a state of the saved layout."""
    lake, _ = _write_lake(tmp_path)
    spawn_checked(_sharded_worker, (free_port(), str(lake)), 2, tmp_path)


@pytest.mark.integration
def test_train_through_the_trainer(ray_cluster, cfg, tmp_path):
    """``training.train`` on the configured Ray workers, the synthetic lake of tests/test_train_ray.py, 2 epochs:
    the stage result has the task's figures, the saved model has the codes of its own encoder on the train split,
    and its exported vectors and query encoder answer a new user from the history."""
    from features.config import PlatformConfig
    from training.artifacts import ModelLayout, load_model
    from training.query import own_query_encoder
    from training.tasks.autoencoder import read_targets
    from training.train import TrainOptions, train
    from test_train_ray import write_synthetic_lake

    local = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", train=cfg.train)
    vocab = write_synthetic_lake(local.lake_dir, {"train": 300, "valid": 60, "test": 60})
    result = train(local, TrainOptions(model=SPEC.name, epochs=2, model_options={"hidden": "8"}))
    assert result["task"] == "autoencoder" and 1 <= result["best_epoch"] <= result["epochs"] <= 2
    assert 0 <= result["valid_hr10"] <= 1 and 0 <= result["test_hr10"] <= 1 and np.isfinite(result["train_rmse"])
    folder = local.run_dir / "models" / SPEC.name
    loaded = load_model(folder)
    state = loaded.module.state_dict()
    values, mask = observed_matrix(*read_targets(local.lake_dir, "train", "label"), vocab["user"], vocab["item"])
    want = item_codes(values, mask.getnnz(axis=1) > 0, state[ENC_TABLE].numpy(), state[ENC_BIAS].numpy())
    np.testing.assert_allclose(state[ITEM_CODES].numpy(), want, rtol=1e-5, atol=1e-6)
    vectors = np.load(ModelLayout(folder).item_embeddings)
    np.testing.assert_array_equal(vectors, SPEC.item_vectors(state, loaded.config))
    encoder, _ = own_query_encoder(folder)
    q, ok = encoder.encode(np.array([0]), [np.array([1, 2, 3])])
    assert ok.all() and q.shape == (1, vectors.shape[1]) and np.isfinite(q @ vectors.T).all()
