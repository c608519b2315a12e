"""DIEN (Zhou et al. 2019): shapes, the AUGRU's attentional update gate by hand, padding masked out of every part,
the auxiliary loss over the valid steps only, the BatchLoss (one forward, BCE + aux_weight * aux), the config's
errors, and the sharded model (DMP, 2 gloo processes on CPU) against the unsharded one with negatives."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
from torchrec import JaggedTensor

from _spawn import free_port, mark_done, spawn_checked
from features.definitions import SPARSE_FEATURES
from training.data import CtrBatch, kjt_of_rows, synthetic_vocab_sizes
from training.models.dien import DIEN, DIEN_FEATURES, DIENConfig, DienLoss, id_lookups
from training.modules import AUGRUCell, AuxiliaryNet, InterestEvolution, InterestExtractor
from training.registry import get_model
from training.tasks.ctr import CtrObjective

L = 5
CONFIG = DIENConfig(embedding_dim=8, aux_hidden=(6,), hidden=(16, 8), dropout=0.0, max_history=L)
N_ITEMS = synthetic_vocab_sizes()["item"]


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))
    return [{"user_idx": r(30), "item_idx": 1 + r(39), "age_idx": r(8), "gender_idx": r(3), "occupation_idx": r(22),
             "zip_idx": r(12), "genre_idx": [r(20) for _ in range(r(4))],
             "hist_item_idx": [1 + r(39) for _ in range(r(8))]} for _ in range(n)]


def _batch(rows: list[dict], label: list[float], weight: list[float]) -> CtrBatch:
    return CtrBatch(kjt_of_rows(rows, DIEN_FEATURES), torch.tensor(label), torch.tensor(weight),
                    torch.zeros(len(rows), dtype=torch.int64))


def test_dien_shapes_and_right_padded_history():
    torch.manual_seed(0)
    model = DIEN(synthetic_vocab_sizes(), CONFIG)
    rows = _rows(4, seed=0)
    rows[0]["hist_item_idx"], rows[1]["hist_item_idx"] = [], [7, 3]
    rows[2]["hist_item_idx"] = [1, 2, 3, 4, 5, 6, 7]  # longer than L: its first L ids
    kjt = kjt_of_rows(rows, DIEN_FEATURES)
    s = model.sparse_arch(kjt)
    assert s.side.shape == (4, len(SPARSE_FEATURES) - 1, 8) and s.candidate.shape == (4, 8)
    assert s.history.shape == (4, L, 8) and s.negatives is None
    # right-padded: the valid steps first (what the GRU's causality relies on)
    assert s.mask[1].tolist() == [True, True, False, False, False] and not s.mask[0].any() and s.mask[2].all()
    table = model.sparse_arch.sequence.embedding_collection.embeddings["t_item"].weight
    torch.testing.assert_close(s.history[1, :2], table[[7, 3]])
    assert torch.all(s.history[1, 2:] == 0)
    torch.testing.assert_close(s.history[2], table[[1, 2, 3, 4, 5]])
    logits = model(kjt)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    negatives = DienLoss(N_ITEMS, L).sample(kjt["hist_item_idx"], torch.Generator().manual_seed(0))
    assert negatives.lengths().tolist() == [0, 1, 4, max(min(len(rows[3]["hist_item_idx"]), L), 1) - 1]
    out, aux, steps = model(kjt, None, negatives)
    torch.testing.assert_close(out, logits)  # the negatives change the loss, not the logit
    assert aux.shape == steps.shape == (4, L - 1)
    assert steps[1].tolist() == [True, False, False, False]
    torch.testing.assert_close(model.sparse_arch(kjt, negatives).negatives[2], table[negatives.values()[1:5]])


def test_augru_cell_scales_the_update_gate_by_hand():
    """AUGRU (eq. 9-10) with torch.nn.GRUCell's parameters: u = 1 - z, u' = a * u, h' = (1 - u') h + u' n; a = 0
    keeps h, a = 1 is the GRU step (GRUCell and the formulas by hand)."""
    torch.manual_seed(1)
    gru, cell = torch.nn.GRUCell(3, 4), AUGRUCell(3, 4)
    cell.load_state_dict(gru.state_dict())  # same names and shapes
    x, h = torch.randn(5, 3), torch.randn(5, 4)
    w_ir, w_iz, w_in = gru.weight_ih.chunk(3)
    w_hr, w_hz, w_hn = gru.weight_hh.chunk(3)
    b_ir, b_iz, b_in = gru.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = gru.bias_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    u = 1 - torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)  # the paper's update gate
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))  # the paper's h~
    gru_step = (1 - u) * h + u * n
    torch.testing.assert_close(gru(x, h), gru_step)
    torch.testing.assert_close(cell(x, h, torch.ones(5)), gru_step)
    assert torch.equal(cell(x, h, torch.zeros(5)), h)  # exactly: a masked step keeps the state
    a = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(cell(x, h, a), (1 - a[:, None] * u) * h + a[:, None] * u * n)


def test_interest_evolution_by_hand_and_padding_masked():
    """a = softmax over the valid steps of h_t W e_a (eq. 8), the AUGRU over the valid steps only, final state at
    the last valid step; garbage in the padded states changes nothing, an empty history gives 0."""
    torch.manual_seed(2)
    evolution = InterestEvolution(4, 8)
    states, target = torch.randn(3, 5, 4), torch.randn(3, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    final, weights = evolution(states, mask, target)
    w = evolution.attention.weight  # (H, D)
    for b, n in enumerate((5, 2)):
        a = torch.softmax(states[b, :n] @ (w @ target[b]), dim=0)  # (n,)
        torch.testing.assert_close(weights[b, :n], a)
        h = torch.zeros(1, 4)
        for t in range(n):
            h = evolution.augru(states[b, t:t + 1], h, a[t:t + 1])
        torch.testing.assert_close(final[b], h[0])
    assert torch.all(weights[1, 2:] == 0) and torch.all(weights[2] == 0) and torch.all(final[2] == 0)
    garbage = torch.where(mask.unsqueeze(-1), states, torch.full_like(states, 50.0))
    final2, weights2 = evolution(garbage, mask, target)
    assert torch.equal(final2, final) and torch.equal(weights2, weights)


def test_interest_extractor_ignores_right_padding():
    """The valid states are the GRU's over the unpadded history alone; padded states are 0."""
    torch.manual_seed(3)
    extractor = InterestExtractor(8, 6)
    history = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    history[0, 3:] = 100.0  # garbage on padding
    states = extractor(history, mask)
    alone, _ = extractor.gru(history[:1, :3])  # (1, 3, H)
    torch.testing.assert_close(states[0, :3], alone[0])
    assert torch.all(states[0, 3:] == 0)


