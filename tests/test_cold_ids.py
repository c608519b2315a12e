"""Cold ids (training.modules.cold_ids): id dropout replaces only the user/item ids it should, in the same row
order; a cold id is read as the OOV row during evaluation; and the saved state with its cold rows filled gives
the same logits for the raw ids as the trained state gives for the remapped ones (DeepFM and DIN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.definitions import SPARSE_FEATURES
from training.data import CtrShard, ctr_batches, kjt_of_rows, synthetic_vocab_sizes
from training.models import DIN, DIN_FEATURES, DeepFM, DeepFMConfig, DINConfig
from training.modules.cold_ids import cold_remap, drop_ids, fill_cold_rows
from training.registry import get_model
from training.tasks.ctr import id_sample_counts, read_cold_as_oov
from training.trainer import TrainOptions

VOCAB = synthetic_vocab_sizes()
WARM_USERS, WARM_ITEMS = 20, 30  # train samples hold users 1..19 and items 1..29; the rest are cold


def _shard(n: int, seed: int, users: int, items: int, history: bool) -> CtrShard:
    rng = np.random.default_rng(seed)
    ids = {"user_idx": rng.integers(1, users, n), "item_idx": rng.integers(1, items, n),
           "age_idx": rng.integers(0, 8, n), "gender_idx": rng.integers(0, 3, n),
           "occupation_idx": rng.integers(0, 22, n), "zip_idx": rng.integers(0, 12, n)}
    lists = {"genre_idx": [rng.integers(1, 20, rng.integers(0, 3)) for _ in range(n)]}
    if history:
        lists["hist_item_idx"] = [rng.integers(1, items, rng.integers(0, 6)) for _ in range(n)]
    values = {k: np.concatenate(v).astype(np.int64) for k, v in lists.items()}
    offsets = {k: np.concatenate([[0], np.cumsum([len(x) for x in v])]).astype(np.int64) for k, v in lists.items()}
    return CtrShard({k: v.astype(np.int64) for k, v in ids.items()}, values, offsets,
                    rng.integers(0, 2, n).astype(np.float32), ids["user_idx"].astype(np.int64))


def _rows(shard: CtrShard, features) -> list[dict]:
    rows = []
    for i in range(len(shard)):
        row = {k: int(v[i]) for k, v in shard.ids.items()}
        for k, v in shard.values.items():
            row[k] = v[shard.offsets[k][i]:shard.offsets[k][i + 1]].tolist()
        rows.append(row)
    return rows


def test_cold_remap_and_drop_ids():
    assert cold_remap(np.array([0, 2, 0, 0, 5])).tolist() == [0, 1, 0, 0, 4]
    ids = np.arange(1, 20_001)
    dropped = drop_ids(ids, 0.25, np.random.default_rng(3))
    kept = dropped != 0
    assert 0.23 < 1 - kept.mean() < 0.27 and np.array_equal(dropped[kept], ids[kept])
    assert drop_ids(ids, 0.0, np.random.default_rng(3)) is ids
    with pytest.raises(ValueError, match="id dropout"):
        drop_ids(ids, 1.0, np.random.default_rng(0))


def test_id_dropout_replaces_only_user_and_item_ids_in_the_same_order():
    shard = _shard(300, seed=1, users=30, items=40, history=False)
    plain = list(ctr_batches(shard, 64, 5, shuffle=True, seed=7))
    ids = ("user_idx", "item_idx")
    dropped = list(ctr_batches(shard, 64, 5, shuffle=True, seed=7, id_dropout=0.3, dropped=ids))
    again = list(ctr_batches(shard, 64, 5, shuffle=True, seed=7, id_dropout=0.3, dropped=ids))
    n_dropped = n = 0
    for a, b, c in zip(plain, dropped, again):
        assert torch.equal(a.label, b.label) and torch.equal(a.user, b.user)  # same rows, same order
        assert torch.equal(b.features.values(), c.features.values())  # seeded
        for f in SPARSE_FEATURES:
            va, vb = a.features[f.name].values(), b.features[f.name].values()
            if f.name in ("user_idx", "item_idx"):
                changed = va != vb  # the shard has no id 0, so every dropped id shows as a change
                assert torch.all(vb[changed] == 0)
                n_dropped, n = n_dropped + int(changed.sum()), n + len(va)
            else:
                assert torch.equal(va, vb)
    assert 0.25 < n_dropped / n < 0.35


def test_read_cold_as_oov_remaps_ids_and_history_keeps_the_gauc_key():
    train = _shard(400, seed=0, users=WARM_USERS, items=WARM_ITEMS, history=True)
    test = _shard(200, seed=1, users=VOCAB["user"], items=VOCAB["item"], history=True)
    counts = id_sample_counts(train, get_model("din").id_tables, VOCAB, max_history=5)
    raw_user, raw_hist = test.ids["user_idx"].copy(), test.values["hist_item_idx"].copy()
    read_cold_as_oov(test, get_model("din").id_tables, counts)
    assert np.array_equal(test.ids["user_idx"], np.where(raw_user < WARM_USERS, raw_user, 0))
    assert np.array_equal(test.values["hist_item_idx"], np.where(raw_hist < WARM_ITEMS, raw_hist, 0))
    assert np.array_equal(test.user, raw_user)  # GAUC groups by the real user
    assert (raw_user >= WARM_USERS).any() and (raw_hist >= WARM_ITEMS).any()  # the test has cold ids to remap


@pytest.mark.parametrize("kind", ["deepfm", "din"])
def test_filled_state_reads_cold_ids_as_the_remap_does(kind):
    """What evaluation computes (cold ids remapped on the input) is what the saved model computes on raw ids."""
    if kind == "din":
        config = DINConfig(embedding_dim=8, attention_hidden=(6,), hidden=(16, 8), dropout=0.0, max_history=5,
                           history_ratings=False)
        make, features = (lambda: DIN(VOCAB, config)), DIN_FEATURES
    else:
        make, features = (lambda: DeepFM(VOCAB, DeepFMConfig(embedding_dim=8, hidden=(16,), dropout=0.0))), \
            SPARSE_FEATURES
    torch.manual_seed(0)
    trained = make().eval()
    for name, p in trained.named_parameters():  # the first-order weights start at 0: make every row distinct
        if name.endswith(("t_user.weight", "t_item.weight")):
            torch.nn.init.normal_(p, std=0.5)
    train = _shard(400, seed=0, users=WARM_USERS, items=WARM_ITEMS, history=kind == "din")
    test = _shard(64, seed=1, users=VOCAB["user"], items=VOCAB["item"], history=kind == "din")
    raw = kjt_of_rows(_rows(test, features), features)
    counts = id_sample_counts(train, get_model(kind).id_tables, VOCAB, max_history=5)
    read_cold_as_oov(test, get_model(kind).id_tables, counts)
    with torch.no_grad():
        remapped = trained(kjt_of_rows(_rows(test, features), features))
        before = trained(raw)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    filled = fill_cold_rows(state, counts)
    assert filled == {t: int((n[1:] == 0).sum()) for t, n in counts.items()} and filled["t_user"] > 0
    saved = make().eval()
    saved.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(saved(raw), remapped)
    assert not torch.allclose(before, remapped)  # the cold rows did change the answer


def test_fill_cold_rows_refuses_a_missing_table_or_other_sizes():
    state = {"a.t_user.weight": torch.randn(5, 2)}
    with pytest.raises(ValueError, match="no weight of table 't_item'"):
        fill_cold_rows(state, {"t_item": np.ones(5)})
    with pytest.raises(ValueError, match="rows"):
        fill_cold_rows(state, {"t_user": np.ones(4)})


def test_train_options_check_id_dropout():
    assert TrainOptions(model="deepfm").id_dropout == get_model("deepfm").train.id_dropout > 0  # the tuned default
    assert TrainOptions(model="item2vec").id_dropout == 0.0
    assert TrainOptions(model="din", id_dropout=0.2).id_dropout == 0.2
    assert TrainOptions(model="din", id_dropout=0.0).id_dropout == 0.0  # 0 turns it off, it is not "unset"
    for bad in ({"model": "deepfm", "id_dropout": 1.0}, {"model": "din", "id_dropout": -0.1},
                {"model": "item2vec", "id_dropout": 0.1}):
        with pytest.raises(ValueError, match="id_dropout"):
            TrainOptions(**bad)


def test_din_drops_only_the_user_id():
    """DIN's activation unit queries the history with the candidate item, so its id dropout leaves item_idx alone."""
    assert get_model("din").id_dropout_features == ("user_idx",)
    assert set(get_model("deepfm").id_dropout_features) == {"user_idx", "item_idx"}
    shard = _shard(300, seed=2, users=30, items=40, history=False)
    plain = next(ctr_batches(shard, 256, 1, shuffle=True, seed=5))
    dropped = next(ctr_batches(shard, 256, 1, shuffle=True, seed=5, id_dropout=0.5,
                               dropped=get_model("din").id_dropout_features))
    assert torch.equal(plain.features["item_idx"].values(), dropped.features["item_idx"].values())
    users = dropped.features["user_idx"].values()
    assert 0.4 < float((users == 0).float().mean()) < 0.6
