"""Matrix factorisation: the logit by hand, the query encoder's order equals the logit's order (MIPS by cosine),
sharded equals unsharded on the same weights is covered by the registry's round trip; here the model's own facts.
BPR (``loss="bpr"``, Rendle et al. 2009): its gradient by hand, the option's validation, only label-1 rows, the
negatives' distribution, the loss and the mini-batch aware L2 through the CTR objective by hand, a tiny training,
and the same step through DistributedModelParallel over 2 gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.mf import ITEM_BIAS, ITEM_TABLE, MF, MF_FEATURES, USER_TABLE, MFConfig
from training.query import mips_items
from training.registry import ModelOptionError, get_model


def _model(seed: int = 0) -> MF:
    torch.manual_seed(seed)
    model = MF(synthetic_vocab_sizes(), MFConfig(embedding_dim=8, init_range=0.5)).eval()
    with torch.no_grad():  # biases start at 0: give them values so that they are tested
        for bag in model.biases.weights.values():
            bag.weight.uniform_(-1, 1)
        model.biases.bias.fill_(0.3)
    return model


def test_logit_is_the_dot_product_plus_biases():
    model = _model()
    state = model.state_dict()
    rows = [{"user_idx": u, "item_idx": i} for u, i in ((1, 2), (3, 4), (5, 39))]
    logits = model(kjt_of_rows(rows, MF_FEATURES))
    user_bias = state["biases.weights.t_user.weight"]
    want = [float(state[USER_TABLE][u] @ state[ITEM_TABLE][i] + user_bias[u, 0] + state[ITEM_BIAS][i, 0] + 0.3)
            for u, i in ((1, 2), (3, 4), (5, 39))]
    np.testing.assert_allclose(logits.detach().numpy(), want, rtol=1e-5)


def test_query_encoder_ranks_items_as_the_logit_does():
    """Cosine over the MIPS item vectors with the user's query gives the model's own order of every item."""
    spec, model = get_model("mf"), _model(1)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    items = spec.item_vectors(state, model.config)  # (R, D + 2)
    assert np.allclose(np.linalg.norm(items, axis=1), np.linalg.norm(items, axis=1)[0], rtol=1e-5)
    queries, ok = spec.query_encoder(state, model.config).encode(np.array([1, 7]), [np.array([]), np.array([3])])
    assert ok.all() and queries.shape == (2, items.shape[1])
    n_items = synthetic_vocab_sizes()["item"]
    for b, u in enumerate((1, 7)):
        cosine = items @ queries[b] / np.linalg.norm(items, axis=1) / np.linalg.norm(queries[b])  # (R,)
        logits = model(kjt_of_rows([{"user_idx": u, "item_idx": i} for i in range(n_items)], MF_FEATURES))
        assert np.argsort(-cosine, kind="stable").tolist()[:10] == \
            np.argsort(-logits.detach().numpy(), kind="stable").tolist()[:10]


def test_mips_items_keeps_the_inner_product_and_equalises_norms():
    v = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    m = mips_items(v)
    q = np.random.default_rng(1).normal(size=5).astype(np.float32)
    np.testing.assert_allclose(m @ np.r_[q, 0.0], v @ q, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), np.linalg.norm(v, axis=1).max(), rtol=1e-5)


def test_mf_is_a_retriever_trained_on_the_ctr_task_with_l2_on_both_tables():
    spec = get_model("mf")
    assert spec.kind == "retriever" and spec.task == "ctr" and spec.query_encoder is not None
    assert set(spec.id_tables) == {"t_user", "t_item"} and spec.train.mba_lambda > 0


def test_recommend_with_mf_retrieves_by_the_users_own_vector(tmp_path):
    """``/recommend`` with MF as the retriever: the candidates are the items nearest to the user's vector (the
    exact inner-product order, seen items removed), then ranked by the ranker, as a brute-force reference does."""
    from fastapi.testclient import TestClient

    from features.config import PlatformConfig
    from serving.ann import HnswParams
    from serving.app import create_app
    from serving.bundle import BundleSpec
    from serving.export import run_export
    from test_app import USERS, _reference_dense, _write_deepfm, _write_lake
    from training.artifacts import save_model

    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    ref = _write_lake(cfg)
    ranker = _write_deepfm(cfg, seed=0, version="dfm-1")
    mf = _model(2)
    state = {k: v.detach().clone() for k, v in mf.state_dict().items()}
    save_model(cfg.run_dir / "models" / "mf", get_model("mf"), mf.config, state, model_version="mf-1", options={},
               vocab_sizes=synthetic_vocab_sizes(), sharding_plan={}, metrics={}, training_versions={})
    run_export(cfg, HnswParams(m=8, ef_construction=64, ef_search=64), models=("mf",))
    spec = BundleSpec(retrieval_model="mf", ranker_model="deepfm", recent_items=2, per_item=3)
    rated = {i for _, its, _ in ref.values() for i in its}
    n_items = 39
    with TestClient(create_app(cfg, spec=spec)) as client:
        for u in USERS:
            feats, items, _ = ref[u]
            body = client.get("/recommend", params={"user_id": u, "k": 4}).json()
            logits = mf(kjt_of_rows([{"user_idx": u, "item_idx": i} for i in range(1, n_items + 1)], MF_FEATURES))
            order = [int(i) + 1 for i in np.argsort(-logits.detach().numpy(), kind="stable")]
            cand = [c for c in order[:spec.recent_items * spec.per_item + len(set(items))] if c not in items]
            with torch.no_grad():
                probs = [float(torch.sigmoid(ranker(kjt_of_rows([{**feats, "item_idx": c, "genre_idx":
                                                                  [c % 19 + 1] if c in rated else []}]),
                                                    _reference_dense(ref, u, c)))[0]) for c in cand]
            want = sorted(zip(cand, probs), key=lambda x: (-x[1], x[0]))[:4]
            assert [x["item_id"] for x in body["items"]] == [100 + c for c, _ in want]
            assert {x["source"] for x in body["items"]} == {"ann+deepfm"}
            assert body["model_version"] == "dfm-1+mf-1"


def test_replay_queries_mf_by_the_users_vector():
    """The replay's embedding policy for MF searches with the case user's own vector (not its recent items): its
    lists are the model's inner-product order over all items, minus what the user saw before the case."""
    from serving.ann import ItemIndex
    from evaluation.replay import ReplayParams, embedding_recs, item_matrix
    from test_replay import _inputs

    spec, mf = get_model("mf"), _model(4)
    state = {k: v.detach().clone() for k, v in mf.state_dict().items()}
    vectors = spec.item_vectors(state, mf.config)  # (R, D + 2)
    items = np.arange(1, vectors.shape[0])
    index = ItemIndex.build(vectors[items], items)
    # user u rates items u, u + 1 in train, then item u + 2 in test (the case); user 3 also item 30 after it
    events = [(f"e{u}{j}", u, u + j, 5, 10 * u + j, "train" if j < 2 else "test", []) for u in (1, 2, 3)
              for j in range(3)] + [("z", 3, 30, 5, 99, "test", [])]
    cases, _ = _inputs(events)
    k = 4
    recs, fell_back = embedding_recs(cases, index, item_matrix(items, vectors[items]), ReplayParams(k=k),
                                     fallback=np.full((len(cases), k), -1),
                                     encoder=spec.query_encoder(state, mf.config))
    assert fell_back == 0
    for b in range(len(cases)):
        u = int(cases.user[b])
        seen = {e[2] for e in events if e[1] == u and (e[4], e[0]) < (int(cases.event_time[b] // 1_000_000)
                                                                        - 1_704_067_200, cases.event_id[b])}
        logits = mf(kjt_of_rows([{"user_idx": u, "item_idx": int(i)} for i in items], MF_FEATURES))
        order = [int(items[j]) for j in np.argsort(-logits.detach().numpy(), kind="stable")]
        assert recs[b].tolist() == [i for i in order if i not in seen][:k], (u, seen)


# ------------------------------------------------------------------------------------ BPR (Rendle et al. 2009)
def _bpr_model(vocab: dict, seed: int = 0, negatives: int = 1) -> MF:
    torch.manual_seed(seed)
    model = MF(vocab, MFConfig(embedding_dim=4, init_range=0.5, loss="bpr", negatives=negatives))
    with torch.no_grad():  # biases start at 0: give them values so that they are tested
        for bag in model.biases.weights.values():
            bag.weight.uniform_(-1, 1)
        model.biases.bias.fill_(0.3)
    return model


def _batch(pairs, labels, weight=None):
    from training.data import CtrBatch

    n = len(pairs)
    return CtrBatch(kjt_of_rows([{"user_idx": u, "item_idx": i} for u, i in pairs], MF_FEATURES),
                    torch.tensor(labels, dtype=torch.float32),
                    torch.ones(n) if weight is None else torch.tensor(weight, dtype=torch.float32),
                    torch.tensor([u for u, _ in pairs]))


def _logits(model: MF, pairs) -> torch.Tensor:
    return model(kjt_of_rows([{"user_idx": int(u), "item_idx": int(i)} for u, i in pairs], MF_FEATURES))


def test_bpr_gradient_by_hand_and_one_step_raises_the_positive_over_the_negative():
    """One user, item 1 positive; items 1 and 2 are the only items, so the negative is item 2. With
    d = x_u1 - x_u2 = <p_u, q_1 - q_2> + b_1 - b_2 and s = sigmoid(-d): dL/dp_u = -s (q_1 - q_2), dL/dq_1 = -s p_u,
    dL/dq_2 = s p_u, dL/db_1 = -s, dL/db_2 = s; the user and global biases cancel (zero gradient)."""
    vocab = {"user": 2, "item": 3}
    model = _bpr_model(vocab)
    bpr = get_model("mf").ctr_loss(model.config, vocab)
    batch = _batch([(1, 1)], [1.0])
    params = dict(model.named_parameters())
    p, q = params[USER_TABLE].detach(), params[ITEM_TABLE].detach()
    b_item = params[ITEM_BIAS].detach()[:, 0]
    d = float(p[1] @ (q[1] - q[2]) + b_item[1] - b_item[2])
    loss, rows = bpr(model, batch)
    assert loss.item() == pytest.approx(-np.log(1.0 / (1.0 + np.exp(-d))), rel=1e-5)
    assert rows.tolist() == [True, True]  # the positive row and its negative row
    loss.backward()
    s = 1.0 / (1.0 + np.exp(d))
    want_user = torch.zeros_like(p)
    want_user[1] = -s * (q[1] - q[2])
    want_item = torch.zeros_like(q)
    want_item[1], want_item[2] = -s * p[1], s * p[1]
    torch.testing.assert_close(params[USER_TABLE].grad, want_user)
    torch.testing.assert_close(params[ITEM_TABLE].grad, want_item)
    torch.testing.assert_close(params[ITEM_BIAS].grad[:, 0], torch.tensor([0.0, -s, s], dtype=torch.float32))
    assert not params["biases.weights.t_user.weight"].grad.any() and not params["biases.bias"].grad.any()
    with torch.no_grad():  # one plain gradient step
        for w in params.values():
            w -= 0.1 * w.grad
        after = _logits(model, [(1, 1), (1, 2)])
    assert float(after[0] - after[1]) > d


def test_mf_loss_option_is_validated():
    spec = get_model("mf")
    assert spec.default_config().loss == "bce" and spec.default_config().negatives == 1
    assert spec.ctr_loss(spec.default_config(), synthetic_vocab_sizes()) is None  # bce: the task's own BCE
    config = spec.make_config({"loss": "bpr", "negatives": "3"})  # as ``--option`` gives them
    assert (config.loss, config.negatives) == ("bpr", 3)
    bpr = spec.ctr_loss(config, synthetic_vocab_sizes())
    assert (bpr.n_items, bpr.negatives) == (synthetic_vocab_sizes()["item"], 3)
    with pytest.raises(ModelOptionError, match="loss must be one of"):
        spec.make_config({"loss": "warp"})
    with pytest.raises(ValueError, match="negatives must be >= 1"):
        MFConfig(loss="bpr", negatives=0)
    with pytest.raises(ValueError, match="at least 2 items"):
        spec.ctr_loss(config, {"user": 5, "item": 2})  # the OOV row and one item: no negative to draw


def test_bpr_uses_only_the_positive_rows():
    """Label-0 rows and padding take no part (their user gets no gradient); a batch without a positive row gives a
    loss of 0 that still back-propagates, with zero gradients (every rank runs its backward)."""
    vocab = {"user": 4, "item": 3}
    model = _bpr_model(vocab, seed=1)
    bpr = get_model("mf").ctr_loss(model.config, vocab)
    # user 1 rated item 1 (label 1); user 2 item 2 with label 0; user 3's row is padding (weight 0)
    loss, rows = bpr(model, _batch([(1, 1), (2, 2), (3, 1)], [1.0, 0.0, 1.0], weight=[1.0, 1.0, 0.0]))
    x = _logits(model, [(1, 1), (1, 2)]).detach()
    assert loss.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(x[0] - x[1])), rel=1e-5)
    assert rows.tolist() == [True, False, False] * 2
    loss.backward()
    user_grad = dict(model.named_parameters())[USER_TABLE].grad
    assert user_grad[1].abs().sum() > 0 and not user_grad[[0, 2, 3]].any()
    model.zero_grad()
    loss, rows = bpr(model, _batch([(2, 2), (3, 1)], [0.0, 0.0]))
    assert loss.item() == 0.0 and loss.requires_grad and not rows.any()
    loss.backward()
    assert all(not w.grad.any() for w in model.parameters())