def test_padding_changes_no_logit():
    """More padding (a longer L, the same weights), another batch around a row, or an empty history: the same logit
    for every row whose history fits."""
    torch.manual_seed(4)
    model = DIEN(synthetic_vocab_sizes(), CONFIG).eval()
    longer = DIEN(synthetic_vocab_sizes(), dataclasses.replace(CONFIG, max_history=9)).eval()
    longer.load_state_dict(model.state_dict())  # no weight depends on L
    rows = _rows(4, seed=5)
    rows[0]["hist_item_idx"], rows[1]["hist_item_idx"] = [], [4, 9, 2]
    rows[2]["hist_item_idx"], rows[3]["hist_item_idx"] = [5, 6, 7, 8, 9], [3]
    kjt = kjt_of_rows(rows, DIEN_FEATURES)
    with torch.no_grad():
        logits = model(kjt)
        torch.testing.assert_close(longer(kjt), logits)
        torch.testing.assert_close(model(kjt_of_rows(rows[1:2], DIEN_FEATURES)), logits[1:2])
    assert torch.isfinite(logits).all()


def test_auxiliary_loss_counts_valid_steps_only():
    """l_t = softplus(-f(h_t, e_{t+1})) + softplus(f(h_t, e^_{t+1})) by hand, 0 on invalid steps; the model pairs
    state t with behaviour t + 1 and the negative of step t, and its aux loss is positive."""
    torch.manual_seed(6)
    net = AuxiliaryNet(4, 8, (5,))
    states, pos, neg = torch.randn(2, 3, 4), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    steps = torch.tensor([[True, True, False], [False, False, False]])
    loss = net(states, pos, neg, steps)
    for t in range(2):
        f_pos = net.mlp(torch.cat([states[0, t], pos[0, t]])[None])[0, 0]
        f_neg = net.mlp(torch.cat([states[0, t], neg[0, t]])[None])[0, 0]
        want = -torch.log(torch.sigmoid(f_pos)) - torch.log(1 - torch.sigmoid(f_neg))
        torch.testing.assert_close(loss[0, t], want)
    assert loss[0, 2] == 0 and torch.all(loss[1] == 0)

    model = DIEN(synthetic_vocab_sizes(), CONFIG).eval()
    rows = _rows(3, seed=7)
    rows[0]["hist_item_idx"], rows[1]["hist_item_idx"], rows[2]["hist_item_idx"] = [3, 8, 5], [6], []
    kjt = kjt_of_rows(rows, DIEN_FEATURES)
    negatives = JaggedTensor(values=torch.tensor([11, 12]), lengths=torch.tensor([2, 0, 0]))
    with torch.no_grad():
        _, aux, steps = model(kjt, None, negatives)
        s = model.sparse_arch(kjt, negatives)
        h = model.extractor(s.history, s.mask)
        table = model.sparse_arch.sequence.embedding_collection.embeddings["t_item"].weight
        want = model.auxiliary(h[:1, :2], table[[8, 5]][None], table[[11, 12]][None], torch.ones(1, 2, dtype=bool))
    assert steps.tolist() == [[True, True, False, False], [False] * 4, [False] * 4]
    torch.testing.assert_close(aux[0, :2], want[0])
    assert torch.all(aux[0, :2] > 0) and torch.all(aux[0, 2:] == 0) and torch.all(aux[1:] == 0)
    with pytest.raises(ValueError, match="one negative per step"):
        model(kjt, None, JaggedTensor(values=torch.tensor([11, 12, 13]), lengths=torch.tensor([2, 1, 0])))


