"""DIN (Zhou et al. 2018): shapes, padding masked out of the attention, the activation unit by hand, and the
sharded model (DMP, 2 gloo processes on CPU) against the unsharded one on the same weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked
from features.definitions import HISTORY_RATING_FEATURE, SPARSE_FEATURES
from features.errors import VocabularyError
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models import DIN, DIN_FEATURES, DINConfig
from training.modules import ActivationUnit, Dice, TargetAttention

CONFIG = DINConfig(embedding_dim=8, attention_hidden=(6,), hidden=(16, 8), dropout=0.0, max_history=5,
                   history_ratings=False)
RATED = DINConfig(embedding_dim=8, attention_hidden=(6,), hidden=(16, 8), dropout=0.0, max_history=5,
                  history_ratings=True)


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))
    return [{"user_idx": r(30), "item_idx": r(40), "age_idx": r(8), "gender_idx": r(3), "occupation_idx": r(22),
             "zip_idx": r(12), "genre_idx": [r(20) for _ in range(r(4))],
             "hist_item_idx": [1 + r(39) for _ in range(r(6))]} for _ in range(n)]


def _rated(rows: list[dict], seed: int) -> list[dict]:
    """``rows`` with a ``hist_rating`` (stars 1..5) for each behaviour."""
    g = torch.Generator().manual_seed(seed)
    return [{**row, "hist_rating": [1 + int(torch.randint(0, 5, (1,), generator=g)) for _ in row["hist_item_idx"]]}
            for row in rows]


def test_din_shapes_and_shared_item_table():
    torch.manual_seed(0)
    model = DIN(synthetic_vocab_sizes(), CONFIG)
    rows = _rows(4, seed=0)
    rows[0]["hist_item_idx"] = []  # an empty history: interest vector 0
    rows[1]["hist_item_idx"] = [7, 3]
    kjt = kjt_of_rows(rows, DIN_FEATURES)
    side, candidate, history, mask, ratings = model.sparse_arch(kjt)
    assert ratings is None  # the default config reads the behaviours' items only
    assert side.shape == (4, len(SPARSE_FEATURES) - 1, 8) and candidate.shape == (4, 8)
    assert history.shape == (4, 5, 8) and mask.shape == (4, 5)
    assert mask[1].tolist() == [True, True, False, False, False] and not mask[0].any()
    # history and candidate read the same rows of the one item table
    table = model.sparse_arch.sequence.embedding_collection.embeddings["t_item"].weight
    torch.testing.assert_close(history[1, :2], table[[7, 3]])
    torch.testing.assert_close(candidate[2], table[rows[2]["item_idx"]])
    logits, weights = model.forward_with_weights(kjt)
    assert logits.shape == (4,) and weights.shape == (4, 5)
    assert torch.all(weights[0] == 0)


def test_padding_changes_nothing():
    """A padded position (masked) does not change the interest, whatever its embedding; and a shorter history
    padded to L gives the same logit as the same history in a batch padded differently."""
    torch.manual_seed(1)
    att = TargetAttention(4, (5,))
    history = torch.randn(2, 4, 4)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    candidate = torch.randn(2, 4)
    interest, w = att(history, mask, candidate)
    garbage = history.clone()
    garbage[0, 3], garbage[1, 1:] = 100.0, -50.0
    interest2, w2 = att(garbage, mask, candidate)
    torch.testing.assert_close(interest, interest2)
    assert w[0, 3] == 0 and torch.all(w[1, 1:] == 0)
    # the whole model: a row's logit does not depend on the other rows' history lengths
    model = DIN(synthetic_vocab_sizes(), CONFIG).eval()
    rows = _rows(3, seed=2)
    rows[0]["hist_item_idx"], rows[1]["hist_item_idx"] = [4], [5, 6, 7, 8, 9]
    alone = model(kjt_of_rows(rows[:1], DIN_FEATURES))
    together = model(kjt_of_rows(rows, DIN_FEATURES))
    torch.testing.assert_close(alone, together[:1])


def test_activation_unit_by_hand():
    """D = 1, one hidden unit: a(h, c) = w2 * prelu(w1 . [h, c, h - c, h * c] + b1) + b2, no softmax."""
    unit = ActivationUnit(1, (1,))
    lin1, prelu, lin2 = unit.mlp
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        lin1.bias.fill_(-1.0)
        prelu.weight.fill_(0.25)
        lin2.weight.fill_(2.0)
        lin2.bias.fill_(0.5)
    history = torch.tensor([[[2.0], [-1.0]]])  # (1, 2, 1)
    candidate = torch.tensor([[3.0]])  # (1, 1)
    # h=2, c=3: 2 + 6 + 3*(-1) + 4*6 - 1 = 28 -> prelu 28 -> 2*28 + 0.5 = 56.5
    # h=-1, c=3: -1 + 6 + 3*(-4) + 4*(-3) - 1 = -20 -> prelu -5 -> 2*(-5) + 0.5 = -9.5
    torch.testing.assert_close(unit(history, candidate), torch.tensor([[56.5, -9.5]]))
    att = TargetAttention(1, (1,))
    att.activation_unit.load_state_dict(unit.state_dict())
    interest, w = att(history, torch.tensor([[True, True]]), candidate)
    torch.testing.assert_close(interest, torch.tensor([[56.5 * 2.0 + (-9.5) * (-1.0)]]))  # weights not normalised
    interest, w = att(history, torch.tensor([[True, False]]), candidate)
    torch.testing.assert_close(interest, torch.tensor([[113.0]]))


def test_activation_unit_equals_the_mlp_over_the_concatenation():
    """The factorised first layer is the paper's MLP over [h, c, h - c, h * c], values and gradients."""
    torch.manual_seed(3)
    unit = ActivationUnit(8, (12, 6))
    history = torch.randn(5, 7, 8, requires_grad=True)
    candidate = torch.randn(5, 8, requires_grad=True)
    got = unit(history, candidate)
    cand = candidate.unsqueeze(1).expand_as(history)
    x = torch.cat([history, cand, history - cand, history * cand], dim=-1)  # (B, L, 4D)
    want = unit.mlp(x.reshape(35, 32)).reshape(5, 7)
    torch.testing.assert_close(got, want)
    g = torch.randn(5, 7)
    grads = torch.autograd.grad((got * g).sum(), [history, candidate, *unit.parameters()])
    wants = torch.autograd.grad((want * g).sum(), [history, candidate, *unit.parameters()])
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ sharded vs unsharded
WORLD, BATCH, LR = 2, 6, 0.5