def test_bpr_negatives_are_uniform_over_the_other_items():
    from training.models.mf import BPRLoss

    positives = torch.tensor([1, 3, 5, 0])  # 0: an OOV positive excludes nothing
    j = BPRLoss(6, negatives=4000).sample(positives, torch.Generator().manual_seed(0))  # (4, 4000); items 1..5
    for b, pos in enumerate(positives.tolist()):
        allowed = [i for i in range(1, 6) if i != pos]
        counts = np.bincount(j[b].numpy(), minlength=6)
        assert counts[[i for i in range(6) if i not in allowed]].sum() == 0
        expected = 4000 / len(allowed)
        assert np.all(np.abs(counts[allowed] - expected) < 5 * np.sqrt(expected)), counts  # ~5 sigma


def test_bpr_objective_with_several_negatives_and_the_mini_batch_aware_l2_by_hand():
    """Through ``CtrObjective`` (the CTR task's hook ``ModelSpec.ctr_loss``): the data loss is the mean over the
    positive rows and their K negatives, drawn from the objective's generator; the penalty counts the positive rows'
    users, positive and negative items, once each, and nothing of the label-0 row."""
    from training.tasks.ctr import CtrObjective

    vocab, lam, k = synthetic_vocab_sizes(), 0.3, 3
    model = _bpr_model(vocab, seed=2, negatives=k)
    spec = get_model("mf")
    g = torch.Generator().manual_seed(0)
    counts = {"t_user": torch.randint(1, 9, (vocab["user"],), generator=g),
              "t_item": torch.randint(1, 9, (vocab["item"],), generator=g)}
    pairs, labels = [(1, 2), (4, 5), (1, 7), (9, 2)], [1.0, 0.0, 1.0, 1.0]
    objective = CtrObjective(model, spec.id_lookups, counts, lam, batch_loss=spec.ctr_loss(model.config, vocab),
                             generator=torch.Generator().manual_seed(7))
    total, data, penalty = objective(_batch(pairs, labels))
    negatives = spec.ctr_loss(model.config, vocab).sample(torch.tensor([i for _, i in pairs]),
                                                          torch.Generator().manual_seed(7))  # (4, K): the same draw
    with torch.no_grad():
        terms = [float(-torch.nn.functional.logsigmoid(_logits(model, [(u, i)])[0] - _logits(model, [(u, j)])[0]))
                 for b, (u, i) in enumerate(pairs) if labels[b] for j in negatives[b].tolist()]
    assert data.item() == pytest.approx(np.mean(terms), rel=1e-5)
    state = model.state_dict()
    users = {u for (u, _), y in zip(pairs, labels) if y}
    items = {i for (_, i), y in zip(pairs, labels) if y} | {int(j) for b in (0, 2, 3) for j in negatives[b]}
    want = 0.5 * lam * (sum(float(state[USER_TABLE][u].pow(2).sum() / counts["t_user"][u]) for u in users)
                        + sum(float(state[ITEM_TABLE][i].pow(2).sum() / counts["t_item"][i]) for i in items))
    assert penalty.item() == pytest.approx(want, rel=1e-5)
    assert total.item() == pytest.approx(data.item() + penalty.item(), rel=1e-6)