def test_negatives_are_uniform_items_other_than_the_next_behaviour():
    loss = DienLoss(5, max_history=4)  # items 1..4
    rows = [{"hist_item_idx": [1, 2, 3, 4, 2, 1]}, {"hist_item_idx": [3]}, {"hist_item_idx": [4, 4]}] * 200
    hist = kjt_of_rows(rows, DIEN_FEATURES[-1:])["hist_item_idx"]
    neg = loss.sample(hist, torch.Generator().manual_seed(0))
    assert neg.lengths()[:3].tolist() == [3, 0, 1]
    positives = torch.tensor([2, 3, 4, 4] * 200)  # e_{t+1} of each step, row-major
    values = neg.values()
    assert len(values) == len(positives) and torch.all(values != positives)
    assert values.min() >= 1 and values.max() <= 4
    counts = torch.bincount(values[positives == 4], minlength=5)[1:4].float()  # the 3 others, uniform
    assert counts.min() > 0.8 * counts.mean()


def test_batch_loss_runs_one_forward_and_is_bce_plus_weighted_aux():
    torch.manual_seed(8)
    spec = get_model("dien")
    config = dataclasses.replace(CONFIG, aux_weight=0.5)
    model = DIEN(synthetic_vocab_sizes(), config)
    batch_loss = spec.ctr_loss(config, synthetic_vocab_sizes())
    assert isinstance(batch_loss, DienLoss) and spec.ctr_loss(dataclasses.replace(config, aux_weight=0.0), {}) is None
    rows = _rows(4, seed=9)
    rows[1]["hist_item_idx"] = []
    rows[3]["hist_item_idx"] = [1, 2, 3, 4, 5]  # a padding row (weight 0): its steps are not counted
    batch = _batch(rows, [1.0, 0.0, 1.0, 1.0], [1.0, 0.5, 2.0, 0.0])
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    loss, rows_out = batch_loss(model, batch, torch.Generator().manual_seed(3))
    assert len(calls) == 1 and rows_out.tolist() == [True, True, True, False]
    negatives = batch_loss.sample(batch.features["hist_item_idx"], torch.Generator().manual_seed(3))
    logits, aux, steps = model(batch.features, None, negatives)
    p, y, w = torch.sigmoid(logits), batch.label, batch.weight
    bce = -(w * (y * torch.log(p) + (1 - y) * torch.log(1 - p))).sum() / w.sum()
    valid = [aux[b, t] for b in range(3) for t in range(L - 1) if steps[b, t]]
    assert len(valid) == sum(max(min(len(r["hist_item_idx"]), L) - 1, 0) for r in rows[:3]) > 0
    torch.testing.assert_close(loss, bce + 0.5 * torch.stack(valid).mean())
    loss.backward()
    assert model.evolution.augru.weight_hh.grad is not None and model.auxiliary.mlp[1].weight.grad is not None

    # through the CTR task's objective, with the mini-batch aware L2 counting the sampled negatives' rows too
    objective = CtrObjective(model, id_lookups, {"t_user": torch.ones(30), "t_item": torch.ones(N_ITEMS)}, 1.0,
                             batch_loss=batch_loss, generator=torch.Generator().manual_seed(3))
    calls.clear()
    total, data, penalty = objective(batch)
    assert len(calls) == 1
    torch.testing.assert_close(data, loss)
    table = model.sparse_arch.sequence.embedding_collection.embeddings["t_item"].weight
    item_ids = {r["item_idx"] for r in rows[:3]} | {i for r in rows[:3] for i in r["hist_item_idx"][:L]} \
        | set(negatives.values()[:int(negatives.lengths()[:3].sum())].tolist())
    users = model.sparse_arch.pooled.embedding_bag_collection.embedding_bags["t_user"].weight
    want = 0.5 * (table[sorted(item_ids)].pow(2).sum() + users[sorted({r["user_idx"] for r in rows[:3]})].pow(2).sum())
    torch.testing.assert_close(penalty, want)