def _worker(rank: int, port: int, strategy: str, rated: bool, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from training.distributed import ShardingConfig, gather_full_state_dict, load_full_state_dict, placements
    from training.distributed import plan_sharding, shard_model

    vocab, config = synthetic_vocab_sizes(), RATED if rated else CONFIG
    torch.manual_seed(0)
    reference = DIN(vocab, config)
    full_sd = {k: v.clone() for k, v in reference.state_dict().items()}
    rows, features = _rated(_rows(WORLD * BATCH, seed=3), seed=4), config.features

    sharded = DIN(vocab, config, sparse_device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, sharded.sparse_arch.parameters(), {"lr": LR})
    plan = plan_sharding(sharded, WORLD, ShardingConfig(strategy=strategy))
    where = placements(plan)
    # 6 pooled tables + the sequence table (+ the ratings' table)
    assert "t_item" in where and len(where) == len(SPARSE_FEATURES) + rated
    if strategy == "row_wise":
        assert where["t_item"] == "row_wise@rank0,1"
    dmp = shard_model(sharded, plan)
    load_full_state_dict(dmp, full_sd)
    # the OverArch's batch norms in evaluation mode (their running statistics): in training each rank normalises
    # by its own batch, by design (as DDP without SyncBatchNorm), which an unsharded model on all rows cannot match
    dmp.eval(), reference.eval()

    local = rows[rank * BATCH:(rank + 1) * BATCH]
    logits = dmp(kjt_of_rows(local, features))
    torch.testing.assert_close(logits, reference(kjt_of_rows(local, features)), rtol=1e-5, atol=1e-6)

    # one SGD step on the tables: the gathered tables equal the unsharded ones after the mean-over-ranks gradient
    logits.sum().backward()
    reference(kjt_of_rows(rows, features)).sum().backward()
    ref_params = dict(reference.named_parameters())
    gathered = gather_full_state_dict(dmp)
    if rank == 0:
        for key, value in reference.state_dict().items():
            if "embedding_bags" in key or "embeddings.t_item" in key or "embeddings.t_rating" in key:
                torch.testing.assert_close(gathered[key], value - LR * ref_params[key].grad / WORLD,
                                           rtol=1e-4, atol=1e-6)
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration
@pytest.mark.parametrize(("strategy", "rated"), [("planner", False), ("row_wise", False), ("planner", True)])
def test_sharded_din_matches_unsharded(strategy, rated, tmp_path):
    spawn_checked(_worker, (free_port(), strategy, rated), WORLD, tmp_path)


def test_din_reads_dense_features_in_its_over_arch():
    torch.manual_seed(0)
    model = DIN(synthetic_vocab_sizes(), DINConfig(embedding_dim=8, hidden=(16,), dropout=0.0,
                                                   dense_features=("user_prior_rating",), history_ratings=False))
    kjt, dense = kjt_of_rows(_rows(4, seed=3), DIN_FEATURES), torch.randn(4, 1)  # (B, F_dense)
    logits, weights = model.forward_with_weights(kjt, dense)
    side, candidate, history, mask, _ = model.sparse_arch(kjt)
    interest, _ = model.interaction_arch(history, mask, candidate)
    x = torch.cat([side.flatten(1), candidate, interest, dense], dim=1)  # (B, (F + 2) * D + 1)
    torch.testing.assert_close(logits, model.over_arch(x).squeeze(1))
    assert logits.shape == (4,) and weights.shape == (4, model.config.max_history)
    with pytest.raises(ValueError, match="user_prior_rating"):
        model(kjt)


def test_din_pools_history_ratings_by_the_attention_weights():
    """liking = sum_l a(h_l, c) * R[r_l] by hand, with R the t_rating table; the stars change the logit, a padded
    position's do not exist, and a vocabulary without ``rating`` is refused."""
    torch.manual_seed(0)
    model = DIN(synthetic_vocab_sizes(), RATED).eval()
    assert RATED.features == (*DIN_FEATURES, HISTORY_RATING_FEATURE)
    rows = _rated(_rows(4, seed=5), seed=6)
    rows[0]["hist_item_idx"], rows[0]["hist_rating"] = [], []
    rows[1]["hist_item_idx"], rows[1]["hist_rating"] = [7, 3, 9], [5, 1, 4]
    kjt = kjt_of_rows(rows, RATED.features)
    logits, weights = model.forward_with_weights(kjt)
    side, candidate, history, mask, _ = model.sparse_arch(kjt)
    table = model.sparse_arch.ratings.embedding_collection.embeddings["t_rating"].weight  # (6, D)
    liking = torch.stack([sum((weights[b, l] * table[r] for l, r in enumerate(row["hist_rating"])),
                              torch.zeros(8)) for b, row in enumerate(rows)])  # (B, D)
    interest, _ = model.interaction_arch(history, mask, candidate)
    x = torch.cat([side.flatten(1), candidate, interest, liking], dim=1)  # (B, (F + 3) * D)
    torch.testing.assert_close(logits, model.over_arch(x).squeeze(1))
    # the same behaviours rated otherwise: only row 1's logit moves
    rows[1]["hist_rating"] = [1, 5, 2]
    moved = model(kjt_of_rows(rows, RATED.features))
    assert not torch.isclose(moved[1], logits[1]) and torch.equal(moved[[0, 2, 3]], logits[[0, 2, 3]])
    sizes = synthetic_vocab_sizes()
    del sizes["rating"]
    with pytest.raises(VocabularyError, match="rating"):
        DIN(sizes, RATED)


def test_dice_follows_the_paper():
    """Dice (eq. 9): p = sigmoid of the batch-standardised input in training, of the running-standardised input in
    evaluation; f = p * s + (1 - p) * alpha * s."""
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.25, -0.5, 1.0]))
    s = torch.randn(16, 3) * 2 + 1  # (B, C)
    p = torch.sigmoid((s - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + 1e-8))
    torch.testing.assert_close(dice(s), p * s + (1 - p) * dice.alpha * s)
    dice.eval()  # one training batch moved the running stats 10% of the way from (0, 1)
    mean, var = 0.1 * s.mean(0), 0.9 + 0.1 * s.var(0, unbiased=True)
    p = torch.sigmoid((s - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(dice(s), p * s + (1 - p) * dice.alpha * s)
    assert DINConfig().activation == "dice" and DINConfig().batch_norm
    with pytest.raises(ValueError, match="activation"):
        DIN(synthetic_vocab_sizes(), DINConfig(activation="gelu"))