def test_a_few_bpr_steps_rank_the_users_items_above_the_others():
    """A tiny training: users 1-10 like items 1-10, users 11-20 items 11-20 (label 1), each user also has label-0
    rows of the other group; 60 steps of BPR with plain SGD lift the AUC of own-group over other-group items from
    chance to near 1."""
    from training.metrics import auc
    from training.tasks.ctr import CtrObjective

    vocab = {"user": 21, "item": 21}
    model = _bpr_model(vocab, seed=3, negatives=2)
    rng = np.random.default_rng(0)
    group = lambda x: (x - 1) // 10  # noqa: E731
    pairs = [(u, i) for u in range(1, 21) for i in range(1, 21)]
    labels = [float(group(u) == group(i)) for u, i in pairs]
    objective = CtrObjective(model, None, None, 0.0, batch_loss=get_model("mf").ctr_loss(model.config, vocab),
                             generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=2.0)

    def score() -> float:
        with torch.no_grad():
            return auc(np.array(labels), _logits(model, pairs).numpy())

    before = score()
    for _ in range(60):
        rows = rng.choice(len(pairs), 64, replace=False)
        opt.zero_grad()
        objective(_batch([pairs[r] for r in rows], [labels[r] for r in rows]))[0].backward()
        opt.step()
    assert before < 0.6 and score() > 0.95