def test_config_errors_and_options():
    assert DIENConfig().hidden_size == 16 and DIENConfig(gru_hidden=12).hidden_size == 12
    for bad, match in [({"embedding_dim": 6}, "multiple of 4"), ({"gru_hidden": 0}, "gru_hidden"),
                       ({"aux_weight": -1.0}, "aux_weight"), ({"aux_weight": math.nan}, "aux_weight"),
                       ({"max_history": 1}, "max_history"), ({"max_history": 0, "aux_weight": 0.0}, "max_history"),
                       ({"hidden": ()}, "hidden layer"), ({"aux_hidden": ()}, "hidden layer"),
                       ({"dropout": 1.0}, "dropout"), ({"activation": "gelu"}, "activation")]:
        with pytest.raises(ValueError, match=match):
            DIENConfig(**bad)
    assert DIENConfig(max_history=1, aux_weight=0.0, aux_hidden=()).max_history == 1  # no aux: one behaviour is fine
    with pytest.raises(ValueError, match="2 items"):
        DienLoss(2, L)
    with pytest.raises(ValueError, match="aux_weight"):
        DienLoss(N_ITEMS, L, aux_weight=0.0)
    spec = get_model("dien")
    config = spec.make_config({"aux_weight": "0", "gru_hidden": "12"})
    assert config.aux_weight == 0.0 and config.gru_hidden == 12 and spec.ctr_loss(config, {}) is None
    model = spec.build(synthetic_vocab_sizes(), dataclasses.replace(config, max_history=L))
    assert model.auxiliary is None and model.evolution.augru.hidden_size == 12
    kjt = kjt_of_rows(_rows(2, seed=10), DIEN_FEATURES)
    assert model.eval()(kjt).shape == (2,)
    with pytest.raises(ValueError, match="no auxiliary net"):
        model(kjt, None, JaggedTensor(values=torch.tensor([1]), lengths=torch.tensor([1, 0])))
    with pytest.raises(ValueError, match="user_prior_rating"):
        DIEN(synthetic_vocab_sizes(), dataclasses.replace(CONFIG, dense_features=("user_prior_rating",)))(kjt)


# ------------------------------------------------------------------------------------------ sharded vs unsharded
WORLD, BATCH = 2, 6


def _worker(rank: int, port: int, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from training.distributed import ShardingConfig, load_full_state_dict, plan_sharding, shard_model

    vocab = synthetic_vocab_sizes()
    torch.manual_seed(0)
    reference = DIEN(vocab, CONFIG).eval()
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    sharded = DIEN(vocab, CONFIG, sparse_device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, sharded.sparse_arch.parameters(), {"lr": 0.1})  # fused, as trained
    dmp = shard_model(sharded, plan_sharding(sharded, WORLD, ShardingConfig(strategy="row_wise")))
    load_full_state_dict(dmp, full)
    dmp.eval()
    rows = _rows(WORLD * BATCH, seed=11)[rank * BATCH:(rank + 1) * BATCH]
    kjt = kjt_of_rows(rows, DIEN_FEATURES)
    negatives = DienLoss(vocab["item"], L).sample(kjt["hist_item_idx"], torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(dmp(kjt), reference(kjt), rtol=1e-5, atol=1e-6)
        for got, want in zip(dmp(kjt, None, negatives), reference(kjt, None, negatives)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration
def test_sharded_dien_with_negatives_matches_unsharded(tmp_path):
    """The negatives' key of the item table goes through the sharded lookup (row-wise over 2 ranks) as the history."""
    spawn_checked(_worker, (free_port(),), WORLD, tmp_path)