def _bpr_sharded_worker(rank: int, port: int, done_dir: str) -> None:
    """Two gloo ranks, DMP with TorchRec's fused in-backward SGD on the tables (the trainer's layout): each rank's
    BPR objective (its own batch and generator) equals the unsharded one on the same weights, and one step moves
    the tables by ``-LR`` times the mean over the ranks of the unsharded gradients (penalty included)."""
    import os

    import torch.distributed as dist
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from _spawn import mark_done
    from training.distributed import ShardingConfig, gather_full_state_dict, load_full_state_dict
    from training.distributed import plan_sharding, shard_model
    from training.tasks.ctr import CtrObjective

    world, lr, lam = 2, 0.5, 0.3
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    vocab, spec = synthetic_vocab_sizes(), get_model("mf")
    full = {k: v.clone() for k, v in _bpr_model(vocab, seed=5, negatives=2).state_dict().items()}
    counts = {"t_user": torch.arange(vocab["user"]) % 5 + 1, "t_item": torch.arange(vocab["item"]) % 7 + 1}
    batches = [_batch([(1, 2), (4, 5), (1, 7), (9, 2)], [1.0, 0.0, 1.0, 1.0]),
               _batch([(3, 3), (1, 2), (8, 30), (8, 31)], [1.0, 1.0, 0.0, 1.0], weight=[1.0, 1.0, 1.0, 0.0])]
    grads, losses = {USER_TABLE: 0.0, ITEM_TABLE: 0.0}, []
    for r in range(world):  # the unsharded reference of each rank's step
        reference = _bpr_model(vocab, negatives=2)
        reference.load_state_dict(full)
        total, data, _ = CtrObjective(reference, spec.id_lookups, counts, lam, world,
                                      batch_loss=spec.ctr_loss(reference.config, vocab),
                                      generator=torch.Generator().manual_seed(100 + r))(batches[r])
        total.backward()
        losses.append(data.item())
        params = dict(reference.named_parameters())
        for key in grads:
            grads[key] = grads[key] + params[key].grad / world
    model = MF(vocab, MFConfig(embedding_dim=4, loss="bpr", negatives=2), sparse_device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": lr})
    dmp = shard_model(model, plan_sharding(model, world, ShardingConfig()))
    load_full_state_dict(dmp, full)
    objective = CtrObjective(dmp, spec.id_lookups, counts, lam, world, batch_loss=spec.ctr_loss(model.config, vocab),
                             generator=torch.Generator().manual_seed(100 + rank))
    total, data, _ = objective(batches[rank])
    assert data.item() == pytest.approx(losses[rank], rel=1e-5)
    total.backward()  # the fused kernel steps here
    after = gather_full_state_dict(dmp)  # on rank 0
    for key, grad in grads.items() if rank == 0 else ():
        torch.testing.assert_close(after[key], full[key] - lr * grad, rtol=1e-4, atol=1e-6)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration  # two gloo processes, as tests/test_sharded_models.py
def test_bpr_through_distributed_model_parallel_matches_unsharded(tmp_path):
    from _spawn import free_port, spawn_checked

    spawn_checked(_bpr_sharded_worker, (free_port(),), 2, tmp_path)
